"""Shared fixtures: a fresh `tiny` config and deterministic RNGs, so every test is fast and independent."""
import os
import subprocess
import sys

# Tests compile far more than they run (a few steps per program), so they trade run time for compile time; the
# arithmetic is IEEE either way (no fast-math; results may differ in the last bits). Real runs and e2etts-bench keep
# XLA's defaults.
# - LLVM's optimisation passes are about half of the tiny joint step's compile time (41 s -> 17 s without them).
# - XLA:CPU's MLIR fusion emitters cost ~3x the classic elemental emitters' compile time on the tiny joint step
#   (25 s -> 8 s of CPU time) for steps ~30% slower (155 -> 199 ms), and give bit-equal losses.
# - One LLVM module instead of XLA's parallel codegen split: a quarter less compile CPU time (the tiny joint step on
#   one core: 10.0 s -> 7.0 s; the whole suite on 2 workers, cold XLA cache: 935 s -> 830 s); the split only pays on
#   idle cores, and the two test workers keep both busy. Losses are bit-equal over 3 steps; the parameters then
#   differ in the last bits (sum of |params| 17585.63168215 vs 17585.63168228), so a test compares runs made under
#   the same flags, as every test here does.
FAST_COMPILE_CANDIDATES = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                           "--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def _accepted_xla_flags(candidates) -> str:
  """The candidate flags this jaxlib knows. XLA aborts a process whose XLA_FLAGS names an unknown flag, and its CPU
  codegen flags come and go between releases, so each is tried in a child process first (once per test session:
  xdist workers and test subprocesses inherit the answer through the environment)."""
  known = os.environ.get("E2ETTS_TEST_FAST_XLA_FLAGS")
  if known is None:
    def accepted(flags):
      probe = [sys.executable, "-c", "import jax; jax.devices()"]
      return subprocess.run(probe, env={**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"},
                            capture_output=True).returncode == 0
    flags = list(candidates) if accepted(candidates) else [f for f in candidates if accepted([f])]
    known = os.environ["E2ETTS_TEST_FAST_XLA_FLAGS"] = " ".join(flags)
  return known


FAST_COMPILE_FLAGS = _accepted_xla_flags(FAST_COMPILE_CANDIDATES)


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process (this one, or a subprocess a test starts) with `devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"


# 8 fake CPU devices for sharding tests; must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))

# librosa's gufuncs (localmin, which librosa.yin calls) are numba-compiled with cache=True, and numba's gufunc cache
# is not safe against two processes compiling the same function at once (numba#10128): the loser writes an index
# that points at the other's machine code and segfaults on every later call, in every later worker. Each xdist
# worker therefore gets its own cache directory; it must be set before numba is first imported.
NUMBA_CACHE_ROOT = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "numba")
os.environ["NUMBA_CACHE_DIR"] = os.path.join(NUMBA_CACHE_ROOT, os.environ.get("PYTEST_XDIST_WORKER", "main"))

import jax
import numpy as np
import pytest

from e2etts_jax import perf

# Compiled programs persist across tests, workers and runs (the joint step takes tens of seconds to compile on a
# 2-core CPU). Subprocesses started by tests inherit the location through the environment.
os.environ.setdefault("E2ETTS_XLA_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "xla"))
perf.enable_compilation_cache(os.environ["E2ETTS_XLA_CACHE"])

from e2etts_jax import config_lib
from e2etts_jax.models import vocoder as vocoder_lib


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


# A real `tiny` synthesis workdir, shared by the synthesis and diagnosis tests. It is built once per test process from
# a 24-utterance flite corpus and its prepared shards, with the run files and an Orbax train-state checkpoint written
# by the trainer's own functions (`trainer.write_run_files`, `checkpoint.Checkpointer`,
# `train_step.create_train_state`). Its parameters are freshly initialised: what these tests check does not depend on
# training, and skipping the train-step compile keeps them fast.
FAST_VOCODER = "test_fast_griffin_lim"


# The default vocoder with 4 Griffin-Lim iterations instead of 32 (the tests check plumbing, not audio quality).
vocoder_lib.register_vocoder(FAST_VOCODER, lambda config: vocoder_lib.GriffinLimVocoder(config.audio, n_iter=4))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
  import ml_collections
  from e2etts_jax import checkpoint, corpus, input_pipeline, optim, prepare, sharding, train_step, trainer
  from e2etts_jax.system import System
  root = tmp_path_factory.mktemp("synth")
  manifest = corpus.build_corpus(str(root / "corpus"), num_utterances=24, seed=0, workers=2, test_fraction=0.2,
                                 progress=False)
  c = config_lib.get_config("tiny")
  c.data.shards = str(root / "shards")
  prepare.prepare(c, manifest, c.data.shards, num_workers=1, progress=False, verbose=False)
  run = str(root / "run")
  info = input_pipeline.dataset_info(c.data.shards, c)
  trainer.write_run_files(run, c, info)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
  state, _ = train_step.create_train_state(System(c, info), optim.make_optimizer(c, "stage1"), mesh,
                                           jax.random.key(0))
  ckpt = checkpoint.Checkpointer(os.path.join(run, "checkpoints"), every=1, keep=2, async_save=False)
  ckpt.save(1, state, None, {"stage": "stage1", "global_step": 1, "mode": c.train.mode}, force=True)
  ckpt.close()
  return {"run": run, "manifest": manifest, "root": root}


@pytest.fixture(scope="session")
def synth(workdir):
  from e2etts_jax import synthesis
  return synthesis.Synthesizer.from_workdir(workdir["run"], vocoder=FAST_VOCODER)


@pytest.fixture(scope="session")
def utts(workdir):
  """Corpus utterances the tiny model accepts as prompts (<= data.max_seconds)."""
  from e2etts_jax import corpus
  rows = [r for r in corpus.read_manifest(workdir["manifest"]) if r["duration"] <= 3.5]
  assert len(rows) >= 3
  return rows
