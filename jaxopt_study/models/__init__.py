"""Models of the study."""
from jaxopt_study.models.gpt import GPT, GPTConfig, from_config
