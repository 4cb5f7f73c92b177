"""The test harness's own machinery (tests/conftest.py)."""
import os

from tests import conftest


def test_fast_compile_flags_keep_only_flags_this_jaxlib_knows(monkeypatch):
  """XLA aborts on an unknown flag in XLA_FLAGS: the probe must drop one and keep the known ones, in order."""
  monkeypatch.delenv("E2ETTS_TEST_FAST_XLA_FLAGS")
  known = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
  got = conftest._accepted_xla_flags(("--xla_cpu_no_such_flag_e2etts=true",) + known)
  assert got == " ".join(known)
  assert os.environ["E2ETTS_TEST_FAST_XLA_FLAGS"] == got   # remembered for workers and subprocesses
