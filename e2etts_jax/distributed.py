"""Multi-host start-up: `jax.distributed.initialize` for TPU pods, SLURM GPU clusters and local CPU processes.

On Cloud TPU and under SLURM, JAX finds the coordinator, process count and id itself; elsewhere pass them (or set
E2ETTS_COORDINATOR / E2ETTS_NUM_PROCESSES / E2ETTS_PROCESS_ID, as launch/local.sh does). A single host needs none.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def wanted(mode: str) -> bool:
  """Whether to initialise: 'on', 'off', or 'auto' (on under SLURM with >1 task, or with E2ETTS_COORDINATOR)."""
  if mode in ("on", "off"):
    return mode == "on"
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "E2ETTS_COORDINATOR" in os.environ


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
  env = os.environ
  coordinator_address = coordinator_address or env.get("E2ETTS_COORDINATOR")
  if num_processes is None and "E2ETTS_NUM_PROCESSES" in env:
    num_processes = int(env["E2ETTS_NUM_PROCESSES"])
  if process_id is None and "E2ETTS_PROCESS_ID" in env:
    process_id = int(env["E2ETTS_PROCESS_ID"])
  # CPU processes need a collectives backend for cross-process computations (harmless on GPU/TPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout_s)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
