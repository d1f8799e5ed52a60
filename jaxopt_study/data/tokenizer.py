"""SentencePiece tokenizer trained on the training text, cached by source, vocab and text hash.

Special ids follow SentencePiece's defaults: ``unk = 0``, ``bos = 1``, ``eos = 2``, no pad (the
pipeline packs text, so nothing is ever padded). ``byte_fallback`` spells any character outside
the learned pieces as UTF-8 bytes, so ``unk`` never occurs in practice.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pathlib
import re
import uuid
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MODEL_TYPES = ("unigram", "bpe")
# 3 specials + 256 byte pieces must fit, plus some room for the characters and merges.
MIN_VOCAB_SIZE = 320
_TRAIN_SEED = 0  # The tokenizer is shared by every run of a study, whatever its seed.


def train_tokenizer(lines: Iterable[str], model_path: str | os.PathLike, *, vocab_size: int,
                    model_type: str = "unigram", input_sentence_size: int = 100_000,
                    character_coverage: float = 0.9995,
                    num_threads: int | None = None) -> pathlib.Path:
  """Trains a SentencePiece model on ``lines`` and writes it atomically to ``model_path``.

  ``input_sentence_size`` caps training at a random sample of that many lines (reservoir
  sampling over the whole input with ``shuffle_input_sentence``), so WikiText-103's 1.8M lines
  train in about the time of the sample, and a small file in seconds. ``hard_vocab_limit=False``
  lets a small corpus end with fewer pieces than asked for instead of failing; ids then stay below
  ``vocab_size`` anyway.

  Raises:
    ValueError: naming config.data.vocab_size when the vocabulary cannot hold the corpus's
      required characters, or config.data.tokenizer.* when SentencePiece rejects the settings.
  """
  model_path = pathlib.Path(model_path)
  model_path.parent.mkdir(parents=True, exist_ok=True)
  prefix = model_path.parent / f".{model_path.stem}.{os.getpid()}.{uuid.uuid4().hex}"
  sentences = (s for s in (line.strip() for line in lines) if s)  # Blank lines carry nothing.
  spm.set_random_generator_seed(_TRAIN_SEED)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,  # Numbers as digits: no vocabulary spent on '1994', '1995', ...
        hard_vocab_limit=False,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=1 << 16,  # WikiText paragraphs exceed the 4192-byte default.
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,  # SentencePiece logs every EM round otherwise.
    )
  except RuntimeError as e:
    msg = str(e)
    if "Vocabulary size is smaller than required_chars" in msg or "vocab_size" in msg:
      # SentencePiece says e.g. "... smaller than required_chars. 320 vs 338.": the second
      # number is what this corpus needs (its characters plus the special pieces).
      needed = re.search(r"(\d+) vs (\d+)", msg)
      least = max(MIN_VOCAB_SIZE, int(needed[2])) if needed else MIN_VOCAB_SIZE
      raise ValueError(
          f"config.data.vocab_size={vocab_size} is too small for this corpus ({msg.strip()}); "
          f"raise it (>= {least}, typically 8192-50304) or lower "
          f"config.data.tokenizer.character_coverage.") from e
    raise ValueError(f"SentencePiece training failed with config.data.tokenizer "
                     f"(model_type={model_type!r}, vocab_size={vocab_size}): {msg.strip()}") from e
  os.replace(f"{prefix}.model", model_path)
  os.remove(f"{prefix}.vocab")  # A human-readable copy of the model; not needed.
  return model_path


def load_tokenizer(model_path: str | os.PathLike) -> tuple[spm.SentencePieceProcessor, str]:
  """The model at ``model_path`` and its identity (12 hex digits of the sha256 of its bytes).

  Both come from one read, so they agree even if another process replaces the file meanwhile.
  """
  model = pathlib.Path(model_path).read_bytes()
  return (spm.SentencePieceProcessor(model_proto=model),
          hashlib.sha256(model).hexdigest()[:12])


def token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest dtype for ids in ``[0, vocab_size)``: halves the cache for vocabs <= 65536."""
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def encode_lines(sp: spm.SentencePieceProcessor, lines: Iterable[str], *, dtype: np.dtype,
                 chunk_lines: int = 16_384,
                 num_threads: int | None = None) -> Iterator[np.ndarray]:
  """Token ids of the non-blank lines, each followed by EOS, as flat chunks.

  One EOS per line (header or paragraph) is WikiText's own convention: it keeps the layout that
  SentencePiece's whitespace normalisation would erase, and EOS marks every document boundary
  because each article starts on a line of its own.

  Yields:
    1-d arrays of ``dtype``; their concatenation is the tokenized text.
  """
  sentences = (s for s in (line.strip() for line in lines) if s)
  while batch := list(itertools.islice(sentences, chunk_lines)):
    ids = sp.encode(batch, out_type=int, add_eos=True, num_threads=num_threads or -1)
    yield np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                      count=sum(len(x) for x in ids))
