"""Reference losses a trained model is read against, in nats per token.

Every dataset's ``baselines(split)`` returns at least

  uniform   ln V: the loss of predicting every one of the V token ids with probability 1 / V.
  unigram   -(1/n) sum_i ln p_train(y_i) over the n targets y_i that eval loss scores on
            ``split`` (every window's tokens 1..T, all processes' rows): the loss of a model that
            knows only how often each token occurs in training and ignores its context.

and the synthetic corpus adds the entropies of its generator (see ``synthetic.py``).
"""

from __future__ import annotations

import math

import numpy as np


def uniform(vocab_size: int) -> float:
  """ln V."""
  return math.log(vocab_size)


def add_one_unigram(counts: np.ndarray) -> np.ndarray:
  """Laplace-smoothed unigram ``p(v) = (c_v + 1) / (N + V)`` of token counts ``c`` [V].

  Add-one keeps the cross-entropy finite when an eval token never occurs in training (a rare
  byte piece, say); with N >> V it moves frequent tokens' probabilities by about V / N.
  """
  counts = np.asarray(counts, np.float64)
  return (counts + 1.0) / (counts.sum() + counts.size)


def cross_entropy(targets: np.ndarray, probs: np.ndarray) -> float:
  """-mean ln probs[targets]: the loss of the context-free model ``probs`` [V] on ``targets``."""
  counts = np.bincount(np.asarray(targets).ravel(), minlength=probs.size)
  seen = counts > 0
  return float(-(counts[seen] * np.log(probs[seen])).sum() / counts.sum())


def entropy(probs: np.ndarray) -> float:
  """Shannon entropy -sum_v p(v) ln p(v) of ``probs`` [..., V], averaged over leading axes."""
  p = np.asarray(probs, np.float64)
  terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return float(terms.sum(-1).mean())
