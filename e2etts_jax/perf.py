"""This machine's measured matmul peak: the denominator of every utilisation (MFU) figure."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak_flops(dtype=jnp.float32, size: int | None = None, repeats: int = 5) -> float:
  """Median FLOP/s of a square `jnp.dot` on the default device (2 * n^3 FLOPs per product)."""
  if size is None:
    size = 1024 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  dot = jax.jit(lambda x, y: x @ y)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2.0 * size ** 3 / float(np.median(times))


def enable_compilation_cache(path: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache (default ~/.cache/e2etts_jax/xla, or $E2ETTS_XLA_CACHE).

  The joint step of even the tiny config takes tens of seconds to compile on a 2-core CPU; reruns, resumed
  jobs and the test suite then load it in seconds. Correctness is unaffected: entries are keyed by the program.

  Multi-process runs (call this after `jax.distributed.initialize`) use a subdirectory per process count. JAX's
  key does not tell a program over one process's 4 CPU devices from the same program over 2 processes x 2
  devices, and the multi-process run that loads the single-process executable fails in its first cross-process
  collective (a Gloo connect timeout).
  """
  import os
  path = path or os.environ.get("E2ETTS_XLA_CACHE") or os.path.expanduser("~/.cache/e2etts_jax/xla")
  if jax.distributed.is_initialized():
    path = os.path.join(path, f"{jax.process_count()}-processes")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path
