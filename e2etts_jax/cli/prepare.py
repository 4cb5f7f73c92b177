"""`e2etts-prepare`: a manifest (JSONL, LJSpeech, LibriTTS or Seed-TTS-Eval meta.lst) -> ArrayRecord shards.

  e2etts-prepare --manifest data/corpus/manifest.jsonl --out data/shards --config configs/tiny.py \
      --config.audio.n_mels=40 --workers 2

Re-running with the same inputs and config does nothing (DONE.json); an interrupted run resumes from the
per-item feature cache. Rejected items are listed with reasons in OUT/rejects.jsonl.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from e2etts_jax import config_lib, prepare

_CONFIG = config_flags.DEFINE_config_file("config", "configs/small.py", "Config file (configs/*.py).",
                                          lock_config=True)
_MANIFEST = flags.DEFINE_string("manifest", None, "Manifest file or corpus folder (default: config.data.manifest).")
_OUT = flags.DEFINE_string("out", None, "Output folder for the shards (default: config.data.shards).")
_WORKERS = flags.DEFINE_integer("workers", None, "Feature worker processes (default: all cores; 1 = in-process).")
_SPM = flags.DEFINE_string("spm_model", None, "Use this sentencepiece model instead of training one.")
_LAYOUT = flags.DEFINE_enum("layout", None, list(prepare.LAYOUTS), "Manifest layout (default: auto-detect).")
_FORCE = flags.DEFINE_boolean("force", False, "Prepare again even if DONE.json matches.")
_KEEP_CACHE = flags.DEFINE_boolean("keep_cache", False, "Keep OUT/.cache (per-item features) after success.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = config_lib.validate(_CONFIG.value)
  manifest = _MANIFEST.value or config.data.manifest
  out = _OUT.value or config.data.shards
  if not manifest or not out:
    raise app.UsageError("need --manifest and --out (or config.data.manifest and config.data.shards)")
  prepare.prepare(config, manifest, out, num_workers=_WORKERS.value, spm_model=_SPM.value,
                  layout=_LAYOUT.value, force=_FORCE.value, keep_cache=_KEEP_CACHE.value)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
