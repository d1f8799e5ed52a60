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

With ``markov = lambda > 0`` the fresh draws are not iid but a first-order Markov chain over
*ranks* (the same for every topic; a topic relabels ranks as tokens), a learnable bigram law:

      T(r' | r) = (1 - lambda) p(r') + lambda / d * #{j : succ[r, j] = r'},

each rank having ``d = markov_successors`` successors drawn from ``p`` (``markov_chain``). The
first token of a window is drawn from the chain's stationary law ``pi`` (``pi = pi T``, solved
exactly by ``stationary_probs``), so every position has the marginal ``pi`` (Zipf-like: it is
``p`` reweighted by the successor tables) and the topic mapping turns it into the per-topic law.
A fresh token follows the previous token whether that one was fresh or copied, which keeps the
marginal ``pi``; the entropy of a fresh token given its predecessor is the chain's entropy rate
``sum_r pi(r) H(T(.|r))`` (``entropy_rate``), computed exactly. Under 'drift' the topic of a
Markov window is drawn per window from ``w(step)`` (a chain cannot change labels mid-window), so
the per-position marginal is still the mixture ``q_step``.

Batches are pure functions of ``(seed, step)``: ``rng = np.random.default_rng([seed, step])``.
Held-out eval splits ('validation', 'test', and 'current' / 'past' to separate adaptation from
forgetting) come from other streams (``SyntheticDataset.eval_batches``); ``baselines`` gives the
uniform and unigram losses and the generator's exact entropies on each.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from jaxopt_study.data import baselines

SHIFTS = ("none", "switch", "drift")
EVAL_AT = ("seen", "last")  # where validation/test are drawn (SyntheticDataset.eval_batches)

# Seed-sequence tags of the streams that are not training batches. Training uses the 2-word key
# [seed, step]; the others use 3-word keys, so no training step can ever collide with them.
_TOPIC_STREAM = 0x70706963  # 'topc'
_CHAIN_STREAM = 0x63686E6E  # 'chnn', the successor tables of the Markov chain
# Eval split -> its stream ('validation' keeps the tag it had when it was the only eval set).
_EVAL_STREAMS = {
    "validation": 0x6576616C,  # 'eval'
    "test": 0x74657374,  # 'test'
    "current": 0x63757272,  # 'curr'
    "past": 0x70617374,  # 'past'
}


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


def markov_chain(rank_probs: np.ndarray, successors: int, seed: int) -> np.ndarray:
  """The successor tables of the rank chain: ``succ[r, j]``, ``d`` ranks drawn iid from ``p``.

  Returns:
    int32 [V, d] (0-based ranks; duplicates are allowed and count twice in ``T``).
  """
  cdf = np.cumsum(rank_probs)
  cdf /= cdf[-1]
  u = np.random.default_rng([seed, _CHAIN_STREAM]).random((rank_probs.size, successors))
  return np.searchsorted(cdf, u, side="right").astype(np.int32)


def _successor_mass(probs: np.ndarray, succ: np.ndarray) -> np.ndarray:
  """``(probs @ S)[r'] = sum_r probs[r] #{j : succ[r, j] = r'} / d``: float64 [V]."""
  d = succ.shape[1]
  return np.bincount(succ.ravel(), weights=np.repeat(probs / d, d), minlength=probs.size)


def stationary_probs(rank_probs: np.ndarray, strength: float, succ: np.ndarray) -> np.ndarray:
  """The stationary law ``pi = pi T`` of the rank chain (module docstring), float64 [V].

  ``T = (1 - lambda) 1 p^T + lambda S`` gives ``pi = (1 - lambda) p + lambda pi S``, a
  contraction with rate ``lambda``: iterating from ``p`` converges geometrically to the unique
  fixed point (``T`` is positive, hence ergodic, for ``lambda < 1``).
  """
  if not 0.0 <= strength < 1.0:
    raise ValueError(f"config.data.synthetic.markov={strength} must be in [0, 1).")
  pi = np.asarray(rank_probs, np.float64)
  while True:
    nxt = (1.0 - strength) * rank_probs + strength * _successor_mass(pi, succ)
    if np.abs(nxt - pi).max() <= 1e-15:
      return nxt / nxt.sum()
    pi = nxt


def entropy_rate(rank_probs: np.ndarray, strength: float, succ: np.ndarray,
                 stationary: np.ndarray) -> float:
  """``sum_r pi(r) H(T(. | r))``, nats: the entropy of a fresh token given its predecessor.

  Row ``r`` of ``T`` is ``(1 - lambda) p`` plus ``lambda c / d`` on each successor drawn ``c``
  times, so its entropy is that of ``(1 - lambda) p`` with the successors' terms replaced.
  """
  base = (1.0 - strength) * rank_probs  # [V]
  terms = -base * np.log(base)  # [V], every p > 0
  total = terms.sum()
  d = succ.shape[1]
  rows = np.empty(succ.shape[0])
  for r, s in enumerate(succ):
    v, c = np.unique(s, return_counts=True)
    q = base[v] + strength * c / d
    rows[r] = total - terms[v].sum() - (q * np.log(q)).sum()
  return float(stationary @ rows)


def schedule_weights(steps: np.ndarray, num_topics: int, shift: str,
                     shift_every: int) -> np.ndarray:
  """Topic mixtures ``w(step)`` of the shift schedule (see the module docstring) at ``steps``.

  Vectorised over steps (a million steps is a few milliseconds).

  Returns:
    float64 [len(steps), num_topics], rows non-negative and summing to 1.
  """
  steps = np.asarray(steps, np.int64).reshape(-1)  # [S]
  w = np.zeros((steps.size, num_topics), np.float64)  # [S, K]
  rows = np.arange(steps.size)
  k = (steps // shift_every) % num_topics  # [S]
  if shift == "none":
    w[:, 0] = 1.0
  elif shift == "switch":
    w[rows, k] = 1.0
  elif shift == "drift":
    a = (steps % shift_every) / shift_every  # [S]
    # With one topic k == k_next and the two terms add back to 1.
    w[rows, k] += 1.0 - a
    w[rows, (k + 1) % num_topics] += a
  else:
    raise ValueError(f"config.data.synthetic.shift={shift!r} is not one of {SHIFTS}.")
  return w


def mixture_weights(step: int, num_topics: int, shift: str, shift_every: int) -> np.ndarray:
  """Topic mixture ``w(step)``: float64 [num_topics], non-negative, sums to 1."""
  return schedule_weights(np.array([step]), num_topics, shift, shift_every)[0]


def horizon_weights(num_steps: int, num_topics: int, shift: str,
                    shift_every: int) -> np.ndarray:
  """Average of ``w(step)`` over steps ``0 .. num_steps - 1``: float64 [num_topics]."""
  return schedule_weights(np.arange(num_steps), num_topics, shift, shift_every).mean(0)


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


def original_probs(length: int, copy_prob: float, span_min: int, span_max: int) -> np.ndarray:
  """``P(position t of a window holds a fresh draw, not a copy)`` for ``t < length``, exactly.

  The layout of ``copy_sources`` is a renewal process: span lengths ``l`` are iid uniform on
  ``[span_min, span_max]``, so the probability ``u(s)`` that some span starts at ``s`` is

      u(0) = 1,      u(s) = sum_l P(l) u(s - l),

  and a span starting at ``s`` with length ``l`` is a copy with probability ``copy_prob`` if it
  has room (``s >= l``), else never. Position ``t`` is a copy iff the span covering it is one:

      P(copy at t) = copy_prob * sum_{s <= t} u(s) sum_{l > t - s, l <= s} P(l).

  Returns:
    float64 [length].
  """
  lens = np.arange(span_min, span_max + 1)  # [M]
  p_len = 1.0 / lens.size
  starts = np.zeros(length, np.float64)  # u(s)
  starts[0] = 1.0
  for s in range(1, length):
    prev = s - lens
    starts[s] = p_len * starts[prev[prev >= 0]].sum()
  p_copy = np.zeros(length + span_max, np.float64)
  for s in range(length):
    for l in lens[lens <= s]:  # Spans with room for a source.
      p_copy[s:s + l] += copy_prob * p_len * starts[s]
  return 1.0 - p_copy[:length]


class SyntheticDataset:
  """Zipfian, topic-shifting token stream; see the module docstring for the process.

  Attributes:
    vocab_size: V; token ids are in ``[0, V)``.
    eos_id: None; the synthetic stream has no documents, hence no separator.
    token_frequencies: float64 [V], the average of ``token_probs_at`` over the training horizon.
    zipf: float64 [V], the Zipf law over ranks (the law of every fresh iid draw).
    rank_probs: float64 [V], the marginal law of ranks at every position: ``zipf``, or with
      ``markov > 0`` the chain's stationary law.
    successors: int32 [V, d], the chain's successor tables (None without ``markov``).
    entropy_rate: the chain's entropy rate, nats (None without ``markov``).
    topic_perms: int32 [K, V], ``topic_perms[k, r]`` is the token of rank ``r + 1`` in topic k.
    topic_probs: float64 [K, V], ``topic_probs[k, v]`` is topic k's probability of token v.
    horizon_steps: the number of training steps ``token_frequencies`` averages over.
    num_eval_batches: batches per ``eval_batches(split)`` pass, the same for every split.
    eval_splits: the held-out splits (see ``eval_batches``).
    info: a summary for logs.
  """

  def __init__(self, *, vocab_size: int, seq_len: int, global_batch_size: int, seed: int,
               zipf_exponent: float, num_topics: int, shift: str, shift_every: int,
               copy_prob: float, span_min: int, span_max: int, num_eval_sequences: int,
               eval_batches: int, num_train_steps: int | None = None, process_index: int = 0,
               process_count: int = 1, eval_at: str = "seen", markov: float = 0.0,
               markov_successors: int = 4):
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
    if eval_at not in EVAL_AT:
      raise ValueError(f"eval_at={eval_at!r} is not one of {EVAL_AT}.")
    self.eval_at = eval_at
    self.local_batch_size = self.global_batch_size // self.process_count
    self.eos_id = None
    self.markov = float(markov)

    self.zipf = zipf_probs(self.vocab_size, self.zipf_exponent)  # [V], p: the fresh iid draws
    # Inverse-CDF sampling: rank = #{r : cdf[r] <= u}. Forcing cdf[-1] = 1 exactly means u < 1
    # always lands on a valid rank, whatever the rounding of the cumsum.
    self._cdf = np.cumsum(self.zipf)  # [V]
    self._cdf /= self._cdf[-1]
    if self.markov > 0:
      self.successors = markov_chain(self.zipf, int(markov_successors), self.seed)  # [V, d]
      self.rank_probs = stationary_probs(self.zipf, self.markov, self.successors)  # [V], pi
      self.entropy_rate = entropy_rate(self.zipf, self.markov, self.successors,
                                       self.rank_probs)
      self._pi_cdf = np.cumsum(self.rank_probs)  # [V]
      self._pi_cdf /= self._pi_cdf[-1]
    else:
      self.successors = None
      self.rank_probs = self.zipf  # iid draws: the marginal is the Zipf law itself
      self.entropy_rate = None
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
    self._positions = self._eval_positions()  # Eval split -> schedule position of each batch.
    self.text_sha256 = None  # the corpus is a function of the config (the fingerprint's)
    self.info = dict(source="synthetic", zipf_exponent=self.zipf_exponent,
                     num_topics=self.num_topics, shift=self.shift, shift_every=self.shift_every,
                     copy_prob=self.copy_prob, horizon_steps=self.horizon_steps,
                     eval_at=self.eval_at, markov=self.markov)

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
    if self.markov > 0:
      return self._sample_markov(rng, batch, step)
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

  def _sample_markov(self, rng: np.random.Generator, batch: int, step: int) -> np.ndarray:
    """``_sample`` with fresh draws from the rank chain (module docstring); int32 [B, L]."""
    length = self.seq_len + 1
    iid = np.searchsorted(self._cdf, rng.random((batch, length)), side="right")  # [B, L]
    follow = rng.random((batch, length)) < self.markov  # [B, L], take a successor
    pick = rng.integers(0, self.successors.shape[1], size=(batch, length))  # [B, L]
    first = np.searchsorted(self._pi_cdf, rng.random(batch), side="right")  # [B], from pi
    w = self.mixture_at(step)
    topic = rng.choice(self.num_topics, size=batch, p=w)  # [B], one topic per window
    if self.copy_prob > 0:
      src = copy_sources(rng, batch, length, self.copy_prob, self.span_min, self.span_max)
    else:
      src = np.broadcast_to(np.arange(length), (batch, length))
    rows = np.arange(batch)
    ranks = np.empty((batch, length), np.int64)  # [B, L]
    ranks[:, 0] = first
    for t in range(1, length):  # sequential: a fresh rank depends on the one before it
      fresh = np.where(follow[:, t], self.successors[ranks[:, t - 1], pick[:, t]], iid[:, t])
      ranks[:, t] = np.where(src[:, t] == t, fresh, ranks[rows, src[:, t]])
    return self.topic_perms[topic[:, None], ranks].astype(np.int32)

  def _local_rows(self, global_batch: np.ndarray) -> np.ndarray:
    # The global batch is drawn whole and sliced, so the rows do not depend on process_count:
    # concatenating every process's slice gives the single-process batch.
    lo = self.process_index * self.local_batch_size
    return global_batch[lo:lo + self.local_batch_size]

  def train_batch(self, step: int) -> np.ndarray:
    """This process's rows of training batch ``step``: int32 [B // process_count, T + 1]."""
    rng = np.random.default_rng([self.seed, int(step)])
    return self._local_rows(self._sample(rng, self.global_batch_size, int(step)))

  # --- Evaluation -------------------------------------------------------------------------

  def _eval_positions(self) -> dict[str, np.ndarray]:
    """Eval split -> the schedule position (step) whose distribution each eval batch is drawn at.

    See ``eval_batches``; ``n`` = ``num_eval_batches``, ``H`` = ``horizon_steps``.
    """
    n, horizon = self.num_eval_batches, self.horizon_steps
    spread = ((np.arange(n) + 0.5) * horizon / n).astype(np.int64)  # [n]
    last = horizon - 1
    held_out = spread if self.eval_at == "seen" else np.full(n, last, np.int64)
    positions = {"validation": held_out, "test": held_out}
    if self.shift != "none":
      positions["current"] = np.full(n, last, np.int64)
      weights = schedule_weights(np.arange(horizon), self.num_topics, self.shift,
                                 self.shift_every)  # [H, K]
      current = weights[last] > 0  # [K], the topics of the last training step
      past = np.flatnonzero((weights[:, current] == 0).all(axis=1))  # [P], steps without them
      if past.size:
        positions["past"] = past[((np.arange(n) + 0.5) * past.size / n).astype(np.int64)]
    return positions

  @property
  def eval_splits(self) -> tuple[str, ...]:
    """'validation', 'test', and with a shifting topic 'current' and (once training has left
    a topic behind) 'past'; see ``eval_batches``."""
    return tuple(self._positions)

  def _split_positions(self, split: str) -> np.ndarray:
    if split not in self._positions:
      raise ValueError(f"eval split {split!r} is not one of this dataset's {self.eval_splits}.")
    return self._positions[split]

  def _global_eval_batches(self, split: str) -> Iterator[np.ndarray]:
    for i, at in enumerate(self._split_positions(split)):
      rng = np.random.default_rng([self.seed, _EVAL_STREAMS[split], i])
      yield self._sample(rng, self.global_batch_size, int(at))

  def eval_batches(self, split: str = "validation") -> Iterator[np.ndarray]:
    """A fixed held-out set: ``num_eval_batches`` batches, int32 [B // process_count, T + 1].

    Batch ``i`` of split ``s`` is drawn at the distribution of one schedule position (training
    step) with its own noise ``default_rng([seed, stream(s), i])``, a stream training never uses,
    so every split is held out, and the same on every call. With ``n`` batches and horizon ``H``:

      validation   with ``eval_at='seen'`` positions floor((i + 1/2) H / n): the topics in the
                   proportions training saw them (expected unigram = ``token_frequencies``).
                   Loss = what is kept of every topic; under switches this rewards not
                   learning the present topic. With ``eval_at='last'`` every batch at H - 1,
                   like 'current' (adaptation) on another stream. Select hyperparameters on it.
      test         the same positions, another stream: report final numbers on it.
      current      every batch at the last training step H - 1: the topic (mixture) trained
                   last. Loss = adaptation to the present distribution.
      past         positions spread evenly, as above, over the training steps whose mixture gives
                   no weight to any topic of step H - 1: the topics training has moved away from.
                   Loss = forgetting. Absent when there are none (shift 'none', a horizon within
                   the first topic).
    """
    for batch in self._global_eval_batches(split):
      yield self._local_rows(batch)

  def baselines(self, split: str = "validation") -> dict[str, float]:
    """Reference losses on ``split``, nats per token (see ``baselines.py`` for the first two).

      uniform           ln V.
      unigram           cross-entropy of the split's targets under ``token_frequencies`` (the
                        exact training unigram; every token has probability > 0, no smoothing).
      marginal_entropy  mean over the split's batches of H(q_at), the entropy of the exact
                        per-token distribution at the batch's position: the floor if tokens
                        were iid (``copy_prob`` = 0) and the model knew the topic mixture. With
                        copies it is an upper bound on that floor (context can only help).
      entropy_floor     H_fresh * mean_{t=1..T} P(target t is a fresh draw)
                        (``original_probs``): the exact entropy of the next token given all
                        of the generator's choices but the token values (topic mixture and copy
                        layout) and the tokens before it; copied tokens are then certain.
                        ``H_fresh`` is marginal_entropy for iid draws and the chain's
                        ``entropy_rate`` with ``markov > 0`` (the topic of a window given).
                        No model's expected loss is below it; without copies and without
                        ``markov`` it equals marginal_entropy.
    """
    positions = self._split_positions(split)
    targets = np.concatenate([b[:, 1:].ravel() for b in self._global_eval_batches(split)])
    marginal = baselines.entropy(schedule_weights(positions, self.num_topics, self.shift,
                                                  self.shift_every) @ self.topic_probs)
    fresh = original_probs(self.seq_len + 1, self.copy_prob, self.span_min, self.span_max)
    h_fresh = marginal if self.markov == 0 else self.entropy_rate
    return {
        "uniform": baselines.uniform(self.vocab_size),
        "unigram": baselines.cross_entropy(targets, self.token_frequencies),
        "marginal_entropy": marginal,
        "entropy_floor": h_fresh * float(fresh[1:].mean()),
    }
