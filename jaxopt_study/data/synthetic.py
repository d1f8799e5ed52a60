"""An embedded synthetic corpus with ground-truth sparsity and non-stationarity.

The corpus needs no network and emits token ids directly (its vocabulary is the model's). It
controls the two properties the study is about:

* **Sparsity.** Token frequencies follow a Zipf law over ranks,

      p(r) = r^(-s) / H_{V,s},      r = 1..V,      H_{V,s} = sum_{r=1}^{V} r^(-s),

  with exponent ``s`` and vocabulary size ``V``: a few tokens are everywhere, most are rare, so
  most embedding rows get a zero gradient on most steps.

* **Non-stationarity.** There are ``K`` topics. Topic ``k`` is a seeded permutation
  ``perm_k: rank -> token id``, so topic ``k`` gives token ``perm_k[r]`` the probability
  ``p(r)``: the Zipf *shape* is the same for every topic, *which* tokens are frequent is not.
  The topic of a step follows a schedule (``E = shift_every``):

      'none':    w(step) = e_0
      'switch':  w(step) = e_k,                          k = (step // E) mod K
      'drift':   w(step) = (1 - a) e_k + a e_{k+1 mod K},  a = (step mod E) / E

  and the distribution of every token of the batch at ``step`` is the mixture

      q_step(v) = sum_k w_k(step) p_k(v),      p_k(perm_k[r]) = p(r).

To give a transformer something to learn without touching the marginals, each window is cut into
spans of random length; a span is, with probability ``copy_prob``, a copy of an earlier span of
the same window (induction-style), otherwise fresh iid draws from ``q_step``. The span layout is
drawn independently of the token values and every copied position ultimately points at an iid
draw, so every position of every window has the exact marginal ``q_step``:
``token_probs_at(step)`` is the ground truth, not an estimate.

Batches are pure functions of ``(seed, step)``: ``rng = np.random.default_rng([seed, step])``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

SHIFTS = ("none", "switch", "drift")

# Seed-sequence tags of the streams that are not training batches. Training uses the 2-word key
# [seed, step]; the others use 3-word keys, so no training step can ever collide with them.
_TOPIC_STREAM = 0x70706963  # 'topc'
_EVAL_STREAM = 0x6576616C  # 'eval'


def zipf_probs(vocab_size: int, exponent: float) -> np.ndarray:
  """Zipf probabilities over ranks: ``p[r - 1] = r^(-s) / sum_j j^(-s)``.

  Args:
    vocab_size: V, the number of ranks.
    exponent: s > 0.

  Returns:
    float64 [V], decreasing, sums to 1.
  """
  ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
  # Work in log space and subtract the max so large s cannot underflow the head.
  logits = -exponent * np.log(ranks)
  p = np.exp(logits - logits.max())
  return p / p.sum()


def topic_permutations(vocab_size: int, num_topics: int, seed: int) -> np.ndarray:
  """Seeded permutations, one per topic: ``perms[k, r]`` is the token id of rank ``r + 1``.

  Returns:
    int32 [num_topics, vocab_size].
  """
  perms = np.empty((num_topics, vocab_size), np.int32)
  for k in range(num_topics):
    perms[k] = np.random.default_rng([seed, _TOPIC_STREAM, k]).permutation(vocab_size)
  return perms


def mixture_weights(step: int, num_topics: int, shift: str, shift_every: int) -> np.ndarray:
  """Topic mixture ``w(step)`` of the shift schedule (see the module docstring).

  Returns:
    float64 [num_topics], non-negative, sums to 1.
  """
  w = np.zeros(num_topics, np.float64)
  if shift == "none":
    w[0] = 1.0
  elif shift == "switch":
    w[(step // shift_every) % num_topics] = 1.0
  elif shift == "drift":
    k = (step // shift_every) % num_topics
    a = (step % shift_every) / shift_every
    # With one topic k == k_next and the two terms add back to 1.
    w[k] += 1.0 - a
    w[(k + 1) % num_topics] += a
  else:
    raise ValueError(f"config.data.synthetic.shift={shift!r} is not one of {SHIFTS}.")
  return w


def horizon_weights(num_steps: int, num_topics: int, shift: str,
                    shift_every: int) -> np.ndarray:
  """Average of ``mixture_weights`` over steps ``0 .. num_steps - 1``.

  Vectorised over steps (a million steps is a few milliseconds).

  Returns:
    float64 [num_topics], sums to 1.
  """
  steps = np.arange(num_steps, dtype=np.int64)
  w = np.zeros(num_topics, np.float64)
  if shift == "none":
    w[0] = 1.0
    return w
  k = (steps // shift_every) % num_topics
  if shift == "switch":
    np.add.at(w, k, 1.0)
  elif shift == "drift":
    a = (steps % shift_every) / shift_every
    np.add.at(w, k, 1.0 - a)
    np.add.at(w, (k + 1) % num_topics, a)
  else:
    raise ValueError(f"config.data.synthetic.shift={shift!r} is not one of {SHIFTS}.")
  return w / w.sum()


def copy_sources(rng: np.random.Generator, batch: int, length: int, copy_prob: float,
                 span_min: int, span_max: int) -> np.ndarray:
  """Where each position of each window takes its token from (itself, or an earlier position).

  Each row is cut into consecutive spans with lengths uniform in ``[span_min, span_max]``. A span
  of length ``l`` starting at ``t0`` with room for a source (``t0 >= l``) is, with probability
  ``copy_prob``, a copy of ``[s0, s0 + l)``, ``s0`` uniform in ``[0, t0 - l]``. Sources may be
  copies themselves; pointer jumping resolves every position to an original (iid) position. The
  layout depends only on ``rng``, never on token values, which is what keeps marginals exact.

  Returns:
    int64 [batch, length], ``src[b, t] <= t`` and ``src[b, src[b, t]] == src[b, t]``.
  """
  num_spans = length // span_min + 1  # Enough spans to cover the row even if all are shortest.
  lens = rng.integers(span_min, span_max + 1, size=(batch, num_spans))  # [B, S]
  starts = np.cumsum(lens, axis=1) - lens  # [B, S], exclusive cumsum; starts[:, 0] == 0.
  room = starts - lens + 1  # [B, S], number of admissible source starts.
  is_copy = (rng.random((batch, num_spans)) < copy_prob) & (room >= 1)  # [B, S]
  src_start = (rng.random((batch, num_spans)) * np.maximum(room, 1)).astype(np.int64)  # [B, S]

  # Span id of every position: mark span starts, then a running count.
  mark = np.zeros((batch, length), np.int32)  # [B, L]
  rows, cols = np.nonzero(starts < length)
  mark[rows, starts[rows, cols]] = 1
  # Indices into the flattened [B * S] span arrays (flat fancy indexing is ~4x faster than
  # take_along_axis at these sizes).
  span = (np.cumsum(mark, axis=1) - 1 + np.arange(batch)[:, None] * num_spans).ravel()  # [B*L]

  pos = np.arange(batch * length, dtype=np.int64)  # [B*L], flat position
  row_base = pos - pos % length  # [B*L], flat index of the row's first position
  src = np.where(is_copy.ravel()[span],
                 row_base + src_start.ravel()[span] + (pos - row_base - starts.ravel()[span]),
                 pos)  # [B*L]
  # Pointer jumping: src <- src[src] until every position points at an original one. Sources
  # are strictly earlier in the same row, so chains are finite and this takes O(log depth) rounds.
  while True:
    nxt = src[src]
    if np.array_equal(nxt, src):
      return (src - row_base).reshape(batch, length)
    src = nxt


class SyntheticDataset:
  """Zipfian, topic-shifting token stream; see the module docstring for the process.

  Attributes:
    vocab_size: V; token ids are in ``[0, V)``.
    eos_id: None; the synthetic stream has no documents, hence no separator.
    token_frequencies: float64 [V], the average of ``token_probs_at`` over the training horizon.
    rank_probs: float64 [V], the Zipf law over ranks.
    topic_perms: int32 [K, V], ``topic_perms[k, r]`` is the token of rank ``r + 1`` in topic k.
    topic_probs: float64 [K, V], ``topic_probs[k, v]`` is topic k's probability of token v.
    horizon_steps: the number of training steps ``token_frequencies`` averages over.
    num_eval_batches: batches per ``eval_batches()`` pass.
    info: a summary for logs.
  """

  def __init__(self, *, vocab_size: int, seq_len: int, global_batch_size: int, seed: int,
               zipf_exponent: float, num_topics: int, shift: str, shift_every: int,
               copy_prob: float, span_min: int, span_max: int, num_eval_sequences: int,
               eval_batches: int, num_train_steps: int | None = None, process_index: int = 0,
               process_count: int = 1):
    self.vocab_size = int(vocab_size)
    self.seq_len = int(seq_len)
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.zipf_exponent = float(zipf_exponent)
    self.num_topics = int(num_topics)
    self.shift = shift
    self.shift_every = int(shift_every)
    self.copy_prob = float(copy_prob)
    self.span_min = int(span_min)
    self.span_max = int(span_max)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.eos_id = None

    self.rank_probs = zipf_probs(self.vocab_size, self.zipf_exponent)  # [V]
    # Inverse-CDF sampling: rank = #{r : cdf[r] <= u}. Forcing cdf[-1] = 1 exactly means u < 1
    # always lands on a valid rank, whatever the rounding of the cumsum.
    self._cdf = np.cumsum(self.rank_probs)  # [V]
    self._cdf /= self._cdf[-1]
    self.topic_perms = topic_permutations(self.vocab_size, self.num_topics, self.seed)  # [K, V]
    self.topic_probs = np.empty((self.num_topics, self.vocab_size), np.float64)  # [K, V]
    for k in range(self.num_topics):
      self.topic_probs[k, self.topic_perms[k]] = self.rank_probs

    if num_train_steps is None or num_train_steps <= 0:
      # Unknown horizon: one full topic cycle, the period of the schedule.
      num_train_steps = 1 if shift == "none" else self.num_topics * self.shift_every
    self.horizon_steps = int(num_train_steps)
    self.token_frequencies = self.horizon_weights() @ self.topic_probs  # [V]
    self.num_eval_batches = min(int(eval_batches),
                                int(num_eval_sequences) // self.global_batch_size)
    if self.num_eval_batches < 1:
      raise ValueError(
          f"config.data.synthetic.num_eval_sequences={num_eval_sequences} is fewer than one global "
          f"batch of {self.global_batch_size} sequences; raise it to at least that.")
    self.info = dict(source="synthetic", zipf_exponent=self.zipf_exponent,
                     num_topics=self.num_topics, shift=self.shift, shift_every=self.shift_every,
                     copy_prob=self.copy_prob, horizon_steps=self.horizon_steps)

  # --- The ground truth -------------------------------------------------------------------

  def mixture_at(self, step: int) -> np.ndarray:
    """Topic weights ``w(step)``, float64 [K]."""
    return mixture_weights(step, self.num_topics, self.shift, self.shift_every)

  def topic_at(self, step: int) -> int:
    """The topic of ``step`` (for 'drift', the one it is moving away from)."""
    if self.shift == "none":
      return 0
    return int((step // self.shift_every) % self.num_topics)

  def token_probs_at(self, step: int) -> np.ndarray:
    """Exact distribution of every token of batch ``step``: ``q_step = w(step) @ P``, [V]."""
    return self.mixture_at(step) @ self.topic_probs

  def horizon_weights(self) -> np.ndarray:
    """Topic weights averaged over the training horizon, float64 [K]."""
    return horizon_weights(self.horizon_steps, self.num_topics, self.shift, self.shift_every)

  # --- Sampling ---------------------------------------------------------------------------

  def _sample(self, rng: np.random.Generator, batch: int, step: int) -> np.ndarray:
    """``batch`` windows of ``seq_len + 1`` tokens at the distribution of ``step``; int32."""
    length = self.seq_len + 1
    ranks = np.searchsorted(self._cdf, rng.random((batch, length)), side="right")  # [B, L]
    w = self.mixture_at(step)
    if self.shift == "drift":
      # Exact mixture sampling: each token picks its topic, then its rank.
      k = self.topic_at(step)
      topic = np.where(rng.random((batch, length)) < w[(k + 1) % self.num_topics],
                       (k + 1) % self.num_topics, k)  # [B, L]
      tokens = self.topic_perms[topic, ranks]  # [B, L]
    else:
      tokens = self.topic_perms[int(np.argmax(w))][ranks]  # [B, L]
    if self.copy_prob > 0:
      src = copy_sources(rng, batch, length, self.copy_prob, self.span_min, self.span_max)
      rows = np.arange(batch, dtype=np.int64)[:, None] * length  # [B, 1]
      tokens = tokens.ravel()[(src + rows).ravel()].reshape(batch, length)
    return tokens.astype(np.int32, copy=False)

  def _local_rows(self, global_batch: np.ndarray) -> np.ndarray:
    # The global batch is drawn whole and sliced, so the rows do not depend on process_count:
    # concatenating every process's slice gives the single-process batch.
    lo = self.process_index * self.local_batch_size
    return global_batch[lo:lo + self.local_batch_size]

  def train_batch(self, step: int) -> np.ndarray:
    """This process's rows of training batch ``step``: int32 [B // process_count, T + 1]."""
    rng = np.random.default_rng([self.seed, int(step)])
    return self._local_rows(self._sample(rng, self.global_batch_size, int(step)))

  def eval_batches(self, step: int | None = None) -> Iterator[np.ndarray]:
    """A fixed held-out set: ``num_eval_batches`` batches, int32 [B // process_count, T + 1].

    By default eval batch ``i`` of ``n`` is drawn at the schedule position
    ``floor((i + 1/2) * horizon / n)``, so the set covers the topics in the proportions training
    sees them over its horizon (its expected unigram is ``token_frequencies``) and eval loss
    measures what is kept of every topic, not only the current one. With ``step`` given, every
    batch is drawn at ``step``'s distribution instead (eval on the current topic). The noise comes
    from streams training never uses, so the set is held out; it is the same on every call.
    """
    n = self.num_eval_batches
    for i in range(n):
      at = step if step is not None else int((i + 0.5) * self.horizon_steps / n)
      rng = np.random.default_rng([self.seed, _EVAL_STREAM, i])
      yield self._local_rows(self._sample(rng, self.global_batch_size, int(at)))
