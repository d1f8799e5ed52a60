"""sgd_momentum on the shared setup of configs/default.py (only `config.optimizer` differs).

  python -m jaxopt_study.main --config=configs/sgd_momentum.py:tiny --workdir=runs/sgd_momentum
  python -m jaxopt_study.main --config=configs/sgd_momentum.py:gpt2_small --workdir=runs/sgd_momentum_gpt2

Fields and their sources: configs/default.py, `sgd_momentum_block`.
"""

from configs import default


def get_config(preset=None):
  return default.with_optimizer("sgd_momentum", preset)
