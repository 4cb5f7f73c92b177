"""e2etts-eval: Seed-TTS-Eval-style scoring of a test list.

  e2etts-eval --list meta.lst --out DIR --wavs WAV_DIR            # score an existing folder of <utt>.wav
  e2etts-eval --list manifest.jsonl --out DIR --workdir CKPT_DIR  # synthesise with a trained system, then score
  e2etts-eval --list meta.lst --out DIR --ceiling                 # score the ground-truth wavs (the ASR floor)
  ... [--asr pocketsphinx|whisper --asr_model DIR] [--speaker none|resemblyzer|wavlm_ecapa|mfcc]
      [--compare OTHER/results.json] [--ceiling_results CEIL/results.json] [--limit N] [--seed S]

Writes DIR/results.json, DIR/details.csv, DIR/report.md and DIR/plots/. A manifest (.jsonl) gives one item
per `--split` utterance, prompted by another utterance of the same speaker (chosen with `--seed`).

The flags live in their own FlagValues, so importing this module next to other command-line modules of the
package never clashes over common names like --seed or --workdir.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from absl import app, flags

from e2etts_jax.cli import flag_parsing

FLAGS = flags.FlagValues()
flags.DEFINE_string("list", None, "Seed-TTS-Eval meta.lst (utt|prompt_text|prompt_wav|target_text[|gt_wav]) or a "
                    "JSONL manifest (.jsonl).", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output folder.", flag_values=FLAGS)
flags.DEFINE_string("wavs", None, "Folder of <utt>.wav to score.", flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Training workdir to synthesise from (e2etts_jax.synthesis).",
                    flag_values=FLAGS)
flags.DEFINE_bool("ceiling", False, "Score the list's ground-truth wavs instead of a system.", flag_values=FLAGS)
flags.DEFINE_string("asr", "pocketsphinx", "ASR judge: pocketsphinx (offline, English) or whisper.",
                    flag_values=FLAGS)
flags.DEFINE_string("asr_model", None, "Local Whisper model folder for --asr whisper.", flag_values=FLAGS)
flags.DEFINE_integer("asr_workers", 1, "Processes the judge transcribes in, beside synthesis and scoring "
                     "(evaluation.ASRPool; same results); 1 = in this process.", flag_values=FLAGS)
flags.DEFINE_string("speaker", "none", "Speaker encoder for SIM: none, resemblyzer, wavlm_ecapa or mfcc "
                    "(mfcc is a model-free smoke test, not a SIM to report).", flag_values=FLAGS)
flags.DEFINE_string("speaker_checkpoint", None, "wavlm_ecapa: wavlm_large_finetune.pth.", flag_values=FLAGS)
flags.DEFINE_string("unispeech_dir", None, "wavlm_ecapa: UniSpeech downstreams/speaker_verification folder.",
                    flag_values=FLAGS)
flags.DEFINE_string("wavlm_path", None, "wavlm_ecapa: local WavLM-Large.pt.", flag_values=FLAGS)
flags.DEFINE_string("device", "cpu", "Device for torch-based judges.", flag_values=FLAGS)
flags.DEFINE_string("compare", None, "Another run's results.json to compare with (paired tests).",
                    flag_values=FLAGS)
flags.DEFINE_string("ceiling_results", None, "A --ceiling run's results.json, for WER / ceiling WER.",
                    flag_values=FLAGS)
flags.DEFINE_enum("lang", "en", ["en", "zh"], "Text normalisation language.", flag_values=FLAGS)
flags.DEFINE_string("split", "test", "Manifest split whose utterances are the targets.", flag_values=FLAGS)
flags.DEFINE_integer("limit", None, "Score only the first N items.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed for manifest prompt choice and the bootstrap.", flag_values=FLAGS)
flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamples for confidence intervals.", flag_values=FLAGS)
flags.DEFINE_integer("mel_plots", 3, "Utterances that get a mel image in the report.", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=FLAGS)
flag_parsing.define_inference_flag(FLAGS)



def _parse_own(argv: Sequence[str]) -> list[str]:
  return flag_parsing.parse_own(FLAGS, __doc__, argv)


def _make_synthesize(workdir: str):
  try:
    # import_module, not `from e2etts_jax import synthesis`: a missing submodule then raises
    # ModuleNotFoundError naming it, told apart from a failing import inside an existing module.
    synthesis = importlib.import_module("e2etts_jax.synthesis")
  except ModuleNotFoundError as e:
    if e.name != "e2etts_jax.synthesis":
      raise
    raise app.UsageError("--workdir needs e2etts_jax.synthesis, which is not in this installation yet; "
                         "synthesise the wavs elsewhere and score them with --wavs DIR") from e
  synth_cls = getattr(synthesis, "Synthesizer", None)
  if synth_cls is None or not hasattr(synth_cls, "from_workdir"):
    raise app.UsageError("e2etts_jax.synthesis has no Synthesizer.from_workdir(workdir); "
                         "score pre-synthesised wavs with --wavs DIR")
  try:
    return synth_cls.from_workdir(workdir, inference=FLAGS.inference).synthesize_item
  except ValueError as e:   # an --inference key or value it cannot take
    raise app.UsageError(str(e)) from e


def _speaker_kwargs() -> dict:
  if FLAGS.speaker == "wavlm_ecapa":
    return {"checkpoint_path": FLAGS.speaker_checkpoint, "unispeech_dir": FLAGS.unispeech_dir,
            "wavlm_path": FLAGS.wavlm_path, "device": FLAGS.device}
  if FLAGS.speaker == "resemblyzer":
    return {"device": FLAGS.device}
  return {}


def _evaluate_from_flags() -> int:
  if not FLAGS.list or not FLAGS.out:
    raise app.UsageError("--list and --out are required")
  sources = [f for f, on in (("--wavs", FLAGS.wavs), ("--workdir", FLAGS.workdir), ("--ceiling", FLAGS.ceiling))
             if on]
  if len(sources) != 1:
    raise app.UsageError(f"give exactly one of --wavs, --workdir, --ceiling (got {', '.join(sources) or 'none'})")
  if FLAGS.inference and not FLAGS.workdir:
    raise app.UsageError("--inference sets how a --workdir system synthesises; it needs --workdir")
  if FLAGS.speaker == "internal":
    raise app.UsageError("--speaker internal needs a callable; use it from Python (speaker.CallableEncoder)")
  if FLAGS.asr_workers < 1:
    raise app.UsageError(f"--asr_workers={FLAGS.asr_workers}: need at least 1")
  if FLAGS.asr == "pocketsphinx" and FLAGS.lang != "en":
    raise app.UsageError("the bundled pocketsphinx model is English only; use --asr whisper for --lang zh")
  from e2etts_jax import evaluation  # pylint: disable=import-outside-toplevel  # heavy: after flag checks
  try:
    items = evaluation.load_items(FLAGS.list, split=FLAGS.split, seed=FLAGS.seed, limit=FLAGS.limit)
  except (OSError, evaluation.MetalistError) as e:
    raise app.UsageError(f"cannot read --list: {e}") from e
  asr_kwargs = {"model_path": FLAGS.asr_model, "language": FLAGS.lang, "device": FLAGS.device} \
      if FLAGS.asr == "whisper" else {}
  encoder = evaluation.make_speaker_encoder(FLAGS.speaker, **_speaker_kwargs())
  synthesize = _make_synthesize(FLAGS.workdir) if FLAGS.workdir else None
  with evaluation.judge(FLAGS.asr, FLAGS.asr_workers, **asr_kwargs) as asr:
    results = evaluation.evaluate(
        items, FLAGS.out, synthesize=synthesize, wavs_dir=FLAGS.wavs, ceiling=FLAGS.ceiling, asr=asr,
        speaker_encoder=encoder, lang=FLAGS.lang, ceiling_results=FLAGS.ceiling_results, compare_to=FLAGS.compare,
        n_resamples=FLAGS.bootstrap, seed=FLAGS.seed, num_mel_plots=FLAGS.mel_plots, progress=FLAGS.progress,
        meta={"list": FLAGS.list, "workdir": FLAGS.workdir, "inference": FLAGS.inference})
  s = results["summary"]
  c = s["counts"]
  if s["wer"]:
    w = s["wer"]
    print(f"WER {w['mean']:.2f}% [95% CI {w['ci_low']:.2f}, {w['ci_high']:.2f}] over {w['n']} utterances "
          f"(corpus WER {s['corpus_wer']:.2f}%)")
  if s["sim"]:
    print(f"SIM {s['sim']['mean']:.3f} [95% CI {s['sim']['ci_low']:.3f}, {s['sim']['ci_high']:.3f}]")
  if results.get("compare") and results["compare"]["wer"]:
    cw = results["compare"]["wer"]
    print(f"vs {FLAGS.compare}: WER diff {cw['diff']:+.2f} points [{cw['ci_low']:+.2f}, {cw['ci_high']:+.2f}], "
          f"p={cw['p_bootstrap']:.4f} (bootstrap), {cw['sign_test']['p_value']:.4f} (sign)")
  print(f"{c['scored']} scored, {c['failed']} failed of {c['items']}; report: {FLAGS.out}/report.md")
  return 0 if c["scored"] else 1


def main(argv: Sequence[str]) -> int:
  """Runs with argv = [program, --flag=value, ...] and returns the exit status (for scripts and tests)."""
  rest = _parse_own(argv)
  if len(rest) > 1:
    raise app.UsageError(f"unknown arguments: {' '.join(rest[1:])}")
  return _evaluate_from_flags()


def run() -> None:
  """Console-script entry point (e2etts-eval)."""
  app.run(_app_main, flags_parser=flag_parsing.app_flags_parser(FLAGS, __doc__))


def _app_main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unknown arguments: {' '.join(argv[1:])}")
  sys.exit(_evaluate_from_flags())


if __name__ == "__main__":
  run()
