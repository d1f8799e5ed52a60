"""WikiText text sources: the Hugging Face hub (WikiText-103, WikiText-2) and local files.

Both give the text as lines, in WikiText's own layout (Merity et al. 2016):

    ' = Title = '                 an article header: exactly one '=' on each side
    ' = = Section = = '           a section header (' = = = Sub = = = ' deeper)
    ' Some paragraph text . '     one paragraph per line
    ' '                           blank separator lines

Nothing here tokenizes; ``tokenizer.py`` and ``pipeline.py`` do. Getting text never hangs:
offline mode (``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``) is checked first, and the hub is
probed with a short timeout before ``datasets`` (whose retries take ~25 s) is asked for anything.
Every failure names the source and the fix.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import hashlib
import itertools
import os
import pathlib
import re
import urllib.error
import urllib.request
from typing import Iterable, Iterator

HF_DATASET = "Salesforce/wikitext"
# config.data.name -> Hugging Face config of the raw (untokenized, no <unk>) release.
HF_CONFIGS = {
    "wikitext-103": "wikitext-103-raw-v1",
    "wikitext-2": "wikitext-2-raw-v1",
}
SPLITS = ("train", "valid", "test")
_HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
LOCAL_SUFFIXES = ("tokens", "raw")

# One '=' each side; the title neither starts nor ends with another '=' (that is a section).
_ARTICLE_RE = re.compile(r"^ = (?!=)(.*?)(?<!=) = $")
_SECTION_RE = re.compile(r"^ (?:= ){2,}(?!=)(.*?)(?<!=)(?: =){2,} $")
_TRUE = ("1", "on", "yes", "true")


class SourceUnavailableError(RuntimeError):
  """The text of a source cannot be had here and now (offline, unreachable, not cached)."""


# --- WikiText layout ---------------------------------------------------------------------


def is_article_header(line: str) -> bool:
  """True for ``' = Title = '`` (a trailing newline is ignored), False for sections."""
  return _ARTICLE_RE.match(line.rstrip("\n")) is not None


def is_section_header(line: str) -> bool:
  """True for ``' = = Section = = '`` and deeper levels."""
  return _SECTION_RE.match(line.rstrip("\n")) is not None


def count_articles(lines: Iterable[str]) -> int:
  """Number of article headers among ``lines``."""
  return sum(1 for line in lines if is_article_header(line))


def split_articles(lines: Iterable[str]) -> list[list[str]]:
  """Groups lines into articles, each starting at its header; lines before the first header
  (WikiText files open with a blank line) belong to the first article."""
  articles: list[list[str]] = []
  prefix: list[str] = []
  for line in lines:
    if is_article_header(line):
      articles.append(prefix + [line] if not articles else [line])
    elif articles:
      articles[-1].append(line)
    else:
      prefix.append(line)
  return articles or ([prefix] if prefix else [])


@dataclasses.dataclass(frozen=True)
class CorpusStats:
  lines: int  # Lines, blank ones included (the count WikiText's release notes give).
  articles: int  # ' = Title = ' headers.
  sections: int  # ' = = Section = = ' headers, all levels.
  words: int  # Whitespace-separated tokens (headers and '<unk>' included).

  @property
  def words_with_eos(self) -> int:
    """Words plus one end-of-line token per line: the token count the WikiText paper reports
    (217,646 for WikiText-103 validation)."""
    return self.words + self.lines


def corpus_stats(lines: Iterable[str]) -> CorpusStats:
  n = articles = sections = words = 0
  for line in lines:
    n += 1
    articles += is_article_header(line)
    sections += is_section_header(line)
    words += len(line.split())
  return CorpusStats(lines=n, articles=articles, sections=sections, words=words)


def read_lines(path: str | os.PathLike) -> Iterator[str]:
  """Lines of a UTF-8 text file without their trailing newline."""
  with open(path, encoding="utf-8") as f:
    for line in f:
      yield line.rstrip("\n")


# --- Split specifications ----------------------------------------------------------------

_SPEC_RE = re.compile(r"^(?P<split>\w+)(?:\[(?P<start>\d+%?)?:(?P<stop>\d+%?)?\])?$")


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """A split, or a contiguous range of its articles: ``'test'``, ``'test[:50%]'``, ``'test[32:]'``.

  The slice is over articles (a header line ``' = Title = '`` and the lines up to the next one;
  lines before the first header belong to the first article), so no article is cut in two and
  ``'test[:50%]'`` / ``'test[50%:]'`` are disjoint halves, as in TFDS's split slicing. A bound is
  an article count or a percentage; ``p%`` of ``n`` articles is ``floor(n * p / 100)``.
  """

  split: str  # One of SPLITS.
  start: str | None = None  # '12' or '50%'; None: from the first article.
  stop: str | None = None  # None: to the end.

  def __str__(self) -> str:
    if self.start is None and self.stop is None:
      return self.split
    return f"{self.split}[{self.start or ''}:{self.stop or ''}]"

  @property
  def sliced(self) -> bool:
    return self.start is not None or self.stop is not None

  def article_range(self, num_articles: int) -> range:
    """The indices of the articles this spec selects out of ``num_articles``."""
    def bound(b: str | None, default: int) -> int:
      if b is None:
        return default
      return num_articles * int(b[:-1]) // 100 if b.endswith("%") else min(int(b), num_articles)
    return range(bound(self.start, 0), bound(self.stop, num_articles))


def parse_split(spec: str, field: str) -> SplitSpec:
  """Parses ``config.data.<field>``; the error names the field and the syntax."""
  m = _SPEC_RE.match(str(spec).strip())
  if m is None or m["split"] not in SPLITS:
    raise ValueError(f"config.data.{field}={spec!r} is not a split: use one of {SPLITS}, or a "
                     f"range of its articles such as 'test[:50%]', 'test[50%:]' or 'valid[:30]'.")
  for b in (m["start"], m["stop"]):
    if b is not None and b.endswith("%") and int(b[:-1]) > 100:
      raise ValueError(f"config.data.{field}={spec!r}: a percentage bound must be <= 100%.")
  return SplitSpec(m["split"], m["start"], m["stop"])


def select(lines: Iterable[str], spec: SplitSpec) -> Iterator[str]:
  """The lines of ``spec``'s articles (all lines, streamed, when it is not sliced)."""
  if not spec.sliced:
    return iter(lines)
  articles = split_articles(lines)
  return itertools.chain.from_iterable(articles[i] for i in spec.article_range(len(articles)))


# --- Checked local text files -----------------------------------------------------------


def text_file_sha256(path: str | os.PathLike, field: str) -> str:
  """sha256 of a local text file, checking in the same read that it is UTF-8 text with content.

  A file that is not UTF-8 (a Latin-1 export, a binary file), holds NUL bytes (binary), or has
  no non-blank line would otherwise fail inside SentencePiece with an error that names neither
  the file nor the fix.

  Args:
    path: the file.
    field: the config field that selected it (for the error), e.g. 'train_split'.

  Raises:
    ValueError: naming the file, the byte offset and line of the first bad byte, and the fix.
  """
  fix = (f"Fix: point config.data.path / config.data.{field} at a UTF-8 text file in WikiText "
         "layout (convert other encodings first, e.g. iconv -f latin1 -t utf-8).")
  h = hashlib.sha256()
  decoder = codecs.getincrementaldecoder("utf-8")()
  offset, has_text = 0, False
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
      bad, why = chunk.find(b"\0"), "a NUL byte (a binary file, not text)"
      try:
        text = decoder.decode(chunk)
      except UnicodeDecodeError as e:
        # e.object is the chunk after any bytes of a character the previous chunk began.
        start = max(0, e.start - (len(e.object) - len(chunk)))
        if bad < 0 or start < bad:
          bad, why = start, f"0x{e.object[e.start]:02x}, which is not UTF-8"
        text = ""
      if bad >= 0:
        line = 1 + _count_newlines(path, offset + bad)
        raise ValueError(f"{path} (config.data.{field}) is not UTF-8 text: byte {offset + bad} "
                         f"(line {line}) is {why}. {fix}")
      if not has_text:
        has_text = bool(text.strip())
      offset += len(chunk)
  try:
    decoder.decode(b"", final=True)
  except UnicodeDecodeError:
    raise ValueError(f"{path} (config.data.{field}) is not UTF-8 text: it ends inside a "
                     f"multi-byte character (truncated?). {fix}") from None
  if not has_text:
    raise ValueError(f"{path} (config.data.{field}) has no text: it is empty or holds only "
                     f"blank lines, so there is nothing to tokenize. Fix: fill it, or choose "
                     f"another split with config.data.{field} (one of {SPLITS}), or another "
                     f"folder with config.data.path.")
  return h.hexdigest()


def _count_newlines(path, num_bytes: int) -> int:
  with open(path, "rb") as f:
    return f.read(num_bytes).count(b"\n")


# --- Sources -----------------------------------------------------------------------------


def local_files(path: str, splits: Iterable[str], suffix: str = "auto") -> dict[str, pathlib.Path]:
  """The local files ``wiki.{split}.{tokens,raw}`` of ``splits`` in folder ``path``.

  Args:
    path: config.data.path.
    splits: split names out of ``SPLITS``.
    suffix: 'tokens', 'raw', or 'auto' (the first suffix, in that order, with every split).

  Raises:
    FileNotFoundError: naming config.data.path, the files expected and the fix.
  """
  splits = list(splits)
  if suffix not in ("auto",) + LOCAL_SUFFIXES:
    raise ValueError(f"config.data.local_suffix={suffix!r} is not one of "
                     f"{('auto',) + LOCAL_SUFFIXES}.")
  fix = ("set config.data.path to a folder holding WikiText files (e.g. the unzipped "
         "wikitext-103 release), or use config.data.name='wikitext-103' / 'wikitext-2' to download "
         "through Hugging Face datasets, or config.data.name='synthetic' for no files at all.")
  if not path:
    raise FileNotFoundError(f"config.data.name='local' needs config.data.path, which is empty: "
                            f"{fix}")
  folder = pathlib.Path(path).expanduser()
  suffixes = LOCAL_SUFFIXES if suffix == "auto" else (suffix,)
  for s in suffixes:
    files = {split: folder / f"wiki.{split}.{s}" for split in splits}
    if all(f.is_file() for f in files.values()):
      return files
  expected = " and ".join(f"wiki.{split}.{{{','.join(suffixes)}}}" for split in splits)
  found = sorted(p.name for p in folder.glob("wiki.*")) if folder.is_dir() else None
  where = (f"it holds {found or 'no wiki.* files'}" if found is not None
           else "it is not a directory")
  raise FileNotFoundError(
      f"config.data.path={str(path)!r}: expected {expected} ({where}). Fix: {fix} "
      f"To train or evaluate on other splits, set config.data.train_split / "
      f"config.data.validation_split / config.data.test_split (valid: {SPLITS}).")


def hf_offline() -> bool:
  """True when the environment asks Hugging Face libraries not to use the network."""
  return any(os.environ.get(v, "").strip().lower() in _TRUE
             for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout_s: float) -> tuple[bool, str]:
  """Probes the hub (``$HF_ENDPOINT``) with one request; any HTTP answer counts as reachable.

  urllib honours the usual proxy variables, unlike a bare socket.
  """
  endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
  url = f"{endpoint}/api/datasets/{HF_DATASET}"
  try:
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
    return True, url
  except urllib.error.HTTPError:
    return True, url  # The server answered: the network works.
  except (urllib.error.URLError, OSError, ValueError) as e:
    return False, f"{url}: {getattr(e, 'reason', e)}"


@dataclasses.dataclass(frozen=True)
class TextSource:
  """Where the text comes from. ``source_id`` and ``fingerprint(spec)`` key every cache."""

  name: str  # config.data.name
  source_id: str  # Folder name in the cache.
  files: dict | None = None  # split -> local path, for 'local'.
  hf_cache_dir: str | None = None
  hub_timeout_s: float = 5.0

  def fingerprint(self, spec: SplitSpec, field: str) -> str:
    """A hash of the text ``spec`` selects. Hub releases are immutable, so their name is their
    identity (and no network is needed to find a cache); local files are hashed by content,
    and checked to be non-empty UTF-8 text on the way (``text_file_sha256``)."""
    if self.files is None:
      name = f"{HF_DATASET}/{HF_CONFIGS[self.name]}/{_HF_SPLITS[spec.split]}"
      whole = hashlib.sha256(name.encode()).hexdigest()
    else:
      whole = text_file_sha256(self.files[spec.split], field)
    return hashlib.sha256(f"{whole}|{spec}".encode()).hexdigest() if spec.sliced else whole

  def lines(self, spec: SplitSpec) -> Iterator[str]:
    """The lines of ``spec``; for the hub this downloads (or reads the datasets cache) on first
    use."""
    if self.files is not None:
      whole = read_lines(self.files[spec.split])
    else:
      whole = _hf_lines(self.name, spec.split, self.hf_cache_dir, self.hub_timeout_s)
    return select(whole, spec)


def get_source(name: str, *, path: str = "", local_suffix: str = "auto",
               splits: Iterable[str] = ("train", "valid", "test"), cache_dir: str = "",
               hub_timeout_s: float = 5.0) -> TextSource:
  """The text source of ``config.data.name``; local files are checked here, before any work."""
  splits = list(splits)
  if name == "local":
    files = local_files(path, splits, local_suffix)
    folder = str(pathlib.Path(path).expanduser().resolve())
    tag = hashlib.sha256(folder.encode()).hexdigest()[:8]
    return TextSource(name=name, source_id=f"local-{pathlib.Path(folder).name}-{tag}", files=files)
  if name in HF_CONFIGS:
    return TextSource(name=name, source_id=name,
                      hf_cache_dir=os.path.join(cache_dir, "huggingface") if cache_dir else None,
                      hub_timeout_s=hub_timeout_s)
  raise ValueError(f"config.data.name={name!r} is not a text source; valid: "
                   f"{sorted(HF_CONFIGS) + ['local']}.")


def _hf_lines(name: str, split: str, cache_dir: str | None, timeout_s: float) -> Iterator[str]:
  hf_config, hf_split = HF_CONFIGS[name], _HF_SPLITS[split]
  what = f"config.data.name={name!r} (Hugging Face {HF_DATASET}, config {hf_config}, " \
         f"split {hf_split})"
  fix = (f"Fix: run once with network access so the text is cached (under {cache_dir}), or set "
         f"config.data.name='local' and config.data.path to a folder with wiki.train.tokens and "
         f"wiki.valid.tokens (or .raw), or use config.data.name='synthetic'.")
  offline = hf_offline()
  if not offline:
    ok, detail = hub_reachable(timeout_s)
    if not ok:
      raise SourceUnavailableError(
          f"{what} is not in the tokenized cache and the hub is unreachable ({detail}; probe "
          f"timeout config.data.hub_timeout_s={timeout_s}). {fix} If the raw dataset is already "
          f"in the datasets cache, set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 to read it offline.")
  try:
    import datasets  # pylint: disable=g-import-not-at-top  (slow import, only needed here)
    with _offline_mode(offline):
      ds = datasets.load_dataset(HF_DATASET, hf_config, split=hf_split, cache_dir=cache_dir)
  except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
    mode = ("offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and it is not cached"
            if offline else "loading failed")
    raise SourceUnavailableError(f"{what}: {mode}: {type(e).__name__}: {e}. {fix}") from e
  return _iter_hf_text(ds)


@contextlib.contextmanager
def _offline_mode(offline: bool):
  """Makes ``datasets`` and ``huggingface_hub`` honour the offline variables as they are now.

  Both read them once, at import: set after that (a notebook, a test), they would be ignored and
  ``load_dataset`` would retry the network for ~25 s before failing.
  """
  import datasets  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
  if offline:
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
  try:
    yield
  finally:
    datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _iter_hf_text(ds) -> Iterator[str]:
  # Batched column reads: ~100x faster than row dicts on the 1.8M-row WikiText-103 train split.
  for batch in ds.iter(batch_size=10_000):
    for line in batch["text"]:
      yield line.rstrip("\n")
