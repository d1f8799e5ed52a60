"""lion on the shared setup of configs/default.py (only `config.optimizer` differs).

  python -m jaxopt_study.main --config=configs/lion.py:tiny --workdir=runs/lion
  python -m jaxopt_study.main --config=configs/lion.py:gpt2_small --workdir=runs/lion_gpt2

Fields and their sources: configs/default.py, `lion_block`.
"""

from configs import default


def get_config(preset=None):
  return default.with_optimizer("lion", preset)
