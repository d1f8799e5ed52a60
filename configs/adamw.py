"""adamw on the shared run config of jaxopt_study/presets.py (only `config.optimizer` differs).

  python -m jaxopt_study.main --config=configs/adamw.py:tiny --workdir=runs/adamw
  python -m jaxopt_study.main --config=configs/adamw.py:gpt2_small --workdir=runs/adamw_gpt2

Fields and their sources: jaxopt_study/presets.py; the optimizer block: optimizers.default_config.
"""

from jaxopt_study import presets


def get_config(preset=None):
  return presets.get_config(preset, optimizer="adamw")
