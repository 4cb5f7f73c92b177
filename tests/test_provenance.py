import os
import platform
import subprocess

import numpy as np

from e2etts_jax import provenance

ZEN2 = {"model name": "AMD EPYC", "cpu family": "23", "model": "49", "flags": "fpu sse2 avx avx2 fma"}
ZEN4 = {"model name": "AMD EPYC", "cpu family": "25", "model": "17", "flags": "fpu sse2 avx avx2 avx512f avx512_bf16"}


def test_describe_cpu_tells_generations_of_one_model_name_apart():
  assert provenance.describe_cpu(ZEN2) == "AMD EPYC (family 23, model 49, AVX2)"
  assert provenance.describe_cpu(ZEN4) == "AMD EPYC (family 25, model 17, AVX-512)"
  arm = {"model name": "Neoverse-V2", "Features": "fp asimd sve sve2"}
  assert provenance.describe_cpu(arm) == "Neoverse-V2 (SVE)"
  assert provenance.describe_cpu({"model name": "Some CPU"}) == "Some CPU"


def test_describe_cpu_is_empty_where_nothing_names_the_cpu(monkeypatch):
  monkeypatch.setattr(platform, "processor", lambda: "")
  assert provenance.describe_cpu({"flags": "avx2"}) == ""
  monkeypatch.setattr(platform, "processor", lambda: "x86_64")
  assert provenance.describe_cpu({"flags": "avx2"}) == "x86_64 (AVX2)"


def test_cpuinfo_reads_the_first_processor(tmp_path):
  def block(i, fields):
    return f"processor\t: {i}\n" + "".join(f"{k}\t: {v}\n" for k, v in fields.items()) + "\n"
  path = tmp_path / "cpuinfo"
  path.write_text(block(0, ZEN4) + block(1, ZEN2))
  fields = provenance.cpuinfo(str(path))
  assert fields == {"processor": "0", **ZEN4}
  assert provenance.cpuinfo(str(tmp_path / "absent")) == {}


def test_machine_names_the_cpu_model_and_the_cores_the_process_may_use(monkeypatch):
  monkeypatch.setattr(provenance, "cpu_model", lambda: "AMD EPYC (family 25, model 17, AVX-512)")
  monkeypatch.setattr(os, "cpu_count", lambda: 4)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
  assert provenance.machine().startswith("CPU (AMD EPYC (family 25, model 17, AVX-512)), 4 cores (")
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1}, raising=False)   # taskset -c 1
  assert provenance.machine().startswith("CPU (AMD EPYC (family 25, model 17, AVX-512)), 1 of 4 cores (")
  monkeypatch.setattr(provenance, "cpu_model", lambda: "")
  assert provenance.machine().startswith("CPU, 1 of 4 cores (")


def test_versions_name_installed_packages_and_tolerate_a_missing_synthesizer(monkeypatch):
  v = provenance.versions()
  assert v["numpy"] == np.__version__ and set(provenance.VERSIONED) < set(v)

  def no_flite(*args, **kwargs):
    raise FileNotFoundError("flite")
  monkeypatch.setattr(subprocess, "run", no_flite)
  assert provenance.versions()["flite"] is None
