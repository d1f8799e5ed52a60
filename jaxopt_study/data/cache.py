"""Verified cache files: each has a JSON sidecar that is checked before the file is used.

    <name>          the cached file (a tokenizer model, a token array ``.npy``, ...)
    <name>.json     {"format": 1, "bytes": <size>, "sha256": <digest of the file>, **meta}

``load_or_build`` uses a cached file only when its sidecar exists and parses, the sidecar's
``meta`` equals what the caller expects now (vocabulary size, tokenizer hash, text hash, ...), the
file's size and sha256 equal the recorded ones, and the caller's ``load`` accepts the contents
(e.g. dtype and token-id range). Anything else (no sidecar, a truncated, zeroed or overwritten
file, a planted ``.npy`` of another dtype, ...) logs a warning that names the file and the reason,
and the file is rebuilt: a bad cache is never used, and never needs deleting by hand.

Writes go to a unique temporary name, are checked with ``load``, then renamed into place, file
first and sidecar second. Readers never see a partial file; a crash between the two renames
leaves a file without a sidecar, which is rebuilt rather than trusted; processes racing to build
the same file each write a complete, identical copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import uuid
from typing import Any, Callable, TypeVar

FORMAT = 1  # Sidecar layout version; a sidecar of another version is rebuilt.
_CHUNK = 1 << 24  # Bytes per read when hashing.

T = TypeVar("T")


class CacheError(ValueError):
  """A cached file failed a check; the message says which."""


def sidecar(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.name + ".json")


def file_digest(path: pathlib.Path) -> tuple[int, str]:
  """(size in bytes, sha256 hex digest) of ``path``, read in chunks."""
  h, size = hashlib.sha256(), 0
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
      size += len(chunk)
  return size, h.hexdigest()


def check(path: pathlib.Path, meta: dict[str, Any]) -> None:
  """Raises CacheError unless ``path`` matches its sidecar and the sidecar records ``meta``."""
  side = sidecar(path)
  if not path.is_file():
    raise CacheError("the file is missing")
  try:
    recorded = json.loads(side.read_text())
  except FileNotFoundError:
    raise CacheError(f"it has no sidecar {side.name} (written by an older version, or a "
                     "crash between the two writes)") from None
  except (OSError, ValueError) as e:
    raise CacheError(f"its sidecar {side.name} is unreadable ({e})") from None
  if not isinstance(recorded, dict):
    raise CacheError(f"its sidecar {side.name} is not a JSON object")
  for key, want in {"format": FORMAT, **meta}.items():
    if recorded.get(key) != want:
      raise CacheError(f"its sidecar records {key}={recorded.get(key)!r}, expected {want!r}")
  size = path.stat().st_size
  if size != recorded.get("bytes"):
    raise CacheError(f"it has {size} bytes where its sidecar records {recorded.get('bytes')} "
                     "(truncated or overwritten)")
  if file_digest(path)[1] != recorded.get("sha256"):
    raise CacheError("its sha256 differs from the one its sidecar records (corrupted)")


def _tmp_name(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def load_or_build(path: pathlib.Path, *, meta: dict[str, Any],
                  build: Callable[[pathlib.Path], None],
                  load: Callable[[pathlib.Path], T]) -> T:
  """``load(path)`` if the cached file verifies, else builds it first (see the module docstring).

  Args:
    path: the cached file.
    meta: JSON-able facts the file must have been built from (checked against its sidecar).
    build: writes the file's contents to the path it is given.
    load: reads a file; raises CacheError if the contents are wrong (beyond the checksum).

  Raises:
    CacheError: a freshly built file fails ``load`` (a bug in ``build``, never a bad cache).
  """
  if path.exists() or sidecar(path).exists():
    try:
      check(path, meta)
      return load(path)
    except CacheError as e:
      logging.warning("Cache file %s is not valid: %s. Rebuilding it.", path, e)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_name(path)
  try:
    build(tmp)
    load(tmp)
    size, digest = file_digest(tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  side_tmp = _tmp_name(sidecar(path))
  side_tmp.write_text(json.dumps({"format": FORMAT, "bytes": size, "sha256": digest, **meta},
                                 indent=1, sort_keys=True))
  os.replace(side_tmp, sidecar(path))
  return load(path)
