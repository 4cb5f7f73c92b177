"""The `paper` size. `--config configs/paper.py` trains the E2E system; `configs/paper.py:cascaded` the baseline."""
from e2etts_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.get_config("paper", mode=arg or "e2e")
