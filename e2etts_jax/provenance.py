"""What shapes a run's figures besides our code: the machine it ran on and the packages it ran with.

Float results, and so a few of the judge's readings, differ between CPU generations (XLA and the BLAS libraries pick
kernels by instruction set), and cloud VMs of different generations report one model name ("AMD EPYC"). So a run
records its CPU's family, model and widest vector extension beside the name, and the versions of the numerics,
the judge and the corpus synthesizer; studies that pair runs across machines or installs can then say what differed.
"""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Mapping, Optional

VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "librosa", "soxr", "pocketsphinx", "jiwer")


def cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  fields: dict[str, str] = {}
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          if fields:
            break
          continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields


def describe_cpu(fields: Mapping[str, str]) -> str:
  """'AMD EPYC (family 25, model 17, AVX-512)' from cpuinfo fields; the generation fields are left out where absent.

  x86 only reports family/model; the vector extension names the widest of AVX-512, AVX2 and AVX (Arm: SVE, NEON).
  """
  name = fields.get("model name", "") or platform.processor()
  flags = set(fields.get("flags", fields.get("Features", "")).split())
  ext = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sve", "SVE"),
                                        ("asimd", "NEON")) if flag in flags), None)
  detail = [f"family {fields['cpu family']}" if fields.get("cpu family") else None,
            f"model {fields['model']}" if fields.get("model") else None, ext]
  detail = [d for d in detail if d]
  if not name:
    return ""
  return f"{name} ({', '.join(detail)})" if detail else name


def cpu_model() -> str:
  return describe_cpu(cpuinfo())


def machine() -> str:
  """What the run trained on, e.g. 'CPU (AMD EPYC (family 25, model 17, AVX-512)), 1 of 2 cores (x86_64)' for a
  process pinned (taskset) to one core of two: studies run one process per core, and its time is that core's, not
  the machine's."""
  import jax
  dev = jax.devices()[0]
  if jax.default_backend() != "cpu":
    kind = f"{jax.device_count()}x {dev.device_kind}"
  else:
    model = cpu_model()
    kind = f"CPU ({model})" if model else "CPU"
  total = os.cpu_count()
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
  cores = f"{total} cores" if usable == total else f"{usable} of {total} cores"
  return f"{kind}, {cores} ({platform.machine()})"


def versions() -> dict[str, Optional[str]]:
  """{package: installed version (None if absent)} of VERSIONED, plus 'flite': its version line."""
  from importlib import metadata
  out: dict[str, Optional[str]] = {}
  for name in VERSIONED:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  try:
    proc = subprocess.run(["flite", "--version"], capture_output=True, text=True, timeout=10)
    line = next((ln.strip() for ln in proc.stdout.splitlines() if "version" in ln), None)
    out["flite"] = line.split(":", 1)[1].strip() if line else None
  except (OSError, subprocess.SubprocessError):
    out["flite"] = None
  return out
