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
