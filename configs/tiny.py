"""The `tiny` size. `--config configs/tiny.py` trains the E2E system; `configs/tiny.py:cascaded` the baseline."""
from e2etts_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.get_config("tiny", mode=arg or "e2e")
