"""The optimizer study's presets; defined in jaxopt_study/study/presets.py (documented there).

  python scripts/run_study.py --config=configs/study.py:tiny --workdir=studies/tiny
  python scripts/run_study.py --config=configs/study.py:small --workdir=studies/small
"""

from jaxopt_study.study import presets

PRESETS = presets.PRESETS


def get_config(preset=None):
  return presets.get_config(preset)
