"""The `small` size. `--config configs/small.py` trains the E2E system; `configs/small.py:cascaded` the baseline."""
from e2etts_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.get_config("small", mode=arg or "e2e")
