"""e2etts-bench: measure training-step utilisation, data-pipeline headroom and synthesis speed on this machine.

  e2etts-bench                          # small (and base on GPU/TPU): every target's config
  e2etts-bench --configs tiny,small     # tiny too
  e2etts-bench --quick                  # smoke run: tiny, stage 3 and its one part, short generations
  e2etts-bench --configs small --stages stage1,stage2 --frames max --out runs/bench.json

Prints a table (with PASS/FAIL against the targets) and writes every figure to --out as JSON. On one core of a
2-core CPU the default run compiles 10 programs of 13-45 s each (the 'compile' column, with 'cache' miss) and
takes about 8 minutes cold; with the persistent compilation cache holding its programs, about 4.
"""
from __future__ import annotations

from absl import app, flags

_QUICK = flags.DEFINE_boolean("quick", False, "Smoke mode: tiny only, one stage, few repeats, short generation.")
_CONFIGS = flags.DEFINE_list("configs", None, "Config sizes to measure (default: small,base; base is skipped "
                             "without an accelerator; --quick: tiny).")
_STAGES = flags.DEFINE_list("stages", None, "Training stages to measure (default: all; --quick: stage3).")
_PARTS = flags.DEFINE_list("parts", None, "Configs whose single-network steps are measured for the joint/parts "
                           "ratio (default: small,base, the target configs; --quick: tiny).")
_FRAMES = flags.DEFINE_string("frames", None, "Mel frames per batch row: mid (middle length bucket, default), min, "
                              "max, or a number.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Batch rows (default: the config's data.batch_size).")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed calls per program (median reported), after one warm-up.")
_DECODE = flags.DEFINE_integer("decode_tokens", None, "Generated speech tokens in the synthesis benchmark (500).")
_REF_TOKENS = flags.DEFINE_integer("reference_tokens", None,
                                   "Tokens the recomputing (no KV cache) decoder generates at the same shapes.")
_PIPELINE = flags.DEFINE_integer("pipeline_batches", None, "Batches read when timing the data pipeline.")
_CACHE = flags.DEFINE_boolean("compilation_cache", True, "Use the persistent compilation cache (compile times "
                              "are then cache loads where the 'cache' column says hit).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the synthetic corpus and shards (default: temporary).")
_OUT = flags.DEFINE_string("out", "bench.json", "Where to write the results (JSON).")


def options():
  from e2etts_jax import bench
  overrides = {k: v for k, v in {
      "configs": tuple(_CONFIGS.value) if _CONFIGS.value else None,
      "stages": tuple(_STAGES.value) if _STAGES.value else None,
      "parts_configs": tuple(_PARTS.value) if _PARTS.value is not None else None,
      "frames": _FRAMES.value, "batch_size": _BATCH.value, "repeats": _REPEATS.value,
      "decode_tokens": _DECODE.value, "reference_tokens": _REF_TOKENS.value,
      "pipeline_batches": _PIPELINE.value, "workdir": _WORKDIR.value,
  }.items() if v is not None}
  overrides["compilation_cache"] = _CACHE.value
  return bench.Options.quick(**overrides) if _QUICK.value else bench.Options(**overrides)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from e2etts_jax import bench, config_lib
  opts = options()
  for name in opts.configs:
    if name not in config_lib.SIZES:
      raise app.UsageError(f"--configs: unknown size {name!r}; choose from {', '.join(config_lib.SIZES)}")
  for stage in opts.stages:
    if stage not in config_lib.STAGES:
      raise app.UsageError(f"--stages: unknown stage {stage!r}; choose from {', '.join(config_lib.STAGES)}")
  results = bench.run_benchmark(opts, log=lambda msg: print(f"[e2etts-bench] {msg}", flush=True))
  bench.write_json(results, _OUT.value)
  print(bench.format_table(results))
  print(f"[e2etts-bench] wrote {_OUT.value}")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
