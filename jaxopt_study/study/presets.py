"""The optimizer study: all five optimizers under identical conditions and one protocol.

  python scripts/run_study.py --config=configs/study.py:tiny --workdir=studies/tiny
  python scripts/run_study.py --config=configs/study.py:small --workdir=studies/small
  python scripts/run_study.py --config=configs/study.py:wikitext103 --workdir=studies/wt103
  python scripts/make_report.py studies/small        # the report alone, from the run dirs

  tiny         CI / quickstart, a smoke test: tiny model, 1 seed, 1 lr, 80 steps (~2-3 min on
               2 CPU cores); its report states no verdicts.
  small        the CPU study: synthetic Zipf corpus with topic switches, a 5-point lr grid per
               optimizer (extended until bracketed), 3 seeds at each best rate, pre- and
               post-LN (about 70-110 runs of ~1 min each on 2 CPU cores; not timed under this
               protocol).
  controls     one GPU: every control and architecture condition (shift none/switch/drift, Zipf
               0.8/1.1/1.4, tied, post-LN, weight decay, GQA, MoE, depth 2/4/8), 4 x 256 GPT,
               1000 steps; validation/test at the last step's topic (adaptation).
  markov       one GPU: the controls protocol on a corpus small models learn (a bigram chain
               over ranks, entropy floor 2 nats below the marginal), switch vs none, post-LN,
               and 4 x 256 vs 8 x 512.
  markov_lion  one GPU: the Lion controls on `markov`: AdamW and Lion on a sqrt(3)-ratio grid
               around their first optima, switch vs none at 4 x 256 and 8 x 512.
  wikitext103_offline  one GPU: WikiText-103 text, trained on its validation split and
               evaluated on held-out test articles (only those two splits exist offline).
  wikitext2_sizes  one GPU: trained on WikiText-2's train split (local files, docs/DATA.md),
               a model-size axis 4 x 256 / 8 x 512 / 12 x 768, under one pass over the text.
  wikitext2_lion  one GPU: the Lion controls on real text: AdamW and Lion on a sqrt(3)-ratio
               grid around their `wikitext2_sizes` optima at 4 x 256 and 8 x 512.
  wikitext103  GPU/TPU: WikiText-103, a 6-layer d=256 GPT, sharded over all devices.

The protocol (jaxopt_study/study/runner.py): per (condition, optimizer), sweep
``learning_rates[opt] * lr_multipliers`` with ``sweep_seeds``, choose the best rate on the
validation split, extend the grid on an edge until the best rate is bracketed (at most
``lr_grid_max_extensions`` points per side), then train every seed of ``seeds`` at the best
rate; the report gives test-split numbers with 95% Student-t intervals. Every run of a
condition shares the base config below except the optimizer block and its learning rate: the
same seed gives the same initial parameters and the same data order for every optimizer, and
every run has the same token budget. Fields can be overridden on the command line like any
config: ``--config.seeds=(0,1,2,3) --config.lr_multipliers=(0.25,0.5,1,2,4)
--config.base.model.d_model=128``.
"""

import dataclasses

import ml_collections

from jaxopt_study import data as data_lib
from jaxopt_study import optimizers
from jaxopt_study import presets
from jaxopt_study.study import loading

# The Lion controls' grid: 1/3 .. 3 at ratio sqrt(3), twice as fine as the default ratio-3 grid,
# so that every 2nd point is a point of the coarse study's grid (its runs are reused).
_FINE_MULTIPLIERS = tuple(3.0 ** (k / 2) for k in range(-2, 3))


def _tunable(name):
  block = optimizers.default_config(name)
  del block["name"], block["learning_rate"]  # the registry key; the grid sets the rate
  return block


def _condition(description, overrides=None):
  c = ml_collections.ConfigDict()
  c.description = description  # One line for the report.
  # Partial config applied on top of `base` (nested like the run config), e.g.
  # {'model': {'ln_position': 'post'}}; every key must exist in the run config.
  c.overrides = ml_collections.ConfigDict(overrides or {})
  return c


def _controls_base(b, c):
  """The run config and protocol of `controls` (and `markov`), set on base `b` and study `c`."""
  b.model.num_layers, b.model.d_model, b.model.num_heads = 4, 256, 8
  b.model.dtype = "bfloat16"
  b.model.max_len = b.seq_len = 128
  b.batch_size = 32  # 4096 tokens per step
  b.data.vocab_size = 4096
  b.data.eval_batches = 8  # 8 x 32 windows per split (validation selects, test reports)
  b.data.synthetic.zipf_exponent = 1.1
  b.data.synthetic.shift = "switch"
  b.data.synthetic.shift_every = 250  # 3 topic switches per run
  b.data.synthetic.copy_prob = 0.9  # context to learn within the budget (controls pilots)
  # Select and report on the last step's distribution (adaptation): the mixture of every
  # topic seen rewards not learning the present one ('past' measures forgetting).
  b.data.synthetic.eval_at = "last"
  b.schedule.warmup_steps = 50
  b.eval_every = 500
  b.checkpoint_every = 1000
  b.log_every = 1
  b.sync_every = 500
  b.diagnostics.every = 50  # 20 diagnostic points per run
  b.diagnostics.window = b.diagnostics.horizon = 50  # activity window / age horizon H
  b.probes.every = 500  # steps 500 and 1000 (the depth section reads the last)
  c.token_budget = 1000 * 32 * 128  # 1000 steps, 4M tokens per run
  c.sweep_seeds = c.seeds = (0, 1, 2)
  # Lion's best rate sat on the high edge after 2 extensions (x81 of its 1e-4 centre) in
  # every condition of the first GPU runs: up to x729 (the extensions are 3-run stacks).
  c.lr_grid_max_extensions = 4
  c.lr_grid_extension_points = 2  # an extension stack compiles as long as a sweep's
  c.stack_runs = 15  # the whole 5-rate x 3-seed sweep in one vmapped step
  c.analyze_layers = True


def get_config(preset=None) -> ml_collections.ConfigDict:
  """The study config of `preset` (default 'tiny')."""
  preset = preset or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for configs/study.py:PRESET; valid: "
                     f"{tuple(PRESETS)}")
  base_preset, define = PRESETS[preset]
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.name = preset  # Study name (report title); the workdir is given on the command line.

  # ---------------------------------------------------------------- the shared run config
  # jaxopt_study/presets.py's preset; everything a run needs except the optimizer block, which the
  # runner sets from optimizers.default_config, and num_steps, set from token_budget.
  c.base = b = presets.get_config(base_preset)
  b.log_every = 1  # Every step's train loss: the spike rule needs a 128-step history.
  b.keep_checkpoints = 1  # One checkpoint per run is enough to resume (keeps the study small).
  # The report uses the global, per-kind and per-layer aggregates; per-tensor ('/param=') series
  # multiply the metrics (and the compile time) several-fold. True puts them in TensorBoard.
  b.diagnostics.per_param = False

  # ---------------------------------------------------------------- what varies
  c.optimizers = optimizers.NAMES  # Names in the optimizer registry (optimizers.NAMES).
  # Centre of each optimizer's lr grid: its literature default (optimizers.default_config).
  c.learning_rates = ml_collections.ConfigDict(
      {o: optimizers.default_config(o).learning_rate for o in optimizers.NAMES})
  # Each optimizer's block besides its name and lr, starting at optimizers.default_config, so
  # every field can be set on the command line, e.g. signum:
  # --config.optimizer_overrides.signsgd.momentum=0.9
  c.optimizer_overrides = ml_collections.ConfigDict({o: _tunable(o) for o in optimizers.NAMES})
  # Grid: lr = learning_rates[opt] * multiplier (rounded to 3 significant digits); log-spaced
  # (one constant ratio), at least 5 points (protocol.MIN_GRID_POINTS) unless a smoke test.
  c.lr_multipliers = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)
  # A best rate on an edge of the grid: add up to this many points (same ratio) on that side.
  c.lr_grid_max_extensions = 2
  # Points added at once on that side (each counts towards the limit): 2 trains both in one
  # stacked step, one compile instead of two, when stack_runs > 1.
  c.lr_grid_extension_points = 1
  # Seeds of the lr sweep (a seed fixes initial parameters and data order, the same for every
  # optimizer); the best rate is chosen on the validation loss averaged over them.
  c.sweep_seeds = (0,)
  c.seeds = (0, 1, 2)  # Seeds at each best rate (>= 3, protocol.MIN_SEEDS, unless a smoke test).
  # Tokens per run, the same for every run: num_steps = token_budget // (batch_size * seq_len).
  c.token_budget = 0
  # Conditions: named partial configs over `base` (the order is the report's order; the first
  # is the primary condition used for the literature checks). Each gets the whole protocol.
  c.conditions = ml_collections.ConfigDict()
  c.only_conditions = ()  # Run only these conditions (names); () = all.

  # ---------------------------------------------------------------- runner
  c.retry_failed = True  # Re-run runs recorded as 'failed' (exceptions); diverged runs are kept.
  # A run directory trained under another config (its config fingerprint differs): 'refuse'
  # stops the study naming the run and the changed fields; 'rerun' moves it aside and trains it
  # again.
  c.on_config_change = "refuse"
  # JAX's persistent compilation cache ($JAXOPT_STUDY_CACHE or ~/.cache/jaxopt_study, then
  # jax_compilation_cache/): runs that differ only in seed or learning rate share their compiled
  # steps (the peak rate lives in the optimizer state, optimizers.build).
  c.compilation_cache = True
  # Train up to this many fresh runs of a sweep step (rates x seeds of one optimizer) at once in
  # one vmapped step (train.train_runs): small models fill a GPU this way. 1: one at a
  # time (CPU: stacking only adds up the work).
  c.stack_runs = 1
  c.make_report = True  # scripts/run_study.py writes the report after the runs.
  # Layer scores (jaxopt_study/analysis: block Jacobians, usefulness, causal and permutation
  # scores of the last checkpoint) of every completed run at each optimizer's best rate, run once
  # a condition's runs are done; written to RUN/analysis/analysis.json, which the report's depth
  # section reads. Skipped where analysis.json is newer than the checkpoint; a failure is logged
  # and recorded in study.json, and never stops the study.
  c.analyze_layers = False
  # With analyze_layers: a best-rate run finished elsewhere (seeded with --from_archive, no
  # checkpoint here) is trained again in RUN/retrain for its scores; its recorded results stay.
  c.retrain_for_layer_scores = False

  # ---------------------------------------------------------------- report (study/report.py)
  # Spike rule, shift recovery, frequency buckets, staleness window, smoke_test: every field
  # is documented in jaxopt_study.study.loading.Settings (the defaults; study.json records them).
  c.report = ml_collections.ConfigDict(dataclasses.asdict(loading.Settings()))

  define(b, c)  # the preset's own settings (below)
  return c


# ---------------------------------------------------------------------- the presets: each sets
# its run config `b` (on top of its base run preset) and its protocol `c`; the registry PRESETS,
# at the end, names them with their base run preset (jaxopt_study/presets.py).


def _tiny(b, c):
  """The `tiny` study: run config `b`, study config `c`."""
  # Minutes on 2 CPU cores for all five optimizers: 1 seed, the default lr, 80 steps. A
  # smoke test: too few rates and seeds for the protocol, so its report gives no verdicts.
  c.report.smoke_test = True
  b.model.num_layers, b.model.d_model, b.model.num_heads = 2, 64, 4
  b.seq_len, b.batch_size = 64, 16  # 1024 tokens per step
  b.data.vocab_size = 1024  # Zipf vocabulary (the model's); small keeps the softmax cheap.
  b.data.eval_batches = 4  # 4 x 16 held-out windows
  b.data.synthetic.shift = "switch"  # Topic switches every 30 steps: 2 shifts in the run.
  b.data.synthetic.shift_every = 30
  b.schedule.warmup_steps = 10
  b.eval_every = b.checkpoint_every = 40
  # Full diagnostics every step: one compiled step instead of three (compile time dominates
  # these short runs), 80 points per run.
  b.diagnostics.every = 1
  b.diagnostics.window = b.diagnostics.horizon = 15  # Age horizon H of the aging metrics.
  c.lr_multipliers = (1.0,)
  c.lr_grid_max_extensions = 0
  c.sweep_seeds = c.seeds = (0,)
  c.token_budget = 80 * 1024  # 80 steps
  c.report.shift_pre_window = 10
  c.report.shift_smooth = 5
  c.conditions.base = _condition("synthetic Zipf(1.1) corpus over 1024 tokens, topic switch "
                                 "every 30 steps, pre-LN, untied embeddings")


def _small(b, c):
  """The `small` study: run config `b`, study config `c`."""
  # Per condition: 5 optimizers x (5 lrs + up to 4 extensions) at seed 0, then seeds 1 and 2
  # at each best rate: 35-55 runs of 200 steps. The rate lives in the optimizer state, so one
  # compile per (condition, optimizer) serves its whole sweep (cache shared by seeds).
  b.model.num_layers, b.model.d_model, b.model.num_heads = 2, 64, 4
  b.seq_len, b.batch_size = 64, 16  # 1024 tokens per step
  b.data.vocab_size = 2048  # Zipf(1.1) over 2048 ids: most embedding rows idle most steps.
  b.data.eval_batches = 8  # 8 x 16 held-out windows (the mixture of the topics seen)
  b.data.synthetic.zipf_exponent = 1.1
  b.data.synthetic.shift = "switch"  # Topic switches every 50 steps: 3 shifts per run.
  b.data.synthetic.shift_every = 50
  b.schedule.warmup_steps = 20
  b.eval_every = b.checkpoint_every = 100
  b.diagnostics.every = 10
  b.diagnostics.window = b.diagnostics.horizon = 25  # Age horizon H of the aging metrics.
  c.token_budget = 200 * 1024  # 200 steps
  c.conditions.base = _condition(
      "synthetic Zipf(1.1) corpus over 2048 tokens, topic switch every 50 steps, pre-LN, "
      "untied embeddings")
  # Post-LN under the same protocol: the heterogeneity comparison over the whole sweep.
  c.conditions.post_ln = _condition("as base with post-LN blocks",
                                    {"model": {"ln_position": "post"}})


def _markov(b, c):
  """The `markov` study: run config `b`, study config `c`."""
  # One GPU: the `controls` protocol and model on a corpus small models LEARN (issue 25). The
  # fresh tokens follow a first-order chain over ranks (data/synthetic.py: with probability
  # 0.9 one of the previous rank's 4 successors, else an iid Zipf(1.1) draw), no copied
  # spans: its exact entropy rate (the floor, 1.97 nats) is 2.06 nats below the per-topic
  # marginal entropy (4.03; uniform 8.32), and the bigram law is what a model must learn.
  # A topic switch relabels ranks as other tokens, so every learnt bigram is wrong after it.
  # Conditions: the shift contrast (switch / none), post-LN (heterogeneity), and width 512 at
  # 8 layers (a model-size axis on the same data: 4 x 256 -> 8 x 512).
  #   python scripts/run_study.py --config=configs/study.py:markov --workdir=studies/markov \
  #       --processes=10
  _controls_base(b, c)
  b.data.synthetic.markov = 0.9
  b.data.synthetic.markov_successors = 4
  b.data.synthetic.copy_prob = 0.0
  # The sweep at seed 0 only, then seeds 1 and 2 at each best rate (the `small` protocol):
  # 2.3x fewer runs than the controls' 3-seed sweeps, so both shift conditions fit one GPU
  # call; --processes above the number of conditions trains one optimizer per process.
  c.sweep_seeds = (0,)
  c.conditions.base = _condition("synthetic Zipf(1.1) rank chain (0.9 to one of 4 successors) "
                                 "over 4096 tokens, topic switch every 250 steps, pre-LN, "
                                 "untied, 4 x 256 dense MHA")
  c.conditions.stationary = _condition("as base, one topic",
                                       {"data": {"synthetic": {"shift": "none"}}})
  c.conditions.post_ln = _condition("as base, post-LN", {"model": {"ln_position": "post"}})
  c.conditions.size_8x512 = _condition(
      "as base, 8 layers x 512 wide (8 heads)",
      {"model": {"num_layers": 8, "d_model": 512, "remat": "full"}})
  c.conditions.size_8x512_stationary = _condition(
      "as size_8x512, one topic",
      {"model": {"num_layers": 8, "d_model": 512, "remat": "full"},
       "data": {"synthetic": {"shift": "none"}}})


def _markov_lion(b, c):
  """The `markov_lion` study: run config `b`, study config `c`."""
  # The Lion controls (issue 25, part 4) on the `markov` corpus: AdamW and Lion only, on a grid
  # twice as fine (ratio sqrt(3) instead of 3), switch vs stationary at 4 x 256 and 8 x 512.
  # Centres: each optimizer's best seed-0 rate of the first `markov` GPU sweep (base, ratio-3
  # grid: AdamW 0.0054 and Lion 0.0009, both on the high edge there, so the extensions run
  # here too). Weight decay: the paper's scaling (Chen et al. 2023, arXiv 2302.06675):
  # Lion's 0.6 is 6x AdamW's 0.1 (optimizers.default_config), and optax multiplies both by the
  # rate, so at rates 6x apart (AdamW / Lion) the decoupled decay per step lr * wd is the same.
  #   python scripts/run_study.py --config=configs/study.py:markov_lion --workdir=studies/lion \
  #       --processes=4
  _markov(b, c)
  c.optimizers = ("adamw", "lion")
  c.learning_rates.adamw, c.learning_rates.lion = 0.0054, 0.0009
  c.lr_multipliers = _FINE_MULTIPLIERS
  del c.conditions["post_ln"]  # the size and shift axes only


def _controls(b, c):
  """The `controls` study: run config `b`, study config `c`."""
  # One GPU, every control and architecture condition (issues 10 and 11) under the full
  # protocol: 12 conditions x 5 optimizers x (5 rates + extensions) x 3 seeds, 900+ runs of
  # 1000 steps (4M tokens each) of a 4-layer d=256 GPT. What it can learn: the topic's
  # unigram law (uniform 8.32 nats -> marginal entropy 5.39) and the copied spans (entropy
  # floor 1.73 with copy_prob 0.9). Pilots on one H100 (AdamW, BENCHMARKS.md lease E): with
  # copy_prob 0.5 no rate left the unigram level in 5000 steps (best 5.35); with 0.9 the
  # loss falls below it from about step 500 (5.33 at 500, 5.27 at 1000, 5.15 at 3000), so
  # optimizers differ in how fast they pick up context, not only the unigram law. Every
  # seed runs at every grid point (sweep_seeds = seeds), so the best rate is chosen on the
  # mean over 3 seeds and a whole sweep (5 rates x 3 seeds) is ONE stacked step: one compile
  # per (condition, optimizer), plus one per grid extension. --processes overlaps the
  # conditions' compiles:
  #   python scripts/run_study.py --config=configs/study.py:controls --workdir=studies/controls \
  #       --processes=3
  _controls_base(b, c)
  # Primary first: the order the processes of --processes take them in.
  c.conditions.base = _condition("synthetic Zipf(1.1) over 4096 tokens, 90% copied spans, "
                                 "topic switch every 250 steps, pre-LN, untied, 4 x 256 "
                                 "dense MHA")
  # Heterogeneity (arXiv 2502.00213).
  c.conditions.post_ln = _condition("as base, post-LN", {"model": {"ln_position": "post"}})
  # Non-stationarity: none / switch (base) / drift.
  c.conditions.stationary = _condition("as base, one topic",
                                       {"data": {"synthetic": {"shift": "none"}}})
  c.conditions.drift = _condition("as base, topics drift continuously",
                                  {"data": {"synthetic": {"shift": "drift"}}})
  # Sparsity: tied embeddings (every embedding row's grad dense) and the Zipf exponent.
  c.conditions.tied = _condition("as base, tied embeddings", {"model": {"tie_embeddings": True}})
  c.conditions.zipf_0_8 = _condition("as base, Zipf(0.8)",
                                     {"data": {"synthetic": {"zipf_exponent": 0.8}}})
  c.conditions.zipf_1_4 = _condition("as base, Zipf(1.4)",
                                     {"data": {"synthetic": {"zipf_exponent": 1.4}}})
  # Explicit sparsity and depth (issue 11).
  c.conditions.no_weight_decay = _condition("as base, weight decay 0",
                                            {"optimizer": {"weight_decay": 0.0}})
  c.conditions.gqa = _condition("as base, GQA with 2 key/value heads",
                                {"model": {"num_kv_heads": 2}})
  c.conditions.moe = _condition(
      "as base, 4 experts top-1 in every block (active parameters equal to base)",
      {"model": {"num_experts": 4, "moe_top_k": 1}})
  # Depth scaling at equal width: 2 / 4 (base) / 8 layers. 8 layers recompute activations in
  # the backward pass ('full' remat: the same math, a quarter of the activation memory) so
  # that 15 stacked runs fit in one process's share of the GPU (--processes).
  c.conditions.depth_2 = _condition("as base, 2 layers", {"model": {"num_layers": 2}})
  c.conditions.depth_8 = _condition("as base, 8 layers",
                                    {"model": {"num_layers": 8, "remat": "full"}})


def _wikitext103_offline(b, c):
  """The `wikitext103_offline` study: run config `b`, study config `c`."""
  # Real text offline (issue 10): TRAINED ON THE WIKITEXT-103 VALIDATION SPLIT, evaluated on
  # held-out test articles (the first half selects the rate, the second reports), because only
  # those two splits exist here; label every result so. --config.base.data.path=<folder>.
  # ~250k training tokens (SentencePiece 4096): 400 steps of 32 x 128 are ~6.5 passes, enough
  # to see which optimizers overfit first; the validation split picks the rate.
  b.data = data_lib.default_config("wikitext-103-offline")
  b.model.num_layers, b.model.d_model, b.model.num_heads = 4, 256, 8
  b.model.dtype = "bfloat16"
  b.model.max_len = b.seq_len = 128
  b.batch_size = 32
  b.schedule.warmup_steps = 40
  b.eval_every = 100
  b.checkpoint_every = 400
  b.sync_every = 200
  b.diagnostics.every = 20
  b.diagnostics.window = b.diagnostics.horizon = 40
  b.probes.every = 200
  c.token_budget = 400 * 32 * 128  # 400 steps, 1.6M tokens per run
  c.sweep_seeds = c.seeds = (0, 1, 2)
  c.stack_runs = 15  # the whole 5-rate x 3-seed sweep in one vmapped step
  c.analyze_layers = True
  c.conditions.base = _condition("WikiText-103 text (trained on its validation split, "
                                 "evaluated on held-out test articles), 4 x 256, pre-LN")
  c.conditions.tied = _condition("as base, tied embeddings", {"model": {"tie_embeddings": True}})


def _wikitext2_sizes(b, c):
  """The `wikitext2_sizes` study: run config `b`, study config `c`."""
  # Real text beyond 200k words, and a model-size axis (issue 25): trained on WikiText-2's train
  # split (3.3M SentencePiece-8192 tokens; local files, docs/DATA.md), rates chosen on its
  # valid split, numbers reported on its test split (both WikiText-103's held-out articles).
  # 600 steps of 16 x 256 = 2.46M tokens, under one pass over the training text (0.74 epochs):
  # no window is seen twice, so no size can memorise (the report gives train - test).
  # Sizes: 4 x 256, 8 x 512 and 12 x 768 (GPT-2 small's blocks; vocabulary 8192, not 50257).
  # One 5-run AdamW stack alone on an H100 (BENCHMARKS.md lease N) peaks at 3.8 / 12.3 / 33.1 GiB
  # for the three sizes and takes 1 / 2 / 3 minutes, nearly all of it compiling: the study is
  # compile-bound, so run the two smaller sizes as 5 processes (0.18 of the GPU each) and
  # 12 x 768 as 2 (0.45 each), into the same workdir:
  #   XLA_PYTHON_CLIENT_MEM_FRACTION=0.18 python scripts/run_study.py \
  #       --config=configs/study.py:wikitext2_sizes --workdir=studies/wt2 \
  #       --config.base.data.path=<folder with wiki.*.tokens> --processes=5 \
  #       --config.only_conditions="('base','size_8x512')"
  #   XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python scripts/run_study.py ... --processes=2 \
  #       --config.only_conditions="('size_12x768',)"
  # In the study itself (docs/study_gpu_wt2_sizes, H100) a 12 x 768 sweep stack took about 5 min
  # per optimizer at 2 processes, and the layer scores (analyze_layers) about 1 min per
  # (size, optimizer): plan one 12 x 768 optimizer (sweep, then seeds) per 10-minute call.
  b.data = data_lib.default_config("wikitext-2-local")
  b.model.num_layers, b.model.d_model, b.model.num_heads = 4, 256, 8
  b.model.dtype = "bfloat16"
  b.batch_size = 16  # 4096 tokens per step (seq_len 256 from the `small` run preset)
  b.schedule.warmup_steps = 40
  b.eval_every = 200
  b.checkpoint_every = 600
  b.sync_every = 200
  b.diagnostics.every = 30  # 20 diagnostic points per run
  b.diagnostics.window = b.diagnostics.horizon = 30
  b.probes.every = 300
  c.token_budget = 600 * 16 * 256
  # The default protocol, sweep at seed 0 (one 5-rate stack per optimizer and size) then seeds
  # 1 and 2 at each best rate: GPT-2-small-sized stacks are the device time, and 5 rates x 3
  # seeds would triple it.
  c.stack_runs = 5
  c.lr_grid_max_extensions = 4
  c.lr_grid_extension_points = 2
  c.analyze_layers = True
  c.conditions.base = _condition("WikiText-2 train (3.3M tokens), 4 x 256, pre-LN, untied")
  c.conditions.size_8x512 = _condition(
      "as base, 8 layers x 512 wide (8 heads)",
      {"model": {"num_layers": 8, "d_model": 512, "num_heads": 8}})
  # Recomputed activations ('full' remat: the same math) keep a 5-run stack in one process's
  # share of the GPU.
  c.conditions.size_12x768 = _condition(
      "as base, 12 layers x 768 wide (12 heads): GPT-2 small's blocks",
      {"model": {"num_layers": 12, "d_model": 768, "num_heads": 12, "remat": "full"}})
  # Post-LN blocks at the two smaller sizes (issue 25 part 5, arXiv 2502.00213): the same data
  # and budget with a different gradient heterogeneity, so SGD's gap to AdamW / SignSGD can be
  # read against the measured heterogeneity at a fixed size (plots/gap_vs_heterogeneity.png):
  #   XLA_PYTHON_CLIENT_MEM_FRACTION=0.18 python scripts/run_study.py ... --processes=5 \
  #       --config.only_conditions="('post_ln','post_ln_8x512')"
  c.conditions.post_ln = _condition("as base, post-LN", {"model": {"ln_position": "post"}})
  c.conditions.post_ln_8x512 = _condition(
      "as size_8x512, post-LN",
      {"model": {"num_layers": 8, "d_model": 512, "num_heads": 8, "ln_position": "post"}})


def _wikitext2_lion(b, c):
  """The `wikitext2_lion` study: run config `b`, study config `c`."""
  # The Lion controls (issue 25, part 4) on real text: `wikitext2_sizes` with AdamW and Lion
  # only, on a grid twice as fine (ratio sqrt(3) instead of 3) at 4 x 256 and 8 x 512, so that
  # the best-rate ratio AdamW / Lion is resolved to a factor sqrt(3) per side, not 3.
  # Centres: the best rates at 4 x 256 in docs/study_gpu_wt2_sizes (AdamW 0.0018, Lion 0.0003;
  # Lion's 8 x 512 best 0.0001 is this grid's low edge, so extensions run there). Every other
  # point is a point of that study's grid with the same run config (Lion's weight decay 0.6 =
  # 6x AdamW's, the paper's scaling, as there), so `--from_archive=docs/study_gpu_wt2_sizes`
  # reuses those runs and trains only the new rates:
  #   XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 python scripts/run_study.py \
  #       --config=configs/study.py:wikitext2_lion --workdir=studies/wt2_lion \
  #       --config.base.data.path=/tmp/wt2 --from_archive=docs/study_gpu_wt2_sizes --processes=4
  _wikitext2_sizes(b, c)
  c.optimizers = ("adamw", "lion")
  c.learning_rates.adamw, c.learning_rates.lion = 0.0018, 0.0003
  c.lr_multipliers = _FINE_MULTIPLIERS
  for name in ("size_12x768", "post_ln", "post_ln_8x512"):  # pre-LN at 4x256 and 8x512 only
    del c.conditions[name]  # (device time: a 12 x 768 stack costs 5 min)


def _wikitext103(b, c):
  """The `wikitext103` study: run config `b`, study config `c`."""
  # A 6-layer d=256 GPT on WikiText-103 (SentencePiece 8192), bf16, sharded over all devices.
  b.data.name = "wikitext-103"
  b.data.vocab_size = 8192
  b.model.dtype = "bfloat16"
  b.mesh.data, b.mesh.fsdp = -1, 1  # Data-parallel over every device (set fsdp > 1 to shard).
  b.seq_len, b.batch_size = 256, 64  # 16384 tokens per step
  b.schedule.warmup_steps = 200
  b.log_every = 1
  b.eval_every = b.checkpoint_every = 1000
  b.diagnostics.every = 25
  c.token_budget = 4000 * 64 * 256  # 4000 steps, 65.5M tokens per run
  c.conditions.base = _condition("WikiText-103, pre-LN, untied embeddings")
  c.conditions.tied = _condition("as base with tied input/output embeddings",
                                 {"model": {"tie_embeddings": True}})
  c.conditions.post_ln = _condition("as base with post-LN blocks",
                                    {"model": {"ln_position": "post"}})


# name -> (its base run preset in jaxopt_study/presets.py, the function that sets it up)
PRESETS = {
    "tiny": ("tiny", _tiny),
    "small": ("tiny", _small),
    "controls": ("small", _controls),
    "markov": ("small", _markov),
    "markov_lion": ("small", _markov_lion),
    "wikitext103_offline": ("small", _wikitext103_offline),
    "wikitext103": ("small", _wikitext103),
    "wikitext2_sizes": ("small", _wikitext2_sizes),
    "wikitext2_lion": ("small", _wikitext2_lion),
}
