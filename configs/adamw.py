"""adamw on the shared setup of configs/default.py (only `config.optimizer` differs).

  python -m jaxopt_study.main --config=configs/adamw.py:tiny --workdir=runs/adamw
  python -m jaxopt_study.main --config=configs/adamw.py:gpt2_small --workdir=runs/adamw_gpt2

Fields and their sources: configs/default.py, `adamw_block`.
"""

from configs import default


def get_config(preset=None):
  return default.with_optimizer("adamw", preset)
