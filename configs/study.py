"""The optimizer study: all five optimizers under identical conditions, a seed and lr grid each.

  python scripts/run_study.py --config=configs/study.py:tiny --workdir=studies/tiny
  python scripts/run_study.py --config=configs/study.py:small --workdir=studies/small
  python scripts/run_study.py --config=configs/study.py:wikitext103 --workdir=studies/wt103
  python scripts/make_report.py studies/small        # the report alone, from the run dirs

  tiny         CI / quickstart: tiny model, 1 seed, 1 lr, 80 steps (~2-3 min on 2 CPU cores).
  small        the real CPU study: synthetic Zipf corpus with topic switches, 2 seeds, lr x
               {1/3, 1, 3}, plus a post-LN condition at the default lr (~25 min on 2 CPU cores).
  wikitext103  GPU/TPU: WikiText-103, a 6-layer d=256 GPT, sharded over all devices.

The study expands into runs condition x optimizer x learning rate x seed, each in its own workdir
``WORKDIR/runs/<condition>/<optimizer>/lr=<lr>/seed=<seed>``. Every run of a condition shares the
base config below except the optimizer block and its learning rate: the same seed gives the
same initial parameters and the same data order for every optimizer, and every run has the same
token budget. Fields can be overridden on the command line like any config:
``--config.seeds=(0,1,2) --config.lr_multipliers=(0.5,1,2) --config.base.model.d_model=128``.
"""

import ml_collections

from jaxopt_study import optimizers
from jaxopt_study import presets

OPTIMIZERS = optimizers.NAMES
PRESETS = ("tiny", "small", "wikitext103")


def _condition(description, overrides=None, lr_multipliers=(), seeds=()):
  c = ml_collections.ConfigDict()
  c.description = description  # One line for the report.
  # Partial config applied on top of `base` (nested like the run config), e.g.
  # {'model': {'ln_position': 'post'}}; every key must exist in the run config.
  c.overrides = ml_collections.ConfigDict(overrides or {})
  # Restrict this condition to a subset of the study's lr multipliers / seeds; () = all.
  c.lr_multipliers = tuple(lr_multipliers)
  c.seeds = tuple(seeds)
  return c


def get_config(preset=None) -> ml_collections.ConfigDict:
  """The study config of `preset` (default 'tiny')."""
  preset = preset or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for configs/study.py:PRESET; valid: {PRESETS}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.name = preset  # Study name (report title); the workdir is given on the command line.

  # ---------------------------------------------------------------- the shared run config
  # configs/default.py's preset; everything a run needs except the optimizer block, which the
  # runner sets from configs.default.OPTIMIZER_BLOCKS, and num_steps, set from token_budget.
  base_preset = {"tiny": "tiny", "small": "tiny", "wikitext103": "small"}[preset]
  c.base = b = presets.get_config(base_preset)
  b.log_every = 1  # Every step's train loss: the spike rule needs a 128-step history.
  b.keep_checkpoints = 1  # One checkpoint per run is enough to resume (keeps the study small).
  # The report uses the global, per-kind and per-layer aggregates; per-tensor ('/param=') series
  # multiply the metrics (and the compile time) several-fold. True puts them in TensorBoard.
  b.diagnostics.per_param = False

  # ---------------------------------------------------------------- what varies
  c.optimizers = OPTIMIZERS  # Names in configs.default.OPTIMIZER_BLOCKS.
  # Centre of each optimizer's lr grid: its literature default (configs/default.py).
  c.learning_rates = ml_collections.ConfigDict(
      {o: optimizers.default_config(o).learning_rate for o in OPTIMIZERS})
  # Per-optimizer changes of the optimizer block besides the lr, e.g. {'signsgd': {'momentum':
  # 0.9}} for signum; empty: the defaults of configs/default.py.
  c.optimizer_overrides = ml_collections.ConfigDict()
  # Grid: lr = learning_rates[opt] * multiplier (rounded to 3 significant digits).
  c.lr_multipliers = (1 / 3, 1.0, 3.0)
  c.seeds = (0, 1)  # Each seed fixes initial parameters and data order (same for every optimizer).
  # Tokens per run, the same for every run: num_steps = token_budget // (batch_size * seq_len).
  c.token_budget = 0
  # Conditions: named partial configs over `base` (the order is the report's order; the first
  # is the primary condition used for the literature checks).
  c.conditions = ml_collections.ConfigDict()
  c.only_conditions = ()  # Run only these conditions (names); () = all.

  # ---------------------------------------------------------------- runner
  c.retry_failed = True  # Re-run runs recorded as 'failed' (exceptions); diverged runs are kept.
  # JAX's persistent compilation cache ($JAXOPT_STUDY_CACHE or ~/.cache/jaxopt_study, then
  # jax_compilation_cache/): runs that differ only in seed or learning rate share their compiled
  # steps (the peak rate lives in the optimizer state, optimizers.build).
  c.compilation_cache = True
  c.make_report = True  # scripts/run_study.py writes the report after the runs.

  # ---------------------------------------------------------------- report (study/report.py)
  c.report = r = ml_collections.ConfigDict()
  r.spike_window = 128  # Loss-spike rule (Levanter/MaxText): history of this many steps...
  r.spike_sigma = 6.0  # ...and a spike is a loss above its mean + spike_sigma * std.
  r.spike_min_history = 8  # Logged points the history must hold before a spike can count.
  r.shift_pre_window = 20  # Steps before a shift whose mean train loss is the pre-shift level.
  r.shift_smooth = 10  # Trailing-mean window (steps) of the post-shift train loss.
  r.shift_tolerance = 0.02  # Recovered when the smoothed loss <= pre-level * (1 + tolerance).
  r.rare_buckets = 1  # Rarest frequency buckets averaged as the 'rare token' loss.
  r.frequent_buckets = 1  # Most frequent buckets averaged as the 'frequent token' loss.
  r.tail_fraction = 0.25  # Staleness metrics: mean over the last 25% of each run.
  r.keep_param_metrics = False  # Also put '/param=' series in results/scalars_long.csv (large).

  if preset == "tiny":
    # Minutes on 2 CPU cores for all five optimizers: 1 seed, the default lr, 80 steps.
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
    c.seeds = (0,)
    c.token_budget = 80 * 1024  # 80 steps
    c.report.shift_pre_window = 10
    c.report.shift_smooth = 5
    c.conditions.base = _condition("synthetic Zipf(1.1) corpus over 1024 tokens, topic switch "
                                   "every 30 steps, pre-LN, untied embeddings")
  elif preset == "small":
    # 5 optimizers x 3 lrs x 2 seeds = 30 runs + 5 post-LN runs: 30.5 min on 2 CPU cores when
    # every (optimizer, lr) compiled its own steps; the rate now lives in the optimizer state,
    # so one compile per (condition, optimizer) serves its whole sweep (cache shared by seeds).
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
    c.lr_multipliers = (1 / 3, 1.0, 3.0)
    c.seeds = (0, 1)
    c.token_budget = 200 * 1024  # 200 steps
    c.conditions.base = _condition(
        "synthetic Zipf(1.1) corpus over 2048 tokens, topic switch every 50 steps, pre-LN, "
        "untied embeddings")
    # Post-LN at the default lr and seed 0 only: the heterogeneity comparison, not a sweep.
    c.conditions.post_ln = _condition(
        "as base with post-LN blocks", {"model": {"ln_position": "post"}},
        lr_multipliers=(1.0,), seeds=(0,))
  elif preset == "wikitext103":
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
    c.lr_multipliers = (1 / 3, 1.0, 3.0)
    c.seeds = (0, 1)
    c.token_budget = 4000 * 64 * 256  # 4000 steps, 65.5M tokens per run
    c.conditions.base = _condition("WikiText-103, pre-LN, untied embeddings")
    c.conditions.tied = _condition("as base with tied input/output embeddings",
                                   {"model": {"tie_embeddings": True}}, lr_multipliers=(1.0,))
    c.conditions.post_ln = _condition("as base with post-LN blocks",
                                      {"model": {"ln_position": "post"}}, lr_multipliers=(1.0,))
  return c
