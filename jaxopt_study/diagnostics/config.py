"""Default diagnostics config (``config.diagnostics``). Every field is documented inline."""

from __future__ import annotations

import ml_collections

from jaxopt_study.diagnostics.families import FAMILIES


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Master switch. False: init() allocates nothing but a step counter; update() returns ({}, state).
  c.enabled = True
  # Run the full variant (all metrics) when step % every == 0; see diagnostics.mode_for_step.
  c.every = 10

  # --- metric families: one switch per entry of families.FAMILIES (each family's metrics and
  # formulas are in its module docstring). False: its metrics are absent AND its state leaves
  # are not allocated. sparsity: zero / small-gradient fractions, update frequency, activation,
  # embedding rows; drift: cos(g_t, g_{t-1}), cos(g_t, m_{t-1}), relative change, energy ratio;
  # aging: entry ages, second-moment staleness; norms: |theta|, |g|, |u|, |u|/|theta|;
  # heterogeneity: CV and max/min over parameter blocks (arXiv 2502.00213); sign: update-sign
  # flips, sign(u) vs -sign(g) agreement, sign-likeness of u; idle: movement of entries whose
  # gradient is zero this step (update share and mean |u| on idle vs active entries).
  for name in FAMILIES:
    c[name] = True
  # Token-frequency bucket table (needs token_frequencies at init): per-bucket embedding-row
  # metrics and the eval loss by token frequency (frequency.loss_by_frequency).
  c.loss_by_frequency = True
  # Sparsity sub-switches (each costs 4 bytes/param of state).
  c.update_count = True    # per-entry int32 count of steps with an active gradient
  c.update_ema = True      # per-entry float32 EMA of the active indicator

  # --- reporting granularity ---
  c.per_param = True       # emit '.../param=<path>' metrics
  c.per_layer = True       # emit '.../layer=<NN>' metrics (block_<NN> subtrees)
  c.per_kind = True        # emit '.../kind=<kind>' metrics (paths.KIND_RULES)

  # --- thresholds ---
  # An entry is 'active' (received a non-negligible gradient) at a step iff |g| > active_threshold.
  # 0.0 = any non-zero gradient. Drives ages, update counts/EMA, activation, row activity.
  c.active_threshold = 0.0
  # sparsity/small_frac counts entries with |g| <= rel_threshold * rms(g of the same tensor).
  c.rel_threshold = 1e-3

  # --- EMA decays (all EMAs start at 0 and are bias-corrected by 1 - decay^n when reported) ---
  c.update_ema_decay = 0.99    # EMA of the active indicator (sparsity/update_freq_ema)
  c.sq_ema_decay = 0.9         # s_t = short-window EMA of g^2 per entry (aging staleness)
  c.energy_short_decay = 0.9   # short EMA of ||g||^2 per tensor (drift/energy_ratio numerator)
  c.energy_long_decay = 0.99   # long EMA of ||g||^2 per tensor (drift/energy_ratio denominator)

  # --- windows ---
  c.window = 100   # W: sparsity/active_frac_window = share of entries active in the last W steps
  c.horizon = 100  # H: aging/*_older_than_H use entries whose last active step is >= H steps ago

  # --- token-frequency buckets (embedding rows and loss_by_frequency) ---
  c.num_freq_buckets = 10
  # 'equal_mass': tokens sorted by frequency, each bucket ~1/num_freq_buckets of the training
  #   tokens (Kunstner et al. 2024); 'equal_count': equal numbers of token types;
  #   'log': log-spaced frequency edges. Bucket 00 = most frequent, last = rarest.
  c.bucket_scheme = "equal_mass"

  # --- quantiles / histograms ---
  c.quantiles = (0.1, 0.5, 0.9)     # reported as scalars '<name>_q10', '_q50', '_q90'
  c.quantile_sample_size = 65536    # quantiles use a strided subsample of <= this (+#tensors)
  # 1-d histogram samples: this many evenly spaced quantiles of the entries (<= 23170).
  c.histogram_size = 1024

  # --- per-entry counters (last active step, update count, update EMA, g^2 EMA) ---
  # 0: kept for every parameter entry (exact; ~16 B/param of state read and written at every
  # step). N > 0: kept on a fixed strided grid of at most ~N entries spread over the tensors in
  # proportion to their sizes (diagnostics.entry_strides), as the quantiles already are: the
  # per-entry update_freq*, active_frac_window, ages and log_staleness then estimate the
  # all-entry values from that sample, and the per-step cost no longer grows with the model.
  # Embedding-row and per-expert statistics stay exact (their own counters) either way.
  c.entry_sample_size = 0

  # --- storage ---
  c.prev_grad_dtype = "float32"     # dtype of the stored g_{t-1} (drift): float32 or bfloat16
  return c
