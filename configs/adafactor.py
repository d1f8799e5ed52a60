"""adafactor on the shared setup of configs/default.py (only `config.optimizer` differs).

  python -m jaxopt_study.main --config=configs/adafactor.py:tiny --workdir=runs/adafactor
  python -m jaxopt_study.main --config=configs/adafactor.py:gpt2_small --workdir=runs/adafactor_gpt2

Fields and their sources: configs/default.py, `adafactor_block`.
"""

from configs import default


def get_config(preset=None):
  return default.with_optimizer("adafactor", preset)
