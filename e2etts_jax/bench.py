"""The benchmark behind `e2etts-bench`: training-step utilisation, data-pipeline headroom and synthesis speed.

Every figure is a ratio measured in the same run, because absolute times on a shared machine drift:
  * the denominator of every utilisation (MFU) figure is this machine's matmul peak, measured at the start of the
    run (a large `jnp.dot` in float32 and bfloat16, median of repeats) and re-measured at the end as a drift check;
  * per config (small by default, tiny on request; base only with an accelerator) and training stage: compile time,
    median joint-step time after warm-up, speech tokens/s, audio-seconds/s and MFU = analytic FLOPs
    (`flops.step_flops`) / step time / peak of the config's compute dtype, plus the step's memory from the compiled
    executable. The machine may be shared, so the peak matmul is also re-measured around each program and
    `mfu_local` divides by that;
  * for the configs the targets are evaluated on (small; base on accelerators), each network's step alone
    ("parts": a config copy whose stage trains only that network on its own loss; the
    tokenizer has no loss of its own, so its part trains it through the stage-1 losses of the frozen others), so
    joint / sum(parts) shows what fusing the networks into one step costs. The parts share some frozen work (each
    runs the tokenizer forward), so the analytic FLOP ratio of the same programs is printed next to the time ratio;
  * the Grain pipeline's audio-seconds/s over shards prepared from a synthetic corpus, against what the fastest
    joint step consumes;
  * synthesis: KV-cached vs recomputing LLM decoding per token at a fixed generation length (eos masked by
    min_ratio, stop forced by max_ratio, so runs are comparable with random weights), flow-matching sampling,
    the vocoder, and the real-time factor of the chain text -> tokens -> mel -> waveform.
Targets (PASS/FAIL) are evaluated on the config they are defined for; a config that was not run gives 'n/a'.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from e2etts_jax import (audio, config_lib, flops as flops_lib, optim, perf, sharding, system as system_lib,
                        train_step)
from e2etts_jax.system import DataInfo, System

SCHEMA_VERSION = 1
Timer = Callable[[], float]

# Per-step record fields (joint stages and network parts alike); every one is a finite number.
STEP_FIELDS = ("compile_s", "step_s", "flops", "flops_per_s", "mfu", "local_peak_flops_per_s", "mfu_local",
               "tokens_per_s", "llm_tokens_per_s", "audio_s_per_s", "peak_memory_bytes")
STAGE_FIELDS = ("parts_step_s", "joint_over_parts", "joint_over_parts_local", "flops_joint_over_parts",
                "joint_overhead")
PIPELINE_FIELDS = ("audio_s_per_s", "batches", "seconds", "step_audio_s_per_s", "ratio")
SYNTHESIS_FIELDS = ("decode_tokens", "cached_tokens_per_s", "reference_tokens_per_s", "kv_speedup", "llm_s",
                    "fm_s", "vocoder_s", "audio_s", "rtf")


@dataclasses.dataclass(frozen=True)
class Target:
  """A pass/fail threshold on one figure of one config's results."""
  name: str
  config: str
  path: tuple[str, ...]     # keys into results['configs'][config]
  op: str                   # '>=' or '<=' or '<'
  threshold: float
  accelerator_only: bool = False
  local_path: tuple[str, ...] = ()   # the same figure against the local peak (shown beside it), if any
  cpu_path: tuple[str, ...] = ()     # the same figure in CPU-time units (shown beside it on CPU), if any


TARGETS = (
    Target("joint-step MFU (stage1) >= 40% of f32 peak", "small", ("stages", "stage1", "mfu"), ">=", 0.40,
           local_path=("stages", "stage1", "mfu_local"), cpu_path=("stages", "stage1", "mfu_cpu")),
    Target("joint / sum of parts (stage2) <= 1.1", "small", ("stages", "stage2", "joint_over_parts"), "<=", 1.1,
           local_path=("stages", "stage2", "joint_over_parts_local"),
           cpu_path=("stages", "stage2", "joint_over_parts_cpu")),
    Target("pipeline / step consumption >= 5", "small", ("pipeline", "ratio"), ">=", 5.0),
    Target("KV-cached decode speed-up per token >= 10x", "small", ("synthesis", "kv_speedup"), ">=", 10.0),
    Target("synthesis RTF < 0.5", "small", ("synthesis", "rtf"), "<", 0.5),
    Target("joint-step MFU (stage1) >= 45% on GPU/TPU", "base", ("stages", "stage1", "mfu"), ">=", 0.45,
           accelerator_only=True, local_path=("stages", "stage1", "mfu_local")),
)


@dataclasses.dataclass
class Options:
  """What to measure and how hard. `Options.quick()` is the seconds-long smoke mode used by the tests."""
  # The target configs. tiny (--configs=tiny,small) compiles as long as small (~3 min cold for its stages and
  # synthesis on one core) and has no target; left out, a cold default run fits in 10 minutes on a 2-core CPU.
  configs: tuple[str, ...] = ("small", "base")
  stages: tuple[str, ...] = config_lib.STAGES
  # Configs whose single-network steps ("parts") are measured: those the joint/parts target is evaluated on.
  # Each part is one more program to compile (20-50 s on a 2-core CPU), so tiny's are left out by default.
  parts_configs: tuple[str, ...] = ("small", "base")
  frames: str = "mid"            # 'mid' / 'min' length bucket, 'max' (data.max_frames), or a frame count
  batch_size: int = 0            # 0 = the config's data.batch_size
  warmup: int = 1                # >= 1
  repeats: int = 3
  min_timed_s: float = 1.5       # fast programs are timed more often, up to this much in total
  decode_tokens: int = 500       # generated tokens of the synthesis benchmark (KV-cached path, and its shapes)
  reference_tokens: int = 40     # tokens the recomputing path generates (at the same shapes; per-token cost is flat)
  synthesis_repeats: int = 2
  pipeline_batches: int = 20
  corpus_batches: int = 3        # synthetic corpus size, in global batches (the pipeline cycles through epochs)
  peak_size: int = 0             # 0 = 2048 on CPU, 8192 on accelerators
  peak_repeats: int = 7
  compilation_cache: bool = True
  workdir: str = ""              # corpus and shards (default: a temporary folder, removed afterwards)
  seed: int = 0
  mode: str = "full"

  @classmethod
  def quick(cls, **overrides) -> "Options":
    """tiny only, one stage and its one part (stage 3 trains only the LLM: the fewest programs to compile),
    the shortest bucket, short generations, few repeats."""
    values = dict(configs=("tiny",), stages=("stage3",), parts_configs=("tiny",), frames="min", warmup=1, repeats=2,
                  min_timed_s=0.0,
                  decode_tokens=24, reference_tokens=4, synthesis_repeats=1, pipeline_batches=3, corpus_batches=2,
                  peak_size=256, peak_repeats=3, mode="quick")
    values.update(overrides)
    return cls(**values)


# ------------------------------------------------------------------------------------------------ arithmetic


def utilisation(flops: float, seconds: float, peak_flops: float) -> float:
  """MFU: achieved FLOP/s (flops / seconds) as a fraction of the measured peak."""
  return flops / seconds / peak_flops


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, timer: Timer = time.perf_counter,
               min_total_s: float = 0.0, max_repeats: int = 30,
               cpu_times: Optional[list[float]] = None) -> list[float]:
  """Seconds of each timed call of `fn` (blocked until its outputs are ready), after `warmup` untimed calls.

  The first calls of a compiled program pay one-off costs (buffer allocation, page faults, thread-pool start),
  so only the calls after the warm-up count. At least `repeats` calls are timed, more (up to `max_repeats`)
  while they add up to less than `min_total_s`: a millisecond program gets enough samples for a stable median.
  cpu_times: if given, each timed call's process CPU time (all threads) is appended to it.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times: list[float] = []
  while len(times) < repeats or (sum(times) < min_total_s and len(times) < max_repeats):
    c0, t0 = time.process_time(), timer()
    jax.block_until_ready(fn())
    times.append(timer() - t0)
    if cpu_times is not None:
      cpu_times.append(time.process_time() - c0)
  return times


class PeakProbe:
  """The peak measurement's square `jnp.dot`, timed again around each program (`local` peak).

  On a machine shared with other jobs the cores this process gets change from minute to minute. The run-level
  MFU divides by a peak taken minutes earlier; `mfu_local` divides by the median of the matmul readings taken
  right before and right after the program's timed calls, which cancels most of that drift. On CPU the probe
  also reads FLOPs per CPU-second (process time, all threads), the denominator of `mfu_cpu`: CPU time only runs
  while this process holds a core, so that ratio hardly depends on how many cores other jobs take.
  """

  def __init__(self, size: int, dtype, timer: Timer = time.perf_counter):
    self.size, self.timer = size, timer
    self.a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    self.b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    self.dot = jax.jit(lambda x, y: x @ y)
    self.dot(self.a, self.b).block_until_ready()
    self.readings: list[float] = []
    self.cpu_readings: list[float] = []

  def __call__(self, n: int = 1) -> list[float]:
    """n readings (FLOP/s), also appended to `readings` (FLOP per CPU-second to `cpu_readings`)."""
    out = []
    flops = 2.0 * self.size ** 3
    for _ in range(n):
      c0, t0 = time.process_time(), self.timer()
      self.dot(self.a, self.b).block_until_ready()
      out.append(flops / (self.timer() - t0))
      self.cpu_readings.append(flops / max(time.process_time() - c0, 1e-9))
    self.readings += out
    return out


def step_figures(flops: float, times: Sequence[float], peak_flops: float, batch_stats: dict,
                 local_peaks: Optional[Sequence[float]] = None, cpu_times: Optional[Sequence[float]] = None,
                 cpu_peaks: Optional[Sequence[float]] = None) -> dict:
  """Throughput figures of one program from its per-call times (median) and analytic FLOPs.

  local_peaks: matmul FLOP/s readings taken around the timed calls; their median is the denominator of
  `mfu_local`. cpu_times / cpu_peaks: per-call CPU seconds and the matmul's FLOPs per CPU-second, for `mfu_cpu`.
  """
  step_s = float(np.median(times))
  local = {}
  if local_peaks:
    local_peak = float(np.median(local_peaks))
    local = {"local_peak_flops_per_s": local_peak, "mfu_local": utilisation(flops, step_s, local_peak),
             "local_peaks": [float(p) for p in local_peaks]}
  if cpu_times and cpu_peaks:
    cpu_s = float(np.median(cpu_times))
    local.update({"step_cpu_s": cpu_s, "mfu_cpu": utilisation(flops, cpu_s, float(np.median(cpu_peaks)))})
  return {
      "step_s": step_s, "step_times": [float(t) for t in times], "flops": float(flops),
      "flops_per_s": flops / step_s, "mfu": utilisation(flops, step_s, peak_flops), **local,
      "tokens_per_s": batch_stats["speech_tokens"] / step_s,
      "llm_tokens_per_s": batch_stats["llm_tokens"] / step_s,
      "audio_s_per_s": batch_stats["audio_s"] / step_s,
  }


def batch_stats(config: ml_collections.ConfigDict, batch: dict) -> dict:
  """Valid audio seconds, speech tokens (tokenizer rate) and LLM positions (sos + text + task + speech)."""
  mel_mask = np.asarray(batch["mel_mask"])
  ds = int(config.tokenizer.downsample)
  frames = mel_mask.sum(axis=1)
  speech_tokens = -(-frames // ds)
  text = np.asarray(batch["text_mask"]).sum(axis=1)
  mel_rate = config.audio.sample_rate / config.audio.hop_length
  return {"audio_s": float(frames.sum() / mel_rate), "speech_tokens": int(speech_tokens.sum()),
          "llm_tokens": int((speech_tokens + text + 2).sum())}


# -------------------------------------------------------------------------------------------------- machine


class _CacheWatch:
  """Counts persistent compilation-cache hits and misses (JAX monitoring events) around a compile."""

  _instance: Optional["_CacheWatch"] = None

  def __init__(self):
    self.hits = self.misses = 0
    jax.monitoring.register_event_listener(self._on_event)

  @classmethod
  def get(cls) -> "_CacheWatch":
    if cls._instance is None:
      cls._instance = cls()
    return cls._instance

  def _on_event(self, event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
      self.hits += 1
    elif event == "/jax/compilation_cache/cache_misses":
      self.misses += 1

  def snapshot(self) -> tuple[int, int]:
    return self.hits, self.misses

  def since(self, snap: tuple[int, int]) -> str:
    hits, misses = self.hits - snap[0], self.misses - snap[1]
    return "hit" if hits and not misses else ("miss" if misses else "off")


def has_accelerator() -> bool:
  return jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")


def bench_devices() -> list:
  """All devices on an accelerator; one on CPU (forced host devices share the same cores: splitting a batch
  over them would only add overhead to the measurement)."""
  devices = jax.devices()
  return devices if has_accelerator() else devices[:1]


def peak_size(size: int = 0) -> int:
  return size or (8192 if has_accelerator() else 2048)


def compute_dtype(config: ml_collections.ConfigDict):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[str(config.model.dtype)]


def measure_peaks(size: int, repeats: int) -> dict:
  size = peak_size(size)
  out = {}
  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    out[name] = {"flops_per_s": perf.matmul_peak_flops(dtype, size=size, repeats=repeats), "size": size,
                 "repeats": repeats}
  return out


def machine_info() -> dict:
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "num_devices": jax.device_count(),
          "bench_devices": len(bench_devices()), "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
          "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# ------------------------------------------------------------------------------------------------- training


def resolve_frames(config: ml_collections.ConfigDict, frames: str) -> int:
  bounds = tuple(int(b) for b in config.data.bucket_boundaries)
  if frames == "mid":
    return bounds[len(bounds) // 2]
  if frames == "min":
    return bounds[0]
  if frames == "max":
    return int(config.data.max_frames)
  n = int(frames)
  if n % config.tokenizer.downsample:
    raise ValueError(f"frames={n} is not a multiple of tokenizer.downsample={config.tokenizer.downsample}")
  return n


def part_program(config: ml_collections.ConfigDict, net: str) -> tuple[ml_collections.ConfigDict, str]:
  """(config copy, stage) of a step that trains `net` alone, reusing the stage machinery.

  llm/fm/rm: a stage-2 copy (frozen tokens) that trains only `net` with only its own loss term. The tokenizer
  has no loss of its own: its part is a stage-1 copy training it alone through the frozen LLM, FM and RM.
  """
  c = copy.deepcopy(config)
  if net == "tokenizer":
    stage = "stage1"
  else:
    stage = "stage2"
    c.train[stage].weights.update({k: 0.0 for k in config_lib.LOSS_TERMS})
    c.train[stage].weights[net] = 1.0
  c.train[stage].trainable = net
  return c, stage


def _memory(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    m = None
  if m is None:
    return {"peak_memory_bytes": float("nan")}
  arg, out = m.argument_size_in_bytes, m.output_size_in_bytes
  temp, alias = m.temp_size_in_bytes, m.alias_size_in_bytes
  # Donated state buffers are both argument and output (counted once through `alias`).
  return {"peak_memory_bytes": float(arg + out + temp - alias), "argument_bytes": arg, "output_bytes": out,
          "temp_bytes": temp, "alias_bytes": alias}


def bench_step(config: ml_collections.ConfigDict, info: DataInfo, stage: str, batch: dict, *, warmup: int,
               repeats: int, peak_flops: float, seed: int = 0, timer: Timer = time.perf_counter,
               probe: Optional[PeakProbe] = None, probe_readings: int = 3, min_total_s: float = 0.0) -> dict:
  """Compiles and times one training step program (`stage` of `config`) on `batch`.

  probe: the peak matmul, read `probe_readings` times before and after the timed calls (for `mfu_local`).
  min_total_s: time more than `repeats` calls while they add up to less (see `time_calls`).
  """
  system = System(config, info)
  mesh = sharding.make_mesh(config.mesh, bench_devices())
  tx = optim.make_optimizer(config, stage)
  state, shard_tree = train_step.create_train_state(system, tx, mesh, jax.random.key(seed))
  batch = jax.device_put(batch, {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()})
  rng = jax.device_put(jax.random.key(seed + 1), sharding.replicated(mesh))
  step = train_step.make_train_step(system, tx, stage, mesh, shard_tree, batch)
  watch = _CacheWatch.get()
  snap = watch.snapshot()
  t0 = timer()
  compiled = step.lower(state, batch, rng).compile()
  compile_s = timer() - t0
  holder = {"state": state}
  del state

  def call():
    # The state is donated: keep the new one. The compiled step takes the schedule's numbers as an argument.
    holder["state"], metrics = compiled(holder["state"], batch, rng, step.schedule)
    return holder["state"], metrics

  jax.block_until_ready(call())   # the first warm-up call, outside the probe bracket
  n_cpu = len(probe.cpu_readings) if probe is not None else 0
  local = probe(probe_readings) if probe is not None else []
  cpu_times: list[float] = []
  times = time_calls(call, warmup - 1, repeats, timer, min_total_s=min_total_s, cpu_times=cpu_times)
  local += probe(probe_readings) if probe is not None else []
  # FLOPs per CPU-second compares like with like only where the program runs on this process's CPU threads.
  cpu_peaks = probe.cpu_readings[n_cpu:] if probe is not None and not has_accelerator() else None
  b, f = batch["mel"].shape[:2]
  out = {"compile_s": compile_s, "cache": watch.since(snap),
         **step_figures(flops_lib.step_flops(config, info, b, f, stage), times, peak_flops,
                        batch_stats(config, batch), local, cpu_times, cpu_peaks),
         **_memory(compiled)}
  return out


def step_line(rec: dict) -> str:
  """One program's figures for the progress log, so a run stopped by a time limit still shows what it measured."""
  return (f"{rec['step_s'] * 1e3:.3f} ms/step, {_si(rec['flops_per_s'], 'FLOP/s')}, MFU {100 * rec['mfu']:.1f}%, "
          f"compile {rec['compile_s']:.1f} s ({rec['cache']})")


def bench_training(config: ml_collections.ConfigDict, info: DataInfo, opts: Options, peak_flops: float,
                   log: Callable[[str], None]) -> dict:
  """Joint steps of `opts.stages` and, for `opts.parts_configs`, the single-network parts of their trainable
  networks with the joint/parts ratios."""
  frames = resolve_frames(config, opts.frames)
  batch_size = opts.batch_size or int(config.data.batch_size)
  batch = System(config, info).random_batch(batch_size, frames, seed=opts.seed)
  probe = PeakProbe(peak_size(opts.peak_size), compute_dtype(config))
  kw = dict(warmup=opts.warmup, repeats=opts.repeats, peak_flops=peak_flops, seed=opts.seed, probe=probe,
            min_total_s=opts.min_timed_s)
  stages = {}
  for stage in opts.stages:
    log(f"{config.name}: {stage} joint step")
    stages[stage] = bench_step(config, info, stage, batch, **kw)
    log(f"{config.name}: {stage} joint step: {step_line(stages[stage])}")
    gc.collect()   # the previous program's state and executable, before the next one allocates
  nets = []
  for stage in opts.stages if config.name in opts.parts_configs else ():
    nets += [n for n in config_lib.parse_list(config.train[stage].trainable) if n not in nets]
  parts = {}
  for net in nets:
    log(f"{config.name}: {net} alone")
    c, part_stage = part_program(config, net)
    parts[net] = {"stage": part_stage, **bench_step(c, info, part_stage, batch, **kw)}
    log(f"{config.name}: {net} alone: {step_line(parts[net])}")
    gc.collect()
  for stage, rec in stages.items() if parts else ():
    mine = config_lib.parse_list(config.train[stage].trainable)
    rec["parts"] = list(mine)
    rec["parts_step_s"] = sum(parts[n]["step_s"] for n in mine)
    rec["joint_over_parts"] = rec["step_s"] / rec["parts_step_s"]
    # The same with each program's time in units of its local peak matmul (drift between programs cancels).
    norm = lambda r: r["step_s"] * r["local_peak_flops_per_s"]
    rec["joint_over_parts_local"] = norm(rec) / sum(norm(parts[n]) for n in mine)
    if all("step_cpu_s" in r for r in [rec] + [parts[n] for n in mine]):
      rec["joint_over_parts_cpu"] = rec["step_cpu_s"] / sum(parts[n]["step_cpu_s"] for n in mine)
    rec["flops_joint_over_parts"] = rec["flops"] / sum(parts[n]["flops"] for n in mine)
    # > 1: the joint step is slower than its FLOPs predict from the parts' speed.
    rec["joint_overhead"] = rec["joint_over_parts"] / rec["flops_joint_over_parts"]
  return {"batch_size": batch_size, "frames": frames, "batch": batch_stats(config, batch), "stages": stages,
          "networks": parts}


# ------------------------------------------------------------------------------------------------- pipeline


_WORDS = ("the a cat dog sun red big old sea sky tree house river stone light green small quiet morning "
          "window paper garden winter music yellow bright slowly water mountain").split()


def synthetic_wave(seconds: float, sample_rate: int, freq: float, seed: int) -> np.ndarray:
  """A voiced-like signal: a harmonic tone with a slow pitch glide and a little noise."""
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  f0 = freq * (1.0 + 0.1 * np.sin(2 * np.pi * 0.5 * t))
  phase = 2 * np.pi * np.cumsum(f0) / sample_rate
  wav = sum(0.3 / k * np.sin(k * phase) for k in range(1, 6))
  wav = wav + 0.01 * np.random.default_rng(seed).standard_normal(t.shape)
  return wav.astype(np.float32)


def make_corpus(root: str, config: ml_collections.ConfigDict, num_train: int, num_test: int = 2,
                seed: int = 0) -> str:
  """Writes WAVs + a JSONL manifest of lengths spread over the config's buckets; returns the manifest path."""
  import soundfile as sf
  rs = np.random.default_rng(seed)
  sr = int(config.audio.sample_rate)
  lo, hi = float(config.data.min_seconds) + 0.2, float(config.data.max_seconds) - 0.2
  os.makedirs(os.path.join(root, "wavs"), exist_ok=True)
  rows = []
  for i in range(num_train + num_test):
    sec = float(rs.uniform(lo, hi))
    rid = f"bench{i:04d}"
    sf.write(os.path.join(root, "wavs", f"{rid}.wav"), synthetic_wave(sec, sr, 100 + 5 * (i % 30), i), sr,
             subtype="PCM_16")
    words = " ".join(rs.choice(_WORDS, size=max(1, int(sec * 2))))
    rows.append({"id": rid, "audio": f"wavs/{rid}.wav", "text": words, "speaker": f"spk{i % 4}",
                 "rate_class": i % 3, "pitch_class": (i // 3) % 3, "split": "test" if i >= num_train else "train"})
  path = os.path.join(root, "manifest.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n")
  return path


def bench_pipeline(config: ml_collections.ConfigDict, workdir: str, opts: Options,
                   timer: Timer = time.perf_counter) -> dict:
  """Audio-seconds/s of `input_pipeline.make_dataset` over shards prepared from a synthetic corpus."""
  from e2etts_jax import input_pipeline, prepare
  root = os.path.join(workdir, f"corpus-{config.name}")
  b = int(config.data.batch_size)
  manifest = make_corpus(root, config, num_train=opts.corpus_batches * b, seed=opts.seed)
  shards = os.path.join(root, "shards")
  c = copy.deepcopy(config)
  c.data.shards = shards
  c.data.num_shards = 2
  t0 = timer()
  prepare.prepare(c, manifest, shards, num_workers=1, progress=False, verbose=False)
  prepare_s = timer() - t0
  n = int(opts.pipeline_batches)
  per_epoch = input_pipeline.load_index(shards, "train")["num_frames"]
  # Finite, so no prefetch thread outlives the measurement and steals cores from the next one.
  epochs = math.ceil((n + 1) / max(1, len(per_epoch) // b)) + 1
  ds = input_pipeline.make_dataset(c, "train", seed=opts.seed, process_index=0, process_count=1,
                                   num_epochs=epochs, shards_dir=shards)
  it = iter(ds)
  next(it)   # thread start-up and file opening are not throughput
  mel_rate = config.audio.sample_rate / config.audio.hop_length
  frames = 0
  t0 = timer()
  for _ in range(n):
    frames += int(np.asarray(next(it)["mel_mask"]).sum())
  seconds = timer() - t0
  del it, ds
  gc.collect()
  audio_s = frames / mel_rate
  return {"audio_s_per_s": audio_s / seconds, "batches": n, "seconds": seconds, "audio_s": audio_s,
          "prepare_s": prepare_s}


# ------------------------------------------------------------------------------------------------ synthesis


def bench_synthesis(config: ml_collections.ConfigDict, info: DataInfo, opts: Options,
                    timer: Timer = time.perf_counter) -> dict:
  """LLM decoding (KV-cached vs recomputed), flow-matching sampling and vocoder on one utterance."""
  from e2etts_jax.models import flow_matching, generation
  from e2etts_jax.models.vocoder import make_vocoder
  system = System(config, info)
  params = jax.jit(lambda r: nn.unbox(system.init(r)))(jax.random.key(opts.seed))
  n_new, n_ref = int(opts.decode_tokens), max(1, min(int(opts.reference_tokens), int(opts.decode_tokens)))
  rs = np.random.default_rng(opts.seed)
  text_len = min(32, int(config.text.max_text_tokens))
  text_ids = jnp.asarray(rs.integers(1, info.text_vocab_size, size=(1, text_len)), jnp.int32)
  text_mask = jnp.ones((1, text_len), bool)
  rng = jax.random.key(opts.seed + 1)

  def decode(use_cache: bool, tokens: int):
    # eos is masked until `tokens` speech tokens exist and the row stops there: a fixed length whatever the
    # (random) weights predict. The shapes always hold n_new tokens, so the per-token work is that of n_new.
    ratio = (tokens + 0.5) / text_len
    out, lengths = generation.generate(system.llm, params["llm"], text_ids, text_mask, rng, max_new_tokens=n_new,
                                       sampling={"min_ratio": ratio, "max_ratio": ratio}, use_cache=use_cache)
    return jax.block_until_ready(out), int(lengths[0])

  def timed_decode(use_cache: bool, tokens: int) -> dict:
    t0 = timer()
    decode(use_cache, 1)                 # compiles; sampling values are traced, so no recompile below
    first_s = timer() - t0
    times, out = [], None
    for _ in range(opts.synthesis_repeats):
      t0 = timer()
      out, length = decode(use_cache, tokens)
      times.append(timer() - t0)
    s = float(np.median(times))
    return {"compile_s": first_s, "seconds": s, "tokens": length, "tokens_per_s": length / s,
            "s_per_token": s / length, "out": out}

  cached = timed_decode(True, n_new)
  reference = timed_decode(False, n_ref)
  tokens = cached.pop("out")[:, :n_new]
  reference.pop("out")

  ds = int(config.tokenizer.downsample)
  frames = tokens.shape[1] * ds
  codes = system.fsq.indices_to_codes(jnp.minimum(tokens, system.fsq.codebook_size - 1))
  fc = config.fm

  def fm_sample(p, key, codes):
    apply = lambda *a: system.fm.apply({"params": p}, *a)
    b = codes.shape[0]
    return flow_matching.sample(
        apply, key, codes, jnp.ones(codes.shape[:2], bool), jnp.zeros((b, frames, config.audio.n_mels)),
        jnp.zeros((b, frames), bool), jnp.zeros((b, config.rm.spk_embed_dim)), jnp.ones((b, frames), bool),
        steps=int(fc.ode_steps), guidance=float(fc.guidance), sigma_min=float(fc.sigma_min))

  t0 = timer()
  fm_compiled = jax.jit(fm_sample).lower(params["fm"], rng, codes).compile()
  fm_compile_s = timer() - t0
  fm_times = time_calls(lambda: fm_compiled(params["fm"], rng, codes), 1, opts.synthesis_repeats, timer)

  # Random FM weights output noise: time the vocoder on the mel of a speech-like signal of the same length.
  vocoder = make_vocoder(config)
  hop, sr = int(config.audio.hop_length), int(config.audio.sample_rate)
  speech_mel = audio.log_mel(synthetic_wave((frames + 1) * hop / sr, sr, 120.0, opts.seed), config.audio)[:frames]
  vocoder(speech_mel[:8])   # librosa's first call compiles its numba kernels: not a per-utterance cost
  voc_times = []
  for _ in range(opts.synthesis_repeats):
    t0 = timer()
    wav = vocoder(speech_mel)
    voc_times.append(timer() - t0)
  audio_s = len(wav) / vocoder.sample_rate
  llm_s, fm_s, voc_s = cached["seconds"], float(np.median(fm_times)), float(np.median(voc_times))
  return {
      "decode_tokens": n_new, "text_tokens": text_len, "cached": cached, "reference": reference,
      "cached_tokens_per_s": cached["tokens_per_s"], "reference_tokens_per_s": reference["tokens_per_s"],
      "kv_speedup": reference["s_per_token"] / cached["s_per_token"],
      "fm": {"compile_s": fm_compile_s, "seconds": fm_s, "frames": frames, "ode_steps": int(fc.ode_steps),
             "guidance": float(fc.guidance)},
      "vocoder": {"name": "griffin_lim", "seconds": voc_s},
      "llm_s": llm_s, "fm_s": fm_s, "vocoder_s": voc_s, "audio_s": audio_s,
      "rtf": (llm_s + fm_s + voc_s) / audio_s,
  }


# ------------------------------------------------------------------------------------------------- the run


def _lookup(results: dict, config: str, path: Sequence[str]):
  node = results.get("configs", {}).get(config)
  for k in path:
    if not isinstance(node, dict) or k not in node:
      return None
    node = node[k]
  return node


def evaluate_targets(results: dict) -> list[dict]:
  ops = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t}
  out = []
  for t in TARGETS:
    value = _lookup(results, t.config, t.path)
    judge = lambda v: "n/a" if v is None else ("PASS" if ops[t.op](v, t.threshold) else "FAIL")
    local = _lookup(results, t.config, t.local_path) if t.local_path else None
    cpu = _lookup(results, t.config, t.cpu_path) if t.cpu_path else None
    if t.accelerator_only and results["machine"]["backend"] == "cpu":
      status, why = "n/a", "needs an accelerator"
    elif value is None:
      status, why = "n/a", f"{t.config} not measured"
    else:
      status, why = ("PASS" if ops[t.op](value, t.threshold) else "FAIL"), ""
    out.append({"name": t.name, "config": t.config, "figure": ".".join(t.path), "op": t.op,
                "threshold": t.threshold, "value": value, "status": status, "note": why,
                "value_local": local, "status_local": judge(local), "value_cpu": cpu, "status_cpu": judge(cpu)})
  return out


def run_benchmark(opts: Options, log: Callable[[str], None] = print, timer: Timer = time.perf_counter) -> dict:
  """Runs everything `opts` asks for and returns the results dict (the bench.json content)."""
  start = timer()
  say = log
  log = lambda msg: say(f"{timer() - start:6.1f}s {msg}")
  if opts.compilation_cache:
    perf.enable_compilation_cache()
  results: dict[str, Any] = {
      "schema_version": SCHEMA_VERSION, "mode": opts.mode,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "options": dataclasses.asdict(opts), "machine": machine_info(), "configs": {},
  }
  log("matmul peak ...")
  results["peak"] = measure_peaks(opts.peak_size, opts.peak_repeats)
  log("matmul peak: " + ", ".join(f"{k} {_si(v['flops_per_s'], 'FLOP/s')}" for k, v in results["peak"].items()))
  configs = {}
  for name in opts.configs:
    config = config_lib.get_config(name)
    if name == "base" and not has_accelerator():
      results["configs"][name] = {"skipped": "no accelerator (base is measured on GPU/TPU only)"}
      continue
    config_lib.validate(config)
    info = DataInfo.for_config(config)
    dtype = str(config.model.dtype)
    peak = results["peak"][dtype]["flops_per_s"]
    rec = {"dtype": dtype, "peak_flops_per_s": peak, "params": system_lib.parameter_counts(config, info)}
    rec.update(bench_training(config, info, opts, peak, log))
    log(f"{name}: synthesis")
    rec["synthesis"] = bench_synthesis(config, info, opts, timer)
    results["configs"][name] = rec
    configs[name] = config
  # Pipelines last, after every step: their preparation spawns no workers, and their prefetch threads are done.
  workdir = opts.workdir or tempfile.mkdtemp(prefix="e2etts-bench-")
  try:
    for name, config in configs.items():
      log(f"{name}: data pipeline")
      rec = results["configs"][name]
      pipe = bench_pipeline(config, workdir, opts, timer)
      fastest = max(rec["stages"], key=lambda s: rec["stages"][s]["audio_s_per_s"])
      pipe["step_stage"] = fastest
      pipe["step_audio_s_per_s"] = rec["stages"][fastest]["audio_s_per_s"]
      pipe["ratio"] = pipe["audio_s_per_s"] / pipe["step_audio_s_per_s"]
      rec["pipeline"] = pipe
  finally:
    if not opts.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  log("matmul peak (drift check) ...")
  results["peak_end"] = measure_peaks(opts.peak_size, opts.peak_repeats)
  results["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
  results["targets"] = evaluate_targets(results)
  results["wall_s"] = timer() - start
  return results


def write_json(results: dict, path: str) -> None:
  def clean(x):
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
      x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
      return None
    return x
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  with open(path, "w") as f:
    json.dump(clean(results), f, indent=1)


# ------------------------------------------------------------------------------------------------- the table


def _si(x: float, unit: str = "") -> str:
  if x is None or not math.isfinite(x):
    return "-"
  for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= div:
      return f"{x / div:.3g}{p}{unit}"
  return f"{x:.3g}{unit}"


def _mib(x: float) -> str:
  return "-" if x is None or not math.isfinite(x) else f"{x / 2**20:.0f}MiB"


def format_table(results: dict) -> str:
  m, lines = results["machine"], []
  add = lines.append
  add(f"e2etts-bench ({results['mode']}): backend {m['backend']} ({m['device_kind']}, {m['bench_devices']} of "
      f"{m['num_devices']} devices used), {m['cpu_count']} CPUs, jax {m['jax_version']}, wall "
      f"{results.get('wall_s', float('nan')):.0f} s")
  la0, la1 = m.get("loadavg_start"), m.get("loadavg_end")
  if la0:
    add(f"load average (1 min) at start {la0[0]:.2f}, at end {la1[0] if la1 else float('nan'):.2f}")
  p, pe = results["peak"], results.get("peak_end", {})
  add("matmul peak (the MFU denominator): " + ", ".join(
      f"{k} {_si(v['flops_per_s'], 'FLOP/s')} (n={v['size']}, median of {v['repeats']}; end of run "
      f"{_si(pe.get(k, {}).get('flops_per_s', float('nan')), 'FLOP/s')})" for k, v in p.items()))
  add("")
  hdr = (f"{'config':<7}{'program':<18}{'compile':>9}{'cache':>6}{'step':>9}{'FLOP':>8}{'FLOP/s':>9}{'MFU':>7}"
         f"{'local':>7}{'cpu':>7}{'tok/s':>8}{'audio-s/s':>10}{'memory':>9}{'joint/parts':>12}{'local':>7}"
         f"{'cpu':>7}{'FLOP ratio':>11}")
  add("Training steps: median step time after warm-up; MFU = analytic FLOPs / step time / the run's peak of the "
      "config's dtype;")
  add("local = the same against the peak matmul re-measured around the program (cancels load drift between "
      "programs); cpu = FLOPs per CPU-second over the matmul's (CPU only: insensitive to other jobs' load);")
  add("joint/parts = joint step time / sum of the single-network steps of its trainable networks (local, cpu: "
      "in local-peak and CPU-time units); FLOP ratio = the same by analytic FLOPs, which the time ratios match when "
      "fusing costs nothing (below 1: the parts repeat frozen forwards)")
  add(hdr)
  add("-" * len(hdr))
  for name, rec in results["configs"].items():
    if "skipped" in rec:
      add(f"{name:<7}skipped: {rec['skipped']}")
      continue
    add(f"{name:<7}batch {rec['batch_size']} x {rec['frames']} frames = {rec['batch']['audio_s']:.1f} audio-s, "
        f"{rec['batch']['speech_tokens']} speech tokens; dtype {rec['dtype']}; params "
        + ", ".join(f"{k} {_si(v)}" for k, v in rec["params"].items()))
    rows = [(f"{s} (joint)", r) for s, r in rec["stages"].items()] + \
           [(f"{n} alone", r) for n, r in rec["networks"].items()]
    for label, r in rows:
      jp = f"{r['joint_over_parts']:.2f}" if "joint_over_parts" in r else ""
      jpp = f"{r['joint_over_parts_local']:.2f}" if "joint_over_parts_local" in r else ""
      jpc = f"{r['joint_over_parts_cpu']:.2f}" if "joint_over_parts_cpu" in r else ""
      fr = f"{r['flops_joint_over_parts']:.2f}" if "flops_joint_over_parts" in r else ""
      add(f"{'':<7}{label:<18}{r['compile_s']:>8.1f}s{r['cache']:>6}{r['step_s']:>8.3f}s{_si(r['flops']):>8}"
          f"{_si(r['flops_per_s']):>9}{100 * r['mfu']:>6.1f}%{100 * r.get('mfu_local', float('nan')):>6.1f}%"
          f"{100 * r.get('mfu_cpu', float('nan')):>6.1f}%"
          f"{_si(r['tokens_per_s']):>8}"
          f"{r['audio_s_per_s']:>10.1f}{_mib(r['peak_memory_bytes']):>9}{jp:>12}{jpp:>7}{jpc:>7}{fr:>11}")
  def section(title: str, hdr: str, key: str, row: Callable[[str, dict], str]) -> None:
    """A titled table of one row per config holding `key`."""
    add("")
    add(title)
    add(hdr)
    add("-" * len(hdr))
    for name, rec in results["configs"].items():
      if key in rec:
        add(row(name, rec[key]))

  section("Data pipeline (Grain over prepared shards of a synthetic corpus) vs the fastest joint step's consumption",
          f"{'config':<7}{'pipeline audio-s/s':>20}{'step audio-s/s':>16}{'(stage)':>9}{'ratio':>8}", "pipeline",
          lambda name, q: f"{name:<7}{q['audio_s_per_s']:>20.1f}{q['step_audio_s_per_s']:>16.1f}"
                          f"{q['step_stage']:>9}{q['ratio']:>8.1f}")
  section("Synthesis (1 utterance; random weights, generation length fixed by masking eos)",
          f"{'config':<7}{'tokens':>7}{'cached tok/s':>13}{'recompute tok/s':>16}{'speed-up':>9}{'LLM':>8}"
          f"{'FM':>8}{'vocoder':>9}{'audio':>8}{'RTF':>7}", "synthesis",
          lambda name, s: f"{name:<7}{s['decode_tokens']:>7}{s['cached_tokens_per_s']:>13.1f}"
                          f"{s['reference_tokens_per_s']:>16.2f}{s['kv_speedup']:>8.1f}x{s['llm_s']:>7.2f}s"
                          f"{s['fm_s']:>7.2f}s{s['vocoder_s']:>8.2f}s{s['audio_s']:>7.1f}s{s['rtf']:>7.3f}")
  add("")
  add("Targets")
  hdr = f"{'target':<46}{'config':>7}{'value':>9}{'status':>7}{'local':>9}{'status':>7}{'cpu':>9}{'status':>7}"
  add(hdr)
  add("-" * len(hdr))
  for t in results.get("targets", []):
    fmt = lambda v: "-" if v is None else (f"{100 * v:.1f}%" if "mfu" in t["figure"] else f"{v:.3g}")
    alt = lambda k: (f"{fmt(t['value_' + k]):>9}{t['status_' + k]:>7}" if t.get("value_" + k) is not None
                     else f"{'':>16}")
    add(f"{t['name']:<46}{t['config']:>7}{fmt(t['value']):>9}{t['status']:>7}{alt('local')}{alt('cpu')}"
        + (f"  ({t['note']})" if t["note"] else ""))
  return "\n".join(lines)
