"""e2etts-bench: the quick mode yields every figure (finite) in the JSON schema, and MFU is flops / time / peak.

Values are not checked: on a shared CPU they are noise. The quick run compiles a handful of tiny programs; with
the persistent compilation cache warm (conftest) the whole file takes well under a minute.
"""
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from e2etts_jax import bench, config_lib, flops as flops_lib
from e2etts_jax.system import DataInfo, System


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  # A subprocess, as users run it: the CLI's absl flags (--out, --workdir) would clash with other CLIs'
  # flags imported into this test process.
  done = subprocess.run([sys.executable, "-m", "e2etts_jax.cli.bench", "--quick", f"--out={out}"],
                        capture_output=True, text=True, timeout=600, env=dict(os.environ))
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  with open(out) as f:
    return json.load(f), done.stdout


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_json_schema_and_figures(quick):
  results, _ = quick
  assert results["schema_version"] == bench.SCHEMA_VERSION and results["mode"] == "quick"
  for key in ("created", "options", "machine", "peak", "peak_end", "configs", "targets", "wall_s"):
    assert key in results, key
  assert _finite(results["wall_s"])
  for peaks in (results["peak"], results["peak_end"]):
    assert set(peaks) == {"float32", "bfloat16"}
    assert all(_finite(v["flops_per_s"]) and v["flops_per_s"] > 0 for v in peaks.values())
  assert list(results["configs"]) == ["tiny"]
  tiny = results["configs"]["tiny"]
  assert _finite(tiny["peak_flops_per_s"]) and set(tiny["params"]) == set(config_lib.NETWORKS)
  assert all(_finite(v) for v in tiny["batch"].values())

  stages = tiny["stages"]
  assert list(stages) == list(bench.Options.quick().stages)
  # The progress log carries each program's figures as it is measured (what a run cut short still shows).
  stdout = quick[1]
  for stage, rec in stages.items():
    assert f"tiny: {stage} joint step: {bench.step_line(rec)}" in stdout, stage
  for net, rec in tiny["networks"].items():
    assert f"tiny: {net} alone: {bench.step_line(rec)}" in stdout, net
  for stage, rec in stages.items():
    for field in bench.STEP_FIELDS + bench.STAGE_FIELDS:
      assert _finite(rec[field]), (stage, field, rec.get(field))
    assert rec["cache"] in ("hit", "miss", "off")
    assert len(rec["step_times"]) >= bench.Options.quick().repeats
    assert set(rec["parts"]) == set(config_lib.parse_list(config_lib.get_config("tiny").train[stage].trainable))
    assert set(rec["parts"]) <= set(tiny["networks"])
  for net, rec in tiny["networks"].items():
    for field in bench.STEP_FIELDS:
      assert _finite(rec[field]), (net, field, rec.get(field))
  if results["machine"]["backend"] == "cpu":   # CPU-time figures exist where the step runs on host threads
    for rec in list(stages.values()) + list(tiny["networks"].values()):
      assert _finite(rec["mfu_cpu"]) and _finite(rec["step_cpu_s"])
    assert all(_finite(rec["joint_over_parts_cpu"]) for rec in stages.values())

  for field in bench.PIPELINE_FIELDS:
    assert _finite(tiny["pipeline"][field]), field
  assert tiny["pipeline"]["step_stage"] in stages
  synth = tiny["synthesis"]
  for field in bench.SYNTHESIS_FIELDS:
    assert _finite(synth[field]), field
  # The generation length is forced, so both decoders produce exactly the tokens asked for.
  assert synth["cached"]["tokens"] == bench.Options.quick().decode_tokens
  assert synth["reference"]["tokens"] == bench.Options.quick().reference_tokens
  for part in ("fm", "vocoder"):
    assert _finite(synth[part]["seconds"])

  assert [t["name"] for t in results["targets"]] == [t.name for t in bench.TARGETS]
  for t in results["targets"]:
    assert t["status"] in ("PASS", "FAIL", "n/a")
    assert t["status"] == "n/a" or _finite(t["value"])


def test_quick_figures_are_wired_to_analytic_flops_and_peak(quick):
  results, stdout = quick
  tiny = results["configs"]["tiny"]
  config = config_lib.get_config("tiny")
  info = DataInfo.for_config(config)
  b, f = tiny["batch_size"], tiny["frames"]
  for stage, rec in tiny["stages"].items():
    assert rec["flops"] == pytest.approx(flops_lib.step_flops(config, info, b, f, stage), rel=1e-12)
    assert rec["mfu"] == pytest.approx(rec["flops"] / rec["step_s"] / tiny["peak_flops_per_s"], rel=1e-9)
    assert rec["joint_over_parts"] == pytest.approx(
        rec["step_s"] / sum(tiny["networks"][n]["step_s"] for n in rec["parts"]), rel=1e-9)
  # The printed table has every section and a status per target.
  for heading in ("matmul peak", "Training steps", "Data pipeline", "Synthesis", "Targets"):
    assert heading in stdout, heading
  assert stdout.count("n/a") + stdout.count("PASS") + stdout.count("FAIL") >= len(bench.TARGETS)


class FakeTimer:
  """Each reading advances by `tick`: every timed interval (one call between two readings) lasts `tick`."""

  def __init__(self, tick: float):
    self.now, self.tick = 0.0, tick

  def __call__(self) -> float:
    self.now += self.tick
    return self.now


def test_mfu_arithmetic_with_fake_timer(quick):
  # Depends on `quick` only so that its compiled tiny stage-3 step is in the compilation cache.
  config = config_lib.get_config("tiny")
  info = DataInfo.for_config(config)
  opts = bench.Options.quick()
  frames = bench.resolve_frames(config, opts.frames)
  batch = System(config, info).random_batch(config.data.batch_size, frames, seed=opts.seed)
  peak = 2.0e9
  probe = bench.PeakProbe(64, jax.numpy.float32, timer=FakeTimer(0.5))   # reads 2 * 64^3 / 0.5 FLOP/s
  rec = bench.bench_step(config, info, "stage3", batch, warmup=1, repeats=3, peak_flops=peak, seed=opts.seed,
                         timer=FakeTimer(0.25), probe=probe)
  flops = flops_lib.step_flops(config, info, config.data.batch_size, frames, "stage3")
  stats = bench.batch_stats(config, batch)
  assert rec["step_times"] == pytest.approx([0.25] * 3) and rec["step_s"] == pytest.approx(0.25)
  assert rec["flops"] == pytest.approx(flops)
  assert rec["mfu"] == pytest.approx(flops / 0.25 / peak)
  assert rec["flops_per_s"] == pytest.approx(flops / 0.25)
  # Three probe readings before and three after the timed calls.
  assert len(probe.readings) == 6 and rec["mfu_local"] == pytest.approx(flops / 0.25 / (2 * 64 ** 3 / 0.5))
  assert rec["tokens_per_s"] == pytest.approx(stats["speech_tokens"] / 0.25)
  assert rec["audio_s_per_s"] == pytest.approx(stats["audio_s"] / 0.25)
  assert bench.utilisation(3e9, 1.5, 4e9) == pytest.approx(0.5)


def test_time_calls_warms_up_then_times_each_call():
  calls = []
  times = bench.time_calls(lambda: calls.append(1) or jax.numpy.zeros(()), warmup=2, repeats=3,
                           timer=FakeTimer(1.0))
  assert len(calls) == 5 and times == [1.0, 1.0, 1.0]


def test_targets_are_na_without_their_config():
  results = {"machine": {"backend": "cpu"}, "configs": {"tiny": {}}}
  statuses = {t["name"]: t["status"] for t in bench.evaluate_targets(results)}
  assert set(statuses.values()) == {"n/a"}
  results["configs"]["small"] = {"synthesis": {"rtf": 0.2, "kv_speedup": 3.0}}
  by_name = {t["name"]: t for t in bench.evaluate_targets(results)}
  assert by_name["synthesis RTF < 0.5"]["status"] == "PASS"
  assert by_name["KV-cached decode speed-up per token >= 10x"]["status"] == "FAIL"


def test_default_run_measures_every_target_config_and_parts_only_there():
  opts = bench.Options()
  assert {t.config for t in bench.TARGETS} <= set(opts.configs)
  # The joint/parts target's config has its parts measured; configs without a target (tiny) do not, by default.
  assert {t.config for t in bench.TARGETS if t.path[-1] == "joint_over_parts"} <= set(opts.parts_configs)
  assert set(opts.parts_configs) <= {t.config for t in bench.TARGETS}
  assert set(bench.Options.quick().parts_configs) == set(bench.Options.quick().configs)
