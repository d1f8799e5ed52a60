"""One interface over every data source: config, validation, packed windows, prefetching.

``build_dataset(config.data, ...)`` returns a ``Dataset`` whose training batch ``step`` is a pure
function of ``(seed, step)``: the data position of a run is its step, so a resumed run sees the
batches it would have seen. Each process gets only its rows of the global batch.

Text sources (WikiText-103/-2 from the hub, local WikiText files) go through:

  text lines --SentencePiece--> ids + EOS per line --> one flat array per split (.npy, cached,
                                                        verified on load: see cache.py)

and are cut into packed windows with no padding (a padded, unmasked loader makes the loss
meaningless). With ``T = seq_len`` and ``N`` tokens, window ``i`` is

  tokens[i*T : i*T + T + 1],      i = 0 .. W - 1,      W = (N - 1) // T,

so consecutive windows share exactly one token (the last target of one is the first input of
the next) and every token is a target exactly once per epoch. Training visits global window
``g = step * B + b`` (row ``b`` of batch ``step``) at position ``g mod W`` of the seeded
permutation of epoch ``g // W``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pathlib
import queue
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple, Protocol, runtime_checkable

import jax
import ml_collections
import numpy as np

from jaxopt_study.data import baselines
from jaxopt_study.data import cache
from jaxopt_study.data import synthetic
from jaxopt_study.data import tokenizer as tokenizer_lib
from jaxopt_study.data import wikitext

_PERM_STREAM = 0x7065726D  # 'perm': seed-sequence tag of the epoch permutations.


def default_config(preset: str = "synthetic") -> ml_collections.ConfigDict:
  """Defaults of ``config.data``; ``preset`` is one of ``PRESETS`` (they change only a few fields).
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown data preset {preset!r}; valid: {sorted(PRESETS)}.")
  c = ml_collections.ConfigDict()
  c.name = "synthetic"  # Source: 'synthetic' | 'wikitext-103' | 'wikitext-2' | 'local'.
  c.path = ""  # For 'local': folder with wiki.{train,valid,test}.{tokens,raw} (WikiText layout).
  c.local_suffix = "auto"  # For 'local': 'tokens' | 'raw' | 'auto' (.tokens if present, else .raw).
  # Text sources: which text each part uses. A split is 'train' | 'valid' | 'test', or a range of
  # its articles, 'test[:50%]', 'test[50%:]', 'valid[:30]' (whole articles; see
  # wikitext.SplitSpec). The three must not share text.
  c.train_split = "train"  # Trained on (and the tokenizer fitted on).
  c.validation_split = "valid"  # Eval split 'validation': choose hyperparameters on it.
  c.test_split = "test"  # Eval split 'test': report final numbers on it.
  # Tokenizer models, tokenized splits and the datasets download cache live here.
  # '' = $JAXOPT_STUDY_CACHE if set, else ~/.cache/jaxopt_study (resolved when the data is built,
  # so a saved config stays portable).
  c.cache_dir = ""
  # Text: SentencePiece vocabulary (ids < vocab_size even if the corpus supports fewer pieces).
  # Synthetic: the corpus vocabulary. Either way it is the model's vocabulary (before padding).
  c.vocab_size = 8192
  c.eval_batches = 16  # At most this many batches per eval split (fewer if the split is short).
  c.hub_timeout_s = 5.0  # Seconds to wait for the Hugging Face hub before failing with a fix.

  t = c.tokenizer = ml_collections.ConfigDict()  # Text sources only.
  t.model_type = "unigram"  # SentencePiece algorithm: 'unigram' | 'bpe'.
  t.input_sentence_size = 100_000  # Fit on a random sample of this many lines (~13M words of
  # WikiText-103, plenty for 50k pieces); the whole split is then tokenized with the model.
  t.character_coverage = 0.9995  # Rarer characters are spelled as UTF-8 bytes (byte_fallback).

  s = c.synthetic = ml_collections.ConfigDict()  # name='synthetic' only; see data/synthetic.py.
  # s in p(rank r) ~ r^(-s) (text: about 1.0-1.2). Larger s puts the mass on fewer tokens and
  # makes the rest rarer: sparser embedding gradients.
  s.zipf_exponent = 1.1
  s.num_topics = 4  # Topics = seeded permutations rank -> token id (which tokens are frequent).
  s.shift = "switch"  # 'none' (topic 0) | 'switch' (k = step // shift_every mod K) | 'drift'.
  s.shift_every = 100  # Steps between switches; for 'drift', steps to move from topic k to k+1.
  s.copy_prob = 0.5  # Chance a span copies an earlier span of its window (learnable structure).
  s.span_min = 4  # Span lengths are uniform in [span_min, span_max] tokens.
  s.span_max = 32  # (span_min <= span_max; a span copies only if its window has room before it.)
  # Bigram structure: the chance a fresh token is one of its predecessor's markov_successors
  # successors (a first-order chain over ranks, data/synthetic.py), else an iid Zipf draw.
  # 0 = iid fresh draws (the corpus before the field existed); in [0, 1).
  s.markov = 0.0
  s.markov_successors = 4  # Successors per rank: the chain's entropy rate grows with log(d).
  s.num_eval_sequences = 512  # Held-out windows per eval split (then capped by eval_batches).
  # Where the validation and test splits are drawn: 'seen' = the topics in the proportions
  # training saw them (what is kept of every topic; under switches it rewards not learning the
  # present one), 'last' = the distribution of the last training step (adaptation; forgetting
  # is the 'past' split). Equal under shift 'none'.
  s.eval_at = "seen"
  PRESETS[preset](c)
  return c


def _wikitext103(c: ml_collections.ConfigDict) -> None:
  # The full WikiText-103 (103M words) through Hugging Face datasets: trained on 'train',
  # validation = the official 'valid', test = the official 'test'. Needs the network once.
  c.name = "wikitext-103"


def _wikitext103_offline(c: ml_collections.ConfigDict) -> None:
  # TRAINED ON VALIDATION, EVALUATED ON TEST, OFFLINE: not the WikiText-103 benchmark. Where only
  # the release's held-out files exist (the dev machines' ../shared/data/wikitext-103, never
  # copied into the repository), the model and its tokenizer train on wiki.valid.tokens (60
  # articles, 214k words); eval split 'validation' is the first half of wiki.test.tokens'
  # articles and 'test' the second half (31 + 31 held-out articles, none seen in training).
  # Relative paths resolve against the working directory; set --config.data.path elsewhere.
  c.name = "local"
  c.path = "../shared/data/wikitext-103"
  c.train_split = "valid"
  c.validation_split = "test[:50%]"
  c.test_split = "test[50%:]"
  # ~250k training tokens: 4096 pieces leaves each about 60 occurrences on average.
  c.vocab_size = 4096


def _wikitext2_local(c: ml_collections.ConfigDict) -> None:
  # WikiText-2 (v1, tokenized) as released, from local files: trained on its train split (600
  # articles, 2.09M words, a subset of WikiText-103's training articles); its valid and test
  # splits are WikiText-103's validation and test articles (WikiText-2's smaller vocabulary
  # maps more words to <unk>). Source, licence and sha256 of each file: docs/DATA.md.
  c.name = "local"
  c.path = "~/data/wikitext-2"  # wiki.{train,valid,test}.tokens; set --config.data.path.
  c.local_suffix = "tokens"
  # 3.3M training tokens with SentencePiece 8192 (about 400 occurrences per piece on average).
  c.vocab_size = 8192


# The eval split of a text corpus that is NOT held out: its training text's first windows.
TRAIN_SAMPLE = "train_sample"

# Preset of config.data -> the fields it changes from the synthetic defaults.
PRESETS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "synthetic": lambda c: None,
    "wikitext-103": _wikitext103,
    "wikitext-103-offline": _wikitext103_offline,
    "wikitext-2-local": _wikitext2_local,
}


@runtime_checkable
class Dataset(Protocol):
  """What ``build_dataset`` returns (see docs/DESIGN.md)."""

  vocab_size: int  # Token ids are in [0, vocab_size).
  eos_id: int | None  # Separator between lines/documents of text; None for synthetic data.
  token_frequencies: np.ndarray  # float64 [vocab_size], unigram frequency of training data.
  # 'validation' first, 'test', maybe more; all held out except TRAIN_SAMPLE (text corpora).
  eval_splits: tuple[str, ...]
  # {'train' | 'validation' | 'test': sha256 of the text it reads}: a text corpus's identity,
  # wherever its files lie; None for synthetic data (its tokens are a function of the config).
  text_sha256: dict[str, str] | None

  def train_batch(self, step: int) -> np.ndarray:
    """int32 [global_batch_size // process_count, seq_len + 1]; pure in (seed, step)."""

  def eval_batches(self, split: str = "validation") -> Iterator[np.ndarray]:
    """Finite; int32 [global_batch_size // process_count, seq_len + 1]; same every call."""

  def baselines(self, split: str = "validation") -> dict[str, float]:
    """Reference losses on ``split`` in nats/token: 'uniform', 'unigram', and for synthetic data
    'entropy_floor' and 'marginal_entropy' (see baselines.py)."""


# --- Validation ----------------------------------------------------------------------------


def _positive_int(value: Any, what: str, fix: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{what}={value!r} must be a positive integer; {fix}.")


def _check_common(data_config, seq_len, global_batch_size, process_index, process_count) -> None:
  if data_config.name not in DATASETS:
    raise ValueError(f"config.data.name={data_config.name!r} is unknown; valid names: "
                     f"{sorted(DATASETS)}.")
  _positive_int(seq_len, "seq_len", "pass the window length (config.seq_len)")
  _positive_int(global_batch_size, "global_batch_size",
                "pass the global batch in sequences (config.batch_size)")
  _positive_int(process_count, "process_count", "pass jax.process_count()")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}); "
                     "pass jax.process_index().")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} (config.batch_size) is not divisible by "
        f"process_count={process_count}: each process loads an equal share of the batch; use a "
        f"multiple of {process_count}.")
  _positive_int(data_config.eval_batches, "config.data.eval_batches", "e.g. 16")
  _positive_int(data_config.vocab_size, "config.data.vocab_size", "e.g. 8192")


def _check_synthetic(c) -> None:
  s = c.synthetic
  if c.vocab_size < 2:
    raise ValueError(f"config.data.vocab_size={c.vocab_size} must be >= 2 for the synthetic "
                     "corpus (a Zipf law over one token is constant).")
  if c.vocab_size > np.iinfo(np.int32).max:
    raise ValueError(f"config.data.vocab_size={c.vocab_size} does not fit int32 token ids.")
  if not s.zipf_exponent > 0:
    raise ValueError(f"config.data.synthetic.zipf_exponent={s.zipf_exponent} must be > 0 "
                     "(typical text: about 1.0-1.2).")
  _positive_int(s.num_topics, "config.data.synthetic.num_topics", "e.g. 4")
  if s.shift not in synthetic.SHIFTS:
    raise ValueError(f"config.data.synthetic.shift={s.shift!r} is not one of {synthetic.SHIFTS}.")
  _positive_int(s.shift_every, "config.data.synthetic.shift_every", "steps per topic, e.g. 100")
  if not 0.0 <= s.copy_prob <= 1.0:
    raise ValueError(f"config.data.synthetic.copy_prob={s.copy_prob} must be in [0, 1].")
  _positive_int(s.span_min, "config.data.synthetic.span_min", "e.g. 4")
  if s.span_max < s.span_min:
    raise ValueError(f"config.data.synthetic.span_max={s.span_max} must be >= "
                     f"config.data.synthetic.span_min={s.span_min}.")
  _positive_int(s.num_eval_sequences, "config.data.synthetic.num_eval_sequences", "e.g. 512")
  if not 0.0 <= s.markov < 1.0:
    raise ValueError(f"config.data.synthetic.markov={s.markov} must be in [0, 1) (0 = iid fresh "
                     "draws, e.g. 0.9 for a learnable bigram law).")
  _positive_int(s.markov_successors, "config.data.synthetic.markov_successors", "e.g. 4")
  if s.eval_at not in synthetic.EVAL_AT:
    raise ValueError(f"config.data.synthetic.eval_at={s.eval_at!r} is not one of "
                     f"{synthetic.EVAL_AT}.")


def _check_text(c) -> None:
  if c.vocab_size < tokenizer_lib.MIN_VOCAB_SIZE:
    raise ValueError(f"config.data.vocab_size={c.vocab_size} is too small for a byte-fallback "
                     f"SentencePiece model: use >= {tokenizer_lib.MIN_VOCAB_SIZE} (typically "
                     "8192-50304).")
  if c.tokenizer.model_type not in tokenizer_lib.MODEL_TYPES:
    raise ValueError(f"config.data.tokenizer.model_type={c.tokenizer.model_type!r} is not one of "
                     f"{tokenizer_lib.MODEL_TYPES}.")
  split_specs(c)
  _positive_int(c.tokenizer.input_sentence_size, "config.data.tokenizer.input_sentence_size",
                "e.g. 200000")


# Part of a text dataset -> the config field that names its text.
_SPLIT_FIELDS = {"train": "train_split", "validation": "validation_split", "test": "test_split"}


def split_specs(c) -> dict[str, wikitext.SplitSpec]:
  """config.data.{train,validation,test}_split parsed: {'train'|'validation'|'test': spec}.

  Specs of one file must select different articles; whole-file specs of one file always
  overlap, so that is checked here. Ranges of one file ('test[:50%]', 'test[50%:]') are checked
  against each other once the file's article count is known (``_check_ranges``).
  """
  fields = _SPLIT_FIELDS
  specs = {part: wikitext.parse_split(c[field], field) for part, field in fields.items()}
  for (a, sa), (b, sb) in itertools.combinations(specs.items(), 2):
    if sa.split == sb.split and not (sa.sliced and sb.sliced):
      raise ValueError(
          f"config.data.{fields[a]}={str(sa)!r} and config.data.{fields[b]}={str(sb)!r} share "
          f"text: held-out evaluation needs disjoint text. Use other splits, or disjoint ranges "
          f"of one split's articles, e.g. 'test[:50%]' and 'test[50%:]'.")
  return specs


def _check_ranges(specs: dict[str, wikitext.SplitSpec], num_articles: dict[str, int]) -> None:
  """Article ranges (given each sliced split's article count) are non-empty and disjoint."""
  ranges = {part: spec.article_range(num_articles[spec.split])
            for part, spec in specs.items() if spec.sliced}
  for part, r in ranges.items():
    if not r:
      raise ValueError(f"The {part} text {str(specs[part])!r} selects none of the "
                       f"{num_articles[specs[part].split]} articles of its split; widen its range.")
  for a, b in itertools.combinations(ranges, 2):
    ra, rb = ranges[a], ranges[b]
    if specs[a].split == specs[b].split and max(ra.start, rb.start) < min(ra.stop, rb.stop):
      raise ValueError(
          f"The {a} text {str(specs[a])!r} (articles {ra.start}..{ra.stop - 1}) and the {b} "
          f"text {str(specs[b])!r} (articles {rb.start}..{rb.stop - 1}) overlap; set disjoint "
          "ranges in config.data.train_split / validation_split / test_split.")


def check_config(data_config: ml_collections.ConfigDict, *, seq_len: int,
                 global_batch_size: int, process_index: int = 0, process_count: int = 1,
                 prefetch: int | None = None) -> None:
  """Every check of ``config.data`` (and of the loop's data arguments) that reads no file.

  ``build_dataset`` runs it first; call it from the run's config validation to fail before any
  set-up: ``check_config(config.data, seq_len=config.seq_len,
  global_batch_size=config.batch_size, prefetch=config.prefetch)``.

  Raises:
    ValueError: naming the field and the fix.
  """
  _check_common(data_config, seq_len, global_batch_size, process_index, process_count)
  if prefetch is not None:
    _positive_int(prefetch, "config.prefetch",
                  "the number of batches kept ready ahead of the train step, e.g. 2")
  DATASETS[data_config.name].check(data_config)


def resolve_cache_dir(data_config) -> pathlib.Path:
  """``config.data.cache_dir``, else ``$JAXOPT_STUDY_CACHE``, else ``~/.cache/jaxopt_study``."""
  path = (data_config.cache_dir or os.environ.get("JAXOPT_STUDY_CACHE")
          or os.path.join("~", ".cache", "jaxopt_study"))
  return pathlib.Path(path).expanduser()


# --- Packed windows ------------------------------------------------------------------------


def num_windows(num_tokens: int, seq_len: int) -> int:
  """W = (N - 1) // T windows of T + 1 tokens at offsets 0, T, 2T, ..."""
  return max(0, (num_tokens - 1) // seq_len)


def epoch_permutation(seed: int, epoch: int, num_windows_: int) -> np.ndarray:
  """The order of the windows in epoch ``epoch``: int64 [W]."""
  return np.random.default_rng([seed, _PERM_STREAM, epoch]).permutation(num_windows_)


def gather_windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> np.ndarray:
  """Windows ``tokens[i*T : i*T + T + 1]`` for ``i`` in ``window_ids`` [n]: int32 [n, T + 1].

  Works on a memory map: only the rows asked for are read.
  """
  # Contiguous slices beat one fancy index on a memmap (one read per window, no index array).
  out = np.empty((len(window_ids), seq_len + 1), np.int32)
  for row, i in enumerate(window_ids):
    start = int(i) * seq_len
    out[row] = tokens[start:start + seq_len + 1]
  return out


class TextDataset:
  """Packed windows over a tokenized text corpus (see the module docstring).

  Attributes:
    vocab_size: config.data.vocab_size; ids are below it (the SentencePiece model may hold fewer
      pieces, ``tokenizer.get_piece_size()``).
    eos_id: the id ending every line (``tokenizer.EOS_ID``, 2).
    token_counts: int64 [vocab_size], occurrences of each id in the training tokens.
    token_frequencies: float64 [vocab_size], ``token_counts / N``, EOS included.
    tokenizer: the SentencePiece processor (``decode`` a window to read it).
    train_tokens: the flat training tokens, memory-mapped.
    eval_tokens: {eval split: its flat tokens}, 'validation' first.
    eval_splits: ('validation', 'test', 'train_sample'): the last is the training text's start,
      not held out (``TRAIN_SAMPLE``).
    num_train_windows: W of the training text.
    num_eval_batches: {eval split: batches per ``eval_batches(split)`` pass}.
    text_sha256: {'train' | 'validation' | 'test': sha256 of the text it selects} (local files
      by content, hub releases by name: ``wikitext.TextSource.fingerprint``).
  """

  def __init__(self, *, train_tokens: np.ndarray, eval_tokens: dict[str, np.ndarray],
               token_counts: np.ndarray, vocab_size: int, tokenizer, seq_len: int,
               global_batch_size: int, seed: int, eval_batches: int, process_index: int = 0,
               process_count: int = 1, info: dict | None = None,
               text_sha256: dict[str, str] | None = None):
    self.train_tokens, self.eval_tokens = train_tokens, dict(eval_tokens)
    self.token_counts = np.asarray(token_counts, np.int64)
    self.token_frequencies = self.token_counts / max(1, self.token_counts.sum())
    self.vocab_size = int(vocab_size)
    self.eos_id = tokenizer_lib.EOS_ID
    self.tokenizer = tokenizer
    self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = global_batch_size // process_count
    self.info = dict(info or {})
    self.text_sha256 = dict(text_sha256) if text_sha256 else None
    self.eval_splits = tuple(self.eval_tokens)

    self.num_train_windows = num_windows(len(train_tokens), seq_len)
    if self.num_train_windows < 1:
      raise ValueError(f"config.data.train_split has {len(train_tokens)} tokens, fewer than one "
                       f"window of seq_len + 1 = {seq_len + 1}; use more text or a shorter "
                       "seq_len.")
    self.num_eval_batches = {}
    for split, tokens in self.eval_tokens.items():
      windows = num_windows(len(tokens), seq_len)
      self.num_eval_batches[split] = min(eval_batches, windows // global_batch_size)
      if self.num_eval_batches[split] < 1:
        raise ValueError(
            f"config.data.{_SPLIT_FIELDS.get(split, split)} (eval split {split!r}) has "
            f"{len(tokens)} tokens = {windows} windows of seq_len + 1 = {seq_len + 1}, fewer than "
            f"one global batch of {global_batch_size}; use a smaller batch or seq_len, or more "
            "text for that split.")
    self._perms: dict[int, np.ndarray] = {}  # epoch -> permutation; the last two are kept.
    self._lock = threading.Lock()  # train_batch may be called from a prefetch thread.

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        if len(self._perms) >= 2:
          del self._perms[min(self._perms)]
        self._perms[epoch] = epoch_permutation(self.seed, epoch, self.num_train_windows)
      return self._perms[epoch]

  def train_window_ids(self, step: int) -> np.ndarray:
    """Windows of this process's rows of batch ``step``: int64 [B // process_count]."""
    lo = step * self.global_batch_size + self.process_index * self.local_batch_size
    g = np.arange(lo, lo + self.local_batch_size, dtype=np.int64)  # Global window indices.
    epoch, pos = np.divmod(g, self.num_train_windows)
    ids = np.empty_like(g)
    for e in np.unique(epoch):  # A batch spans at most a few epochs (one, nearly always).
      sel = epoch == e
      ids[sel] = self._perm(int(e))[pos[sel]]
    return ids

  def train_batch(self, step: int) -> np.ndarray:
    """This process's rows of training batch ``step``: int32 [B // process_count, T + 1]."""
    return gather_windows(self.train_tokens, self.train_window_ids(int(step)), self.seq_len)

  def _check_split(self, split: str) -> None:
    if split not in self.eval_tokens:
      raise ValueError(f"eval split {split!r} is not one of this dataset's {self.eval_splits}.")

  def eval_batches(self, split: str = "validation") -> Iterator[np.ndarray]:
    """The eval split's windows in order, ``num_eval_batches[split]`` batches, remainder dropped:
    int32 [B // process_count, T + 1] each, this process's rows."""
    self._check_split(split)
    for b in range(self.num_eval_batches[split]):
      lo = b * self.global_batch_size + self.process_index * self.local_batch_size
      yield gather_windows(self.eval_tokens[split], np.arange(lo, lo + self.local_batch_size),
                           self.seq_len)

  def baselines(self, split: str = "validation") -> dict[str, float]:
    """'uniform' (ln V) and 'unigram': the cross-entropy of the targets eval scores on ``split``
    (tokens 1 .. n_windows * T, all processes' rows) under the add-one-smoothed training unigram
    ``(count + 1) / (N + V)`` (see baselines.py)."""
    self._check_split(split)
    num_targets = self.num_eval_batches[split] * self.global_batch_size * self.seq_len
    targets = np.asarray(self.eval_tokens[split][1:num_targets + 1])
    return {
        "uniform": baselines.uniform(self.vocab_size),
        "unigram": baselines.cross_entropy(targets, baselines.add_one_unigram(self.token_counts)),
    }


# --- Verified caches ---------------------------------------------------------------------


def _np_save(array: np.ndarray) -> Callable[[pathlib.Path], None]:
  def save(path: pathlib.Path) -> None:
    with open(path, "wb") as f:  # A file object: np.save would append '.npy' to a name.
      np.save(f, array)
  return save


def _load_array(path: pathlib.Path, dtype: np.dtype, shape: tuple[int, ...] | None = None,
                *, below: int | None = None, mmap: bool = True) -> np.ndarray:
  """An .npy that must hold ``dtype`` (and ``shape``) with values in ``[0, below)``."""
  try:
    array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:  # Object arrays, bad headers, short files.
    raise cache.CacheError(f"it is not a readable .npy array ({e})") from None
  if array.dtype != dtype or array.ndim != (1 if shape is None else len(shape)) or (
      shape is not None and array.shape != shape):
    raise cache.CacheError(f"it holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} "
                           f"{shape or '[n]'}")
  if below is not None and array.size and int(array.max()) >= below:
    raise cache.CacheError(f"it holds id {int(array.max())} >= vocab_size {below}")
  return array


def _load_tokenizer(path: pathlib.Path):
  try:
    return tokenizer_lib.load_tokenizer(path)
  except (RuntimeError, OSError) as e:  # SentencePiece rejects a corrupted model proto.
    raise cache.CacheError(f"SentencePiece cannot load it ({e})") from None


def tokenized_split(source: wikitext.TextSource, spec: wikitext.SplitSpec, text_hash: str, sp,
                    tok_hash: str, vocab_size: int, folder: pathlib.Path) -> np.ndarray:
  """The text of ``spec`` as a flat id array, memory-mapped from the verified cache (tokenized on
  first use, or when the cached copy fails verification).

  The cache key is (source, split, hash of the selected text, hash of the tokenizer model); the
  sidecar records them with the vocabulary size, dtype, size and sha256.
  """
  dtype = tokenizer_lib.token_dtype(vocab_size)

  def build(path: pathlib.Path) -> None:
    t0 = time.perf_counter()
    chunks = list(tokenizer_lib.encode_lines(sp, source.lines(spec), dtype=dtype))
    _np_save(np.concatenate(chunks) if chunks else np.zeros(0, dtype))(path)
    logging.info("tokenized %s/%s in %.1fs", source.source_id, spec, time.perf_counter() - t0)

  return cache.load_or_build(
      folder / f"{spec.split}-{text_hash[:12]}-tok{tok_hash}.npy",
      meta=dict(kind="tokens", split=str(spec), text_sha256=text_hash, tokenizer=tok_hash,
                vocab_size=vocab_size, dtype=dtype.name),
      build=build, load=lambda path: _load_array(path, dtype, below=vocab_size))


def token_counts(tokens: np.ndarray, vocab_size: int, path: pathlib.Path,
                 tokens_meta: dict) -> np.ndarray:
  """int64 [vocab_size]: occurrences of each id in ``tokens``, cached (and verified) beside them."""
  def build(out: pathlib.Path) -> None:
    counts = np.zeros(vocab_size, np.int64)
    for lo in range(0, len(tokens), 1 << 26):  # Chunks: bincount of a memmap slice stays small.
      counts += np.bincount(tokens[lo:lo + (1 << 26)], minlength=vocab_size)[:vocab_size]
    _np_save(counts)(out)

  def load(p: pathlib.Path) -> np.ndarray:
    counts = _load_array(p, np.dtype(np.int64), (vocab_size,), mmap=False)
    if counts.min() < 0 or counts.sum() != len(tokens):
      raise cache.CacheError(f"its counts sum to {counts.sum()}, not to the {len(tokens)} tokens")
    return counts

  return cache.load_or_build(path, meta=dict(kind="counts", **tokens_meta), build=build,
                             load=load)


# --- Builders --------------------------------------------------------------------------------


def _build_synthetic(c, *, seq_len, global_batch_size, seed, process_index, process_count,
                     num_train_steps):
  s = c.synthetic
  return synthetic.SyntheticDataset(
      vocab_size=c.vocab_size, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
      zipf_exponent=s.zipf_exponent, num_topics=s.num_topics, shift=s.shift,
      shift_every=s.shift_every, copy_prob=s.copy_prob, span_min=s.span_min,
      span_max=s.span_max, num_eval_sequences=s.num_eval_sequences, eval_batches=c.eval_batches,
      eval_at=s.eval_at, markov=s.markov, markov_successors=s.markov_successors,
      num_train_steps=num_train_steps, process_index=process_index, process_count=process_count)


def _build_text(c, *, seq_len, global_batch_size, seed, process_index, process_count,
                num_train_steps):
  del num_train_steps  # A text corpus is stationary by construction.
  specs = split_specs(c)  # {'train' | 'validation' | 'test': spec}
  cache_dir = resolve_cache_dir(c)
  # Local files are checked here (FileNotFoundError), before anything is trained or read.
  source = wikitext.get_source(c.name, path=c.path, local_suffix=c.local_suffix,
                               splits=sorted({s.split for s in specs.values()}),
                               cache_dir=str(cache_dir), hub_timeout_s=c.hub_timeout_s)
  folder = cache_dir / source.source_id
  folder.mkdir(parents=True, exist_ok=True)

  # Hashing local files reads them once (~1 s per GB) and checks they are non-empty UTF-8
  # text; hub releases hash by name, no network.
  text_hash = {part: source.fingerprint(spec, _SPLIT_FIELDS[part])
               for part, spec in specs.items()}
  sliced = {s.split for s in specs.values() if s.sliced}
  if sliced:
    _check_ranges(specs, {split: len(wikitext.split_articles(
        source.lines(wikitext.SplitSpec(split)))) for split in sliced})

  t = c.tokenizer
  model_meta = dict(kind="tokenizer", split=str(specs["train"]), text_sha256=text_hash["train"],
                    vocab_size=c.vocab_size, model_type=t.model_type,
                    input_sentence_size=t.input_sentence_size,
                    character_coverage=t.character_coverage)

  def train_model(path: pathlib.Path) -> None:
    t0 = time.perf_counter()
    tokenizer_lib.train_tokenizer(source.lines(specs["train"]), path, vocab_size=c.vocab_size,
                                  model_type=t.model_type,
                                  input_sentence_size=t.input_sentence_size,
                                  character_coverage=t.character_coverage)
    logging.info("trained tokenizer in %.1fs", time.perf_counter() - t0)

  sp, tok_hash = cache.load_or_build(
      folder / (f"{specs['train'].split}-{text_hash['train'][:12]}-spm-{t.model_type}"
                f"-v{c.vocab_size}-n{t.input_sentence_size}-c{t.character_coverage}.model"),
      meta=model_meta, build=train_model, load=_load_tokenizer)

  tokens = {part: tokenized_split(source, spec, text_hash[part], sp, tok_hash, c.vocab_size,
                                  folder) for part, spec in specs.items()}
  train = tokens.pop("train")
  counts = token_counts(
      train, c.vocab_size, folder / f"{specs['train'].split}-{text_hash['train'][:12]}"
      f"-tok{tok_hash}.counts.npy",
      dict(text_sha256=text_hash["train"], tokenizer=tok_hash, vocab_size=c.vocab_size))
  info = dict(source=source.source_id, tokenizer_pieces=sp.get_piece_size(),
              train_tokens=len(train), **{f"{k}_tokens": len(v) for k, v in tokens.items()},
              **{f"{k}_text": str(v) for k, v in specs.items()})
  # Not held out: the training text's first windows, evaluated like the held-out splits (at
  # most eval_batches batches), so final train_sample - test loss measures memorisation
  # ('train/loss' is one training batch at a time, drawn while the model still learns).
  # Skipped when the training text holds less than one eval batch.
  if num_windows(len(train), seq_len) >= global_batch_size:
    tokens[TRAIN_SAMPLE] = train
  return TextDataset(train_tokens=train, eval_tokens=tokens, token_counts=counts,
                     vocab_size=c.vocab_size, tokenizer=sp, seq_len=seq_len,
                     global_batch_size=global_batch_size, seed=seed,
                     eval_batches=c.eval_batches, process_index=process_index,
                     process_count=process_count, info=info, text_sha256=text_hash)


class Source(NamedTuple):
  """A data source: its config checks (no file reads) and its builder."""

  check: Callable[[ml_collections.ConfigDict], None]
  build: Callable[..., Dataset]  # (config.data, **build_dataset's keyword arguments)


# config.data.name -> Source.
DATASETS: dict[str, Source] = {
    "synthetic": Source(_check_synthetic, _build_synthetic),
    "wikitext-103": Source(_check_text, _build_text),
    "wikitext-2": Source(_check_text, _build_text),
    "local": Source(_check_text, _build_text),
}


def build_dataset(data_config: ml_collections.ConfigDict, *, seq_len: int,
                  global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, num_train_steps: int | None = None) -> Dataset:
  """The dataset of ``config.data``; every argument is checked before any heavy work.

  Args:
    data_config: config.data (see ``default_config``).
    seq_len: T; windows hold T + 1 tokens (inputs [:-1], targets [1:]).
    global_batch_size: B, sequences per step over all processes.
    seed: fixes the data order (and the synthetic corpus); batch ``s`` is a function of
      ``(seed, s)``.
    process_index, process_count: this process's rows are
      ``[process_index * B / P, (process_index + 1) * B / P)`` of the global batch.
    num_train_steps: the training horizon; the synthetic ``token_frequencies`` average the
      shifting distribution over it (unknown: one full topic cycle). Ignored for text.

  Raises:
    ValueError: an unknown config.data.name, an invalid field or argument, or a local file that
      is not UTF-8 text or is empty (the message names it and the fix); FileNotFoundError:
      missing local files; wikitext.SourceUnavailableError: a hub source offline or unreachable
      and not cached.
  """
  check_config(data_config, seq_len=seq_len, global_batch_size=global_batch_size,
               process_index=process_index, process_count=process_count)
  return DATASETS[data_config.name].build(
      data_config, seq_len=int(seq_len), global_batch_size=int(global_batch_size), seed=int(seed),
      process_index=int(process_index), process_count=int(process_count),
      num_train_steps=num_train_steps)


# --- Prefetching to devices --------------------------------------------------------------------

_END = object()


@dataclasses.dataclass
class _Failure:
  error: BaseException


class Prefetcher:
  """Iterator of ``(step, batch)`` for steps ``start_step, start_step + 1, ...``.

  A background thread calls ``batch_fn(step)``, keeping at most ``buffer_size`` process-local
  numpy batches ready, so host work overlaps the step; ``next`` turns one into a global
  ``jax.Array`` with ``jax.make_array_from_process_local_data(sharding, local)``. That copy is
  asynchronous and tiny (a [B, T + 1] int32 batch), and it is issued from the consumer's thread
  on purpose: a copy from another thread while the step runs for the first time (when XLA
  captures it as a CUDA graph) can join the capture and fail it ("capturing stream has unjoined
  work", seen intermittently on H100s, BENCHMARKS.md). An exception in the thread is re-raised
  by ``next``. ``close()`` (or leaving a ``with`` block) stops the thread.

  Attributes:
    wait_seconds: total time ``next`` spent blocked on the thread or issuing the copy: the
      input wait of the loop.
    num_waited: batches handed out (``wait_seconds / num_waited`` is the mean wait per step).
  """

  def __init__(self, batch_fn: Callable[[int], np.ndarray], start_step: int, sharding,
               buffer_size: int = 2, end_step: int | None = None):
    if buffer_size < 1:
      raise ValueError(f"buffer_size={buffer_size} must be >= 1 (config.prefetch).")
    self._batch_fn, self._sharding = batch_fn, sharding
    self._queue: queue.Queue = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._done = False
    self.wait_seconds = 0.0
    self.num_waited = 0
    self._thread = threading.Thread(target=self._work, args=(int(start_step), end_step),
                                    name="prefetch_to_device", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    # Poll so close() is noticed even while the queue is full.
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def _work(self, step: int, end_step: int | None) -> None:
    try:
      while end_step is None or step < end_step:
        if not self._put((step, self._batch_fn(step))):
          return
        step += 1
      self._put(_END)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      self._put(_Failure(e))

  def __iter__(self) -> "Prefetcher":
    return self

  def __next__(self) -> tuple[int, Any]:
    if self._done:
      raise StopIteration
    t0 = time.perf_counter()
    item = self._queue.get()
    self.wait_seconds += time.perf_counter() - t0
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = True
      self.close()
      raise item.error
    self.num_waited += 1
    step, local = item
    if self._sharding is None:
      return step, local
    return step, jax.make_array_from_process_local_data(self._sharding, local)

  def close(self, timeout: float = 10.0) -> None:
    """Stops the thread and drops the batches it had ready."""
    self._stop.set()
    self._done = True
    while True:  # Unblock a put in progress.
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread is not threading.current_thread():
      self._thread.join(timeout)

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def prefetch_to_device(batch_fn: Callable[[int], np.ndarray], start_step: int, sharding,
                       buffer_size: int = 2, *, end_step: int | None = None) -> Prefetcher:
  """Batches for steps ``start_step, ...`` (up to ``end_step``, exclusive, if given) built and put
  on devices ahead of use; yields ``(step, jax.Array)``. ``sharding=None`` yields the numpy
  batches unchanged. See ``Prefetcher``."""
  return Prefetcher(batch_fn, start_step, sharding, buffer_size, end_step)
