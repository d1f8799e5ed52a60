"""Everything the study's runs share; the per-optimizer configs change only `config.optimizer`.

Presets are chosen with `:PRESET` after the file name:

  python -m jaxopt_study.main --config=configs/adamw.py:tiny --workdir=runs/adamw_tiny
  python -m jaxopt_study.main --config=configs/adamw.py:gpt2_small --workdir=runs/adamw_gpt2 \
      --config.data.name=wikitext-103

  tiny        2 layers, d=64, seq 64, synthetic corpus: trains in about a minute on 2 CPU cores.
  small       6 layers, d=256, seq 256: a real signal on one GPU in minutes.
  gpt2_small  12 layers, d=768, 12 heads, seq 1024, vocab 50304 (GPT-2 124M as in nanoGPT), bf16.

Any field can be overridden on the command line, e.g. `--config.optimizer.learning_rate=3e-4`.
"""

import ml_collections

from jaxopt_study import data as data_lib
from jaxopt_study import diagnostics as diagnostics_lib

PRESETS = ("tiny", "small", "gpt2_small")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """Returns the shared config for `preset` (default 'tiny'); the optimizer block is AdamW."""
  preset = preset or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for configs/*.py:PRESET; valid: {PRESETS}")
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
  # Untied by default: tied output weights make every embedding row's gradient dense.
  m.tie_embeddings = False
  m.dtype = "float32"  # Compute dtype; parameters stay float32. 'bfloat16' on GPU/TPU.
  m.attention_impl = None  # None lets XLA choose; 'cudnn' forces flash attention on GPU.
  m.remat = "none"  # 'none' | 'dots' | 'full': recompute activations to save memory.
  m.vocab_multiple = 64  # Pad the embedding/vocab to a multiple of this (matmul-friendly).

  # ------------------------------------------------------------------ data (data/)
  config.data = data_lib.default_config()  # Source, tokenizer, cache; fields documented there.
  config.seq_len = 64  # Tokens per training window (windows hold seq_len + 1 tokens).
  config.batch_size = 16  # Global batch in sequences, split over the mesh's data x fsdp.
  config.num_steps = 300  # Training steps; tokens seen = num_steps * batch_size * seq_len.

  # ------------------------------------------------------------------ optimizer (optimizers.py)
  config.optimizer = adamw_block()
  config.schedule = s = ml_collections.ConfigDict()
  s.name = "cosine"  # 'cosine' (warmup then cosine decay) or 'constant' (warmup then flat).
  s.warmup_steps = 30  # Linear warmup from 0 (about 1-10% of training in the literature).
  s.min_lr_ratio = 0.1  # Cosine ends at 10% of the peak rate (Chinchilla, nanoGPT).

  # ------------------------------------------------------------------ mesh (sharding.py)
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data-parallel axis size; -1: all devices not used by fsdp.
  config.mesh.fsdp = 1  # Parameters/optimizer state sharded over this axis (ZeRO-3 style).

  # ------------------------------------------------------------------ loop (train.py)
  config.log_every = 10  # Steps between train-metric writes (the only per-step host sync).
  config.eval_every = 100  # Steps between evaluations on the validation split.
  config.checkpoint_every = 100  # Steps between orbax checkpoints (and always at the end).
  config.keep_checkpoints = 2  # Checkpoints kept; older ones are deleted.
  config.prefetch = 2  # Batches put on devices ahead of use.
  config.inject_nan_at_step = -1  # Fault injection (tests): NaN loss and grads at this step.

  # ------------------------------------------------------------------ diagnostics/
  config.diagnostics = diagnostics_lib.default_config()  # Families, cadence; documented there.

  if preset == "small":
    m.num_layers, m.d_model, m.num_heads, m.max_len = 6, 256, 8, 256
    config.seq_len, config.batch_size, config.num_steps = 256, 64, 2000
    s.warmup_steps = 100
    config.eval_every = config.checkpoint_every = 500
  elif preset == "gpt2_small":
    m.num_layers, m.d_model, m.num_heads, m.max_len = 12, 768, 12, 1024
    m.dtype = "bfloat16"
    config.data.vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64 (nanoGPT).
    config.seq_len, config.batch_size, config.num_steps = 1024, 32, 20000
    s.warmup_steps = 700
    config.log_every, config.eval_every, config.checkpoint_every = 50, 1000, 1000
  return config


# Optimizer blocks. Each per-optimizer config file replaces `config.optimizer` with one of these,
# so runs differ in nothing else.


def _common(name, learning_rate, weight_decay, clip_norm=1.0):
  o = ml_collections.ConfigDict()
  o.name = name  # Key into optimizers.OPTIMIZERS.
  o.learning_rate = learning_rate  # Peak rate of the schedule.
  o.weight_decay = weight_decay  # Decoupled: theta -= lr * wd * theta on masked leaves.
  o.decay_embeddings = False  # Embeddings undecayed (rare rows would only ever shrink).
  o.clip_norm = clip_norm  # Global-norm clipping before the optimizer; 0 disables.
  return o


def adamw_block():
  # GPT-2/OLMo/MaxText practice: b1 0.9, b2 0.95, wd 0.1, clip 1.0; lr 6e-4 at 124M (GPT-3 paper).
  o = _common("adamw", 6e-4, 0.1)
  o.b1 = 0.9  # First-moment decay.
  o.b2 = 0.95  # Second-moment decay; 0.95 rather than 0.999 for stability at scale.
  o.eps = 1e-8  # Added to sqrt(nu_hat).
  return o


def lion_block():
  # Chen et al. 2023 (arXiv 2302.06675): b1 0.95, b2 0.98 for LMs; lr 3-10x smaller and weight
  # decay 3-10x larger than AdamW, keeping lr * wd about the same. Here 6x both.
  o = _common("lion", 1e-4, 0.6)
  o.b1 = 0.95  # Interpolation between momentum and gradient inside the sign.
  o.b2 = 0.98  # Momentum decay.
  return o


def sgd_momentum_block():
  # SGD needs far larger rates than Adam on transformers; 0.1 with Nesterov momentum 0.9 is a
  # common starting point (Kunstner et al. 2023); the study sweeps it.
  o = _common("sgd_momentum", 0.1, 0.0)
  o.momentum = 0.9  # Heavy-ball coefficient.
  o.nesterov = True  # Nesterov look-ahead.
  return o


def adafactor_block():
  # optax.adafactor defaults (Shazeer & Stern 2018, arXiv 1804.04235): relative step sizes with
  # parameter scaling, decay rate 0.8, update clipping 1.0, no momentum.
  o = _common("adafactor", 1e-2, 0.0)
  o.decay_rate = 0.8  # beta2_t = 1 - t^(-decay_rate).
  o.min_dim_size_to_factor = 128  # Tensors whose 2nd-largest dim is smaller keep a full v.
  o.multiply_by_parameter_scale = True  # Step relative to the parameter's RMS.
  o.clipping_threshold = 1.0  # Block-RMS update clipping d.
  o.momentum = 0.0  # 0: no first moment (the memory-saving original); else its decay.
  return o


def signsgd_block():
  # Bernstein et al. 2018 (arXiv 1802.04434): sign of the gradient (momentum 0) or of its
  # momentum (signum). Steps have Lion's magnitude, so Lion's rate is the starting point.
  o = _common("signsgd", 1e-4, 0.0)
  o.momentum = 0.0  # 0: signSGD; e.g. 0.9: signum.
  return o


OPTIMIZER_BLOCKS = {
    "adamw": adamw_block,
    "lion": lion_block,
    "sgd_momentum": sgd_momentum_block,
    "adafactor": adafactor_block,
    "signsgd": signsgd_block,
}


def with_optimizer(name: str, preset: str | None) -> ml_collections.ConfigDict:
  """The shared config of `preset` with the optimizer block `name`."""
  config = get_config(preset)
  config.optimizer = OPTIMIZER_BLOCKS[name]()
  return config
