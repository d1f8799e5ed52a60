r"""Token-frequency buckets and eval loss by token frequency (Kunstner et al. 2024,
"Heavy-tailed class imbalance and why Adam outperforms gradient descent on language models",
arXiv 2402.19449).

:func:`bucket_table` maps each token id to a bucket, 00 = most frequent, ``num_buckets - 1`` =
rarest, from the training-corpus unigram frequencies p (any non-negative scale):

* ``'equal_mass'`` (default, as in Kunstner et al.): tokens sorted by decreasing p (ties by id);
  token i goes to ``floor(nb * P_before(i))`` (capped at nb-1) with P_before the share of the
  corpus taken by more frequent tokens, so each bucket holds ~1/nb of the training tokens
  (a very frequent token can leave a bucket empty); unseen tokens land in the last bucket.
* ``'equal_count'``: the same order cut into nb groups of ~V/nb token types.
* ``'log'``: nb log-spaced bins between the smallest positive and the largest p (bucket 00 =
  highest frequencies); unseen tokens (p = 0) in the last bucket.

:func:`loss_by_frequency` returns ``sums[b] = sum_{positions with target in b} w * loss`` and
``counts[b] = sum w`` (w = mask, default 1), to be summed over eval batches (and hosts); the
bucket's mean loss is sums / counts (the train loop logs it as
``eval/loss_by_frequency/freq_bucket=BB``, the same naming as every bucketed metric).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def bucket_table(token_frequencies, num_buckets: int = 10,
                 scheme: str = "equal_mass", vocab_size: Optional[int] = None) -> np.ndarray:
  """int32 [V] bucket of each token id (see module docstring). Pads p with 0 up to vocab_size."""
  p = np.asarray(token_frequencies, np.float64).reshape(-1)
  if vocab_size is not None:
    if vocab_size < p.shape[0]:
      raise ValueError(f"vocab_size {vocab_size} < len(token_frequencies) {p.shape[0]}")
    p = np.pad(p, (0, vocab_size - p.shape[0]))
  if np.any(p < 0):
    raise ValueError("token_frequencies must be non-negative")
  nb = int(num_buckets)
  v = p.shape[0]
  order = np.lexsort((np.arange(v), -p))  # decreasing p, ties by id
  out = np.empty(v, np.int32)
  if scheme == "equal_mass":
    total = p.sum()
    ps = p[order] / (total if total > 0 else 1.0)
    before = np.concatenate([[0.0], np.cumsum(ps)[:-1]])
    b = np.minimum(np.floor(before * nb + 1e-9), nb - 1).astype(np.int32)
    b[ps == 0] = nb - 1
    out[order] = b
  elif scheme == "equal_count":
    out[order] = np.minimum(np.arange(v) * nb // v, nb - 1).astype(np.int32)
  elif scheme == "log":
    pos = p[p > 0]
    if pos.size == 0:
      out[:] = nb - 1
    else:
      lo, hi = np.log(pos.min()), np.log(pos.max())
      with np.errstate(divide="ignore"):
        lp = np.log(np.where(p > 0, p, pos.min()))
      frac = (hi - lp) / (hi - lo) if hi > lo else np.zeros(v)
      out[:] = np.minimum(np.floor(frac * nb), nb - 1).astype(np.int32)
      out[p == 0] = nb - 1
  else:
    raise ValueError(f"unknown bucket scheme {scheme!r}")
  return out


def loss_by_frequency(per_token_loss, targets, table: Any, mask=None,
                      num_buckets: Optional[int] = None):
  """(sums [nb], counts [nb]) of the loss bucketed by the target token's training frequency.

  Args:
    per_token_loss: float [...] loss at each position (e.g. [B, T]).
    targets: int [...] target token ids, same shape.
    table: a diag_state (uses its ``token_bucket``) or an int [V] bucket table.
    mask: optional [...] weights (0 = padding).
    num_buckets: defaults to max(table) + 1 (static when table is concrete); pass it under jit
      when the table is traced.
  """
  bucket = getattr(table, "token_bucket", table)
  if bucket is None:
    raise ValueError("no token-frequency bucket table: pass token_frequencies to "
                     "diagnostics.init (with cfg.loss_by_frequency = True)")
  if num_buckets is None:
    num_buckets = int(np.max(np.asarray(bucket))) + 1
  loss = jnp.asarray(per_token_loss, jnp.float32)
  w = jnp.ones_like(loss) if mask is None else jnp.asarray(mask, jnp.float32)
  seg = jnp.asarray(bucket)[jnp.asarray(targets)]
  sums = jax.ops.segment_sum((loss * w).reshape(-1), seg.reshape(-1), num_segments=num_buckets)
  counts = jax.ops.segment_sum(w.reshape(-1), seg.reshape(-1), num_segments=num_buckets)
  return sums, counts
