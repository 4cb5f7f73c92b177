"""Seed-TTS-Eval-compatible evaluation: WER rules, item lists, ASR and speaker judges, statistics, reports.

Typical use (scoring a folder of `<utt>.wav`):

  from e2etts_jax import evaluation
  items = evaluation.load_items("meta.lst")
  results = evaluation.evaluate(items, "out/", wavs_dir="wavs/", asr=evaluation.make_asr("pocketsphinx"))
  print(results["summary"]["wer"]["mean"])   # mean of per-utterance WERs x 100
"""
from e2etts_jax.evaluation.asr import ASR, ASRPool, PocketSphinxASR, WhisperASR, judge, make_asr, register_asr
from e2etts_jax.evaluation.harness import evaluate
from e2etts_jax.evaluation.metalist import (EvalItem, MetalistError, items_from_manifest, load_items, read_metalist,
                                            write_metalist)
from e2etts_jax.evaluation.report import compare, compare_markdown, load_results
from e2etts_jax.evaluation.speaker import (SpeakerEncoder, cosine_similarity, make_speaker_encoder,
                                           register_speaker_encoder)
from e2etts_jax.evaluation.stats import bootstrap_ci, paired_bootstrap, sign_test
from e2etts_jax.evaluation.wer import mean_wer, normalize, utterance_wer

__all__ = [
    "ASR", "ASRPool", "PocketSphinxASR", "WhisperASR", "judge", "make_asr", "register_asr", "evaluate", "EvalItem",
    "MetalistError", "items_from_manifest", "load_items", "read_metalist", "write_metalist", "compare",
    "compare_markdown", "load_results", "SpeakerEncoder", "cosine_similarity", "make_speaker_encoder",
    "register_speaker_encoder", "bootstrap_ci", "paired_bootstrap", "sign_test", "mean_wer", "normalize",
    "utterance_wer",
]
