"""signsgd on the shared run config of jaxopt_study/presets.py (only `config.optimizer` differs).

  python -m jaxopt_study.main --config=configs/signsgd.py:tiny --workdir=runs/signsgd
  python -m jaxopt_study.main --config=configs/signsgd.py:gpt2_small --workdir=runs/signsgd_gpt2

Fields and their sources: jaxopt_study/presets.py; the optimizer block: optimizers.default_config.
"""

from jaxopt_study import presets


def get_config(preset=None):
  return presets.get_config(preset, optimizer="signsgd")
