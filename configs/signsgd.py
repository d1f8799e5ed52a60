"""signsgd on the shared setup of configs/default.py (only `config.optimizer` differs).

  python -m jaxopt_study.main --config=configs/signsgd.py:tiny --workdir=runs/signsgd
  python -m jaxopt_study.main --config=configs/signsgd.py:gpt2_small --workdir=runs/signsgd_gpt2

Fields and their sources: configs/default.py, `signsgd_block`.
"""

from configs import default


def get_config(preset=None):
  return default.with_optimizer("signsgd", preset)
