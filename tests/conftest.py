"""Shared fixtures: a fresh `tiny` config and deterministic RNGs, so every test is fast and independent."""
import os

# 8 fake CPU devices for sharding tests; must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
import pytest

from e2etts_jax import perf

# Compiled programs persist across tests, workers and runs (the joint step takes tens of seconds to compile on a
# 2-core CPU). Subprocesses started by tests inherit the location through the environment.
os.environ.setdefault("E2ETTS_XLA_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "xla"))
perf.enable_compilation_cache(os.environ["E2ETTS_XLA_CACHE"])

from e2etts_jax import config_lib


@pytest.fixture
def tiny_config():
  """A fresh, unlocked `tiny` config (tests may change fields freely)."""
  return config_lib.get_config("tiny")


@pytest.fixture
def rng():
  return jax.random.key(0)


@pytest.fixture
def np_rng():
  return np.random.default_rng(0)


def sine_wave(seconds: float, sample_rate: int, freq: float = 220.0, seed: int = 0) -> np.ndarray:
  """A voiced-like test signal: a harmonic tone plus a little noise, [samples] float32."""
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  wav = sum(0.3 / k * np.sin(2 * np.pi * freq * k * t) for k in range(1, 5))
  wav = wav + 0.01 * np.random.default_rng(seed).standard_normal(t.shape)
  return wav.astype(np.float32)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
  """A small real-speech corpus (flite voices) prepared into shards with the `tiny` config; built once per
  test process. Returns the shards directory."""
  from e2etts_jax import corpus, prepare
  root = tmp_path_factory.mktemp("tiny_data")
  manifest = corpus.build_corpus(str(root / "corpus"), num_utterances=40, seed=0, workers=2, progress=False)
  config = config_lib.get_config("tiny")
  prepare.prepare(config, manifest, str(root / "shards"), num_workers=2, progress=False, verbose=False)
  return str(root / "shards")


def tiny_train_config(shards: str, steps=(12, 6, 6), mode: str = "e2e"):
  """The tiny config on `shards`, one bucket (one compile per stage), logging and short stages for tests."""
  c = config_lib.get_config("tiny", mode)
  c.data.shards = shards
  c.data.bucket_boundaries = (200,)
  c.train.log_every = 1
  c.train.checkpoint_every = 4
  for stage, n in zip(config_lib.STAGES, steps):
    c.train[stage].steps = n
    c.train[stage].warmup_steps = 1
    c.train[stage].learning_rate = 2e-3
  if mode == "cascaded":
    config_lib.make_cascaded(c)   # re-apply: stage budgets above changed
  return c
