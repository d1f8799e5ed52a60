"""sgd_momentum on the shared run config of jaxopt_study/presets.py (only `config.optimizer` differs).

  python -m jaxopt_study.main --config=configs/sgd_momentum.py:tiny --workdir=runs/sgd_momentum
  python -m jaxopt_study.main --config=configs/sgd_momentum.py:gpt2_small --workdir=runs/sgd_momentum_gpt2

Fields and their sources: jaxopt_study/presets.py; the optimizer block: optimizers.default_config.
"""

from jaxopt_study import presets


def get_config(preset=None):
  return presets.get_config(preset, optimizer="sgd_momentum")
