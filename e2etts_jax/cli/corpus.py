"""e2etts-corpus: synthesizes the embedded English corpus (flite/espeak-ng voices, fortunes text).

  e2etts-corpus --out /data/corpus --num_utterances 1000 --seed 0 [--workers 2] [--voices default,espeak]
  e2etts-corpus --list_voices

Writes OUT/wavs/<id>.wav and OUT/manifest.jsonl; re-running the same command reuses the wavs already made.
See e2etts_jax/corpus.py for the voices, the value ranges and the manifest format.
"""
from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

from e2etts_jax import corpus

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output folder (wavs/ and manifest.jsonl go here).")
flags.DEFINE_integer("num_utterances", 1000, "Utterances to synthesize.")
flags.DEFINE_integer("seed", 0, "Picks sentences, speakers, splits, rates and pitches.")
flags.DEFINE_integer("workers", None, "Synthesizer processes run at once (default: CPU count).")
flags.DEFINE_list("voices", ["default"],
                  "Voice names and/or groups: " + ", ".join(corpus.VOICE_GROUPS) + "; voices: " +
                  ", ".join(v.name for v in corpus.KNOWN_VOICES) +
                  ". 'default' = flite + installed mbrola; the espeak formant voices are train-only extras.")
flags.DEFINE_float("test_fraction", 0.1, "Share of utterances held out for test (flite voices, unseen sentences).")
flags.DEFINE_string("fortune_dir", corpus.FORTUNE_DIR, "Folder with the Debian fortunes files.")
flags.DEFINE_bool("list_voices", False, "Print every known voice and whether it is installed, then exit.")


def _list_voices() -> None:
  for v in corpus.KNOWN_VOICES:
    reason = corpus.missing_reason(v)
    role = "train+test" if v.primary else "train only"
    print(f"{v.name:20s} {v.family:7s} {role:11s} {'installed' if reason is None else 'missing: ' + reason}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.list_voices:
    _list_voices()
    return
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  try:
    manifest = corpus.build_corpus(FLAGS.out, FLAGS.num_utterances, seed=FLAGS.seed, workers=FLAGS.workers,
                                   voices=FLAGS.voices, test_fraction=FLAGS.test_fraction,
                                   fortune_dir=FLAGS.fortune_dir)
  except corpus.CorpusError as e:
    # A clear one-line reason (missing binary, unknown voice, missing package) instead of a traceback.
    print(f"e2etts-corpus: error: {e}", file=sys.stderr)
    sys.exit(1)
  summary = corpus.summarize(corpus.read_manifest(manifest))
  print(json.dumps({"manifest": manifest, **summary}, indent=1))


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
