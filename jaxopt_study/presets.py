"""The run config of every preset; ``configs/<optimizer>.py`` files change only `config.optimizer`.

Presets are chosen with `:PRESET` after a config file's name:

  python -m jaxopt_study.main --config=configs/adamw.py:tiny --workdir=runs/adamw_tiny
  python -m jaxopt_study.main --config=configs/adamw.py:gpt2_small --workdir=runs/adamw_gpt2 \
      --config.data.name=wikitext-103

  tiny        2 layers, d=64, seq 64, synthetic corpus: trains in about a minute on 2 CPU cores.
  small       6 layers, d=256, seq 256: a real signal on one GPU in minutes.
  gpt2_small  12 layers, d=768, 12 heads, seq 1024, vocab 50304 (GPT-2 124M as in nanoGPT), bf16.
  gpt2_xl     48 layers, d=1600, 25 heads, seq 1024, vocab 50304 (GPT-2 1.5B; 1.64B untied), bf16
              compute: 19.7 GB of float32 parameters + AdamW moments (26 GB with gradients),
              for FSDP (docs/MULTI_GPU.md).

Any field can be overridden on the command line, e.g. `--config.optimizer.learning_rate=3e-4`.
"""

import ml_collections

from jaxopt_study import data as data_lib
from jaxopt_study import diagnostics as diagnostics_lib
from jaxopt_study import optimizers

def get_config(preset: str | None = None, optimizer: str = "adamw") -> ml_collections.ConfigDict:
  """The run config of `preset` (default 'tiny') with `optimizer`'s default block."""
  preset = preset or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for configs/*.py:PRESET; valid: "
                     f"{tuple(PRESETS)}")
  config = ml_collections.ConfigDict()
  config.preset = preset
  config.seed = 0  # Fixes the initial parameters and the data order: same seed, same start.

  # ------------------------------------------------------------------ model (models/gpt.py)
  config.model = m = ml_collections.ConfigDict()
  m.num_layers = 2  # Transformer blocks.
  m.d_model = 64  # Residual width.
  m.num_heads = 4  # Query heads; head_dim = d_model // num_heads.
  m.num_kv_heads = 0  # Key/value heads for grouped-query attention; 0 means num_heads (MHA).
  m.mlp_ratio = 4  # MLP hidden width = mlp_ratio * d_model (GPT-2).
  m.max_len = 64  # Learned position embeddings; sequences may not be longer.
  m.dropout_rate = 0.0  # 0: modern LM pre-training practice (nanoGPT, OLMo) at these scales.
  m.ln_position = "pre"  # 'pre' (GPT-2) or 'post'; post-LN raises gradient heterogeneity.
  # Biases in the attention and MLP projections and the LayerNorms (GPT-2). False: none, as in
  # nanoGPT's bench.py (bias=False) and most recent LMs; MoE experts keep theirs.
  m.use_bias = True
  # Untied by default: tied output weights make every embedding row's gradient dense.
  m.tie_embeddings = False
  m.dtype = "float32"  # Compute dtype; parameters stay float32. 'bfloat16' on GPU/TPU.
  # "auto": jax picks (cuDNN flash attention on GPU where it applies); "xla" or "cudnn" force one.
  m.attention_impl = "auto"
  m.remat = "none"  # 'none' | 'dots' | 'full': recompute activations to save memory.
  m.vocab_multiple = 64  # Pad the embedding/vocab to a multiple of this (matmul-friendly).
  # Mixture of experts (models/moe.py): 0 = dense MLP. E experts of width mlp_ratio * d_model,
  # so top-1 routing keeps the active parameters of the dense model.
  m.num_experts = 0
  m.moe_top_k = 1  # Experts per token: 1 (Switch) or 2 (GShard, gates renormalised).
  # Slots per expert and sequence = ceil(factor * top_k * seq_len / num_experts); tokens over
  # capacity get a zero MLP output (residual only). 1.25: Switch's training value.
  m.moe_capacity_factor = 1.25
  m.moe_every = 1  # MoE MLP in blocks i with i % moe_every == moe_every - 1 (2: every other).
  m.moe_aux_loss_coef = 0.01  # Load-balancing loss weight (Switch's alpha = 0.01).

  # ------------------------------------------------------------------ data (data/)
  config.data = data_lib.default_config()  # Source, tokenizer, cache; fields documented there.
  config.seq_len = 64  # Tokens per training window (windows hold seq_len + 1 tokens).
  config.batch_size = 16  # Global batch in sequences, split over the mesh's data x fsdp.
  config.num_steps = 300  # Training steps; tokens seen = num_steps * batch_size * seq_len.

  # ------------------------------------------------------------------ optimizer (optimizers.py)
  config.optimizer = optimizers.default_config(optimizer)  # Fields: optimizers.py `_common`.
  config.schedule = s = ml_collections.ConfigDict()
  s.name = "cosine"  # 'cosine' (warmup then cosine decay) or 'constant' (warmup then flat).
  s.warmup_steps = 30  # Linear warmup from 0 (about 1-10% of training in the literature).
  s.min_lr_ratio = 0.1  # Cosine ends at 10% of the peak rate (Chinchilla, nanoGPT).

  # ------------------------------------------------------------------ mesh (sharding.py)
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data-parallel axis size; -1: all devices not used by fsdp.
  config.mesh.fsdp = 1  # Parameters/optimizer state sharded over this axis (ZeRO-3 style).

  # ------------------------------------------------------------------ loop (train.py)
  config.log_every = 10  # Steps between train-metric records (kept on the device until a sync).
  # Steps between host syncs: write the buffered metrics, check for divergence. Syncing is
  # what stalls a GPU's queue, so it is rare; recording (log_every) is not.
  config.sync_every = 100
  config.eval_every = 100  # Steps between evaluations on every eval split of the data.
  config.checkpoint_every = 100  # Steps between orbax checkpoints (and always at the end).
  config.keep_checkpoints = 2  # Checkpoints kept; older ones are deleted.
  config.prefetch = 2  # Batches put on devices ahead of use.
  # Compile the step variants (diagnostics modes) and the probes in parallel threads before step
  # 1 (train.precompile: they cost the slowest compile, not the sum). False: one after another,
  # in the main thread, if a GPU library fails under concurrent compiles (BENCHMARKS.md, lease K).
  config.parallel_compile = True
  config.inject_nan_at_step = -1  # Fault injection (tests): NaN loss and grads at this step.

  # ------------------------------------------------------------------ diagnostics/
  config.diagnostics = diagnostics_lib.default_config()  # Families, cadence; documented there.

  # ------------------------------------------------------------------ probes (probes.py)
  # Measured on a fixed probe batch of the parameters after a step (diagnostics must be on).
  config.probes = p = ml_collections.ConfigDict()
  p.enabled = True  # Depth variance, weight sparsity, attention entropy/top-k mass.
  # Steps between probe measurements (and at the end); 0: at every full diagnostics step. Each
  # measurement is a forward pass with explicit attention probabilities and a host write of
  # ~200 scalars, so long or stacked runs measure more rarely than the diagnostics.
  p.every = 0
  p.num_sequences = 8  # Probe batch: the first N windows of the first validation batch.
  p.thresholds = (0.01, 0.1)  # weights/small_frac_<tau>: share of |w| <= tau * rms(w).
  p.top_k = (1, 4)  # attention/top<k>_mass: attention mass on the k largest keys.

  PRESETS[preset](config)
  return config


# ---------------------------------------------------------------------- the presets: changes to
# the defaults above, one function each (the registry PRESETS, below, names them).


def _tiny(config):
  del config  # the defaults


def _small(config):
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.max_len = 6, 256, 8, 256
  config.seq_len, config.batch_size, config.num_steps = 256, 64, 2000
  config.schedule.warmup_steps = 100
  config.eval_every = config.checkpoint_every = 500


def _gpt2_small(config):
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.max_len = 12, 768, 12, 1024
  m.dtype = "bfloat16"
  config.data.vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64 (nanoGPT).
  config.seq_len, config.batch_size, config.num_steps = 1024, 32, 20000
  config.schedule.warmup_steps = 700
  config.log_every, config.eval_every, config.checkpoint_every = 50, 1000, 1000
  # Per-entry counters on ~1M sampled entries (shares to ~0.1%): on all 124M they move 32 B
  # per parameter every step, ~2% of the step on an H100 (BENCHMARKS.md, issue 8).
  config.diagnostics.entry_sample_size = 2 ** 20
  config.probes.every = 100  # a forward with explicit attention: ~1% of the step every 10
  # Per-layer and per-kind aggregates only: /param=<path> adds ~4500 scalars per full step,
  # ~70 ms of host writing while the GPU waits (BENCHMARKS.md, issue 8).
  config.diagnostics.per_param = False


def _gpt2_xl(config):
  _gpt2_small(config)  # its data, loop cadence and diagnostics settings
  m = config.model
  m.num_layers, m.d_model, m.num_heads = 48, 1600, 25
  # Saved activations of 48 layers at seq 1024 are ~9 GB per sequence without remat
  # (Korthikanti et al. 2022: s*h*(34 + 5*a*s/h) bytes a layer); 'dots' keeps the matmuls only.
  m.remat = "dots"
  # 8 sequences per GPU on 4 GPUs (mesh.fsdp=4); the memory plan is scripts/memory_plan.py.


PRESETS = {"tiny": _tiny, "small": _small, "gpt2_small": _gpt2_small, "gpt2_xl": _gpt2_xl}
