"""Command-line parsing shared by ``jaxopt_study.main`` and ``scripts/``: one-line errors.

absl prints a traceback for what a user gets wrong most often: a typo'd config field
(``--config.optimizer.learnin_rate=1``: ml_collections' "Did you mean" escaped inside a
55-line traceback) or a config file that does not exist (two tracebacks). ``parse_flags`` is
the ``flags_parser`` of ``absl.app.run``: the same parsing, one line with the fix instead.

  app.run(main, flags_parser=cli.parse_flags)
"""

import ast
import glob
import os
import re
import sys

from absl import flags

_CONFIG_FILE = re.compile(r"^--?(?P<flag>\w+)=(?P<file>[^:]+\.py)(:.*)?$")


def _message(e: BaseException) -> str:
  """The innermost readable message of ``e`` (ml_collections wraps a KeyError's repr in an
  AttributeError), unescaped, on one line."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = str(e.args[0]) if e.args else str(e)
  for _ in range(2):  # str(KeyError(s)) is repr(s), sometimes twice over
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      try:
        text = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        break
  return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def missing_config_file(argv) -> str | None:
  """The error for a ``--FLAG=FILE.py[:PRESET]`` whose file does not exist (listing the config
  files beside it), else None."""
  for arg in argv[1:]:
    m = _CONFIG_FILE.match(arg)
    if m and not os.path.isfile(m["file"]):
      folder = os.path.dirname(m["file"]) or "."
      found = sorted(glob.glob(os.path.join(folder, "*.py")))
      listed = ", ".join(found) if found else f"none in {folder}/"
      return (f"--{m['flag']}={m['file']}: no such file (from {os.getcwd()}); config files: "
              f"{listed}")
  return None


def parse_flags(argv):
  """``absl.app.run``'s flag parsing, exiting with one line (status 1) on a bad flag."""
  if (error := missing_config_file(argv)) is not None:
    sys.exit(f"error: {error}")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --help for the flags.")
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if re.match(r"^--?\w+\.", a)]
    where = f" (overrides: {' '.join(overrides)})" if overrides else ""
    sys.exit(f"error: bad config override{where}: {_message(e)}")
