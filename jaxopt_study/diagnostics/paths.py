"""Parameter paths -> kind and layer (the grouping used by every per-kind / per-layer metric).

A parameter's *path* is its key path in the params pytree joined with ``/``, e.g.
``block_3/attn/query/kernel``. Its *kind* comes from the first rule in :data:`KIND_RULES` whose
regex matches the path (``re.search``), else ``"other"``; its *layer* is the integer ``i`` of a
``block_<i>`` path component (:data:`LAYER_PATTERN`), else ``None`` (not in a block: no
``layer=`` aggregate).

:data:`KIND_RULES` is a module-level list read at trace time: users may override or extend it,
e.g. ``diagnostics.paths.KIND_RULES.insert(0, (r'(^|/)router(/|$)', 'moe_router'))``.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import jax

# (regex searched in the '/'-joined path, kind). First match wins.
KIND_RULES: list[tuple[str, str]] = [
    (r"(^|/)wte(/|$)", "token_embedding"),
    (r"(^|/)wpe(/|$)", "position_embedding"),
    (r"(^|/)ln_[^/]*(/|$)", "norm"),
    (r"(^|/)attn(/|$)", "attention"),
    (r"(^|/)mlp/experts(/|$)", "moe_expert"),  # models/moe.py; before 'mlp', their parent
    (r"(^|/)mlp/router(/|$)", "moe_router"),
    (r"(^|/)mlp(/|$)", "mlp"),
    (r"(^|/)lm_head(/|$)", "head"),
]
OTHER_KIND = "other"
# The layer index is group 1 of this regex.
LAYER_PATTERN = r"(?:^|/)block_(\d+)(?:/|$)"


def key_name(k: Any) -> str:
  """One key-path entry as a string (DictKey, GetAttrKey, SequenceKey, NamedTupleKey...)."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(key_path) -> str:
  """'/'-joined path of a jax key path."""
  return "/".join(key_name(k) for k in key_path)


def kind_of(path: str, rules: Optional[list[tuple[str, str]]] = None) -> str:
  for pattern, kind in (KIND_RULES if rules is None else rules):
    if re.search(pattern, path):
      return kind
  return OTHER_KIND


def layer_of(path: str) -> Optional[int]:
  m = re.search(LAYER_PATTERN, path)
  return int(m.group(1)) if m else None


def flatten(tree) -> dict[str, Any]:
  """{path string: leaf} in jax's flattening order (sorted dict keys)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(kp): leaf for kp, leaf in leaves}
