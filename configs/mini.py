"""The `mini` size: small's audio/text/data with quarter-size networks, for multi-seed ablations on a few cores.
`--config configs/mini.py` trains the E2E system; `configs/mini.py:cascaded` the baseline."""
from e2etts_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.get_config("mini", mode=arg or "e2e")
