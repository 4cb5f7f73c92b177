"""The `base` size. `--config configs/base.py` trains the E2E system; `configs/base.py:cascaded` the baseline."""
from e2etts_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.get_config("base", mode=arg or "e2e")
