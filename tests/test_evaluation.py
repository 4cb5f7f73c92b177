"""Evaluation harness: item lists, statistics, and end-to-end scoring of flite speech with pocketsphinx."""
import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import soundfile as sf

import e2etts_jax
from e2etts_jax import audio
from e2etts_jax.evaluation import asr as asr_lib
from e2etts_jax.evaluation import harness, metalist, report, speaker, stats
from e2etts_jax.evaluation.metalist import EvalItem

# (utt, flite voice, sentence): sentences the bundled pocketsphinx model recognises well in these voices.
CLEAN = [
    ("awb_box", "awb", "The box was thrown beside the parked truck."),
    ("rms_dish", "rms", "These days a chicken leg is a rare dish."),
    ("kal_sell", "kal16", "A large size in stockings is hard to sell."),
]
PROMPT_TEXT = "It's easy to tell the depth of a well."


def _flite(voice: str, text: str, path: str) -> None:
  subprocess.run(["flite", "-voice", voice, "-t", text, "-o", path], check=True, capture_output=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Flite recordings: <root>/gt/<utt>.wav (targets), <root>/prompts/<voice>.wav, and a meta.lst."""
  if shutil.which("flite") is None:
    pytest.skip("flite is not installed")
  root = tmp_path_factory.mktemp("corpus")
  (root / "gt").mkdir()
  (root / "prompts").mkdir()
  lines = []
  for utt, voice, text in CLEAN:
    _flite(voice, text, str(root / "gt" / f"{utt}.wav"))
    _flite(voice, PROMPT_TEXT, str(root / "prompts" / f"{voice}.wav"))
    lines.append(f"{utt}|{PROMPT_TEXT}|prompts/{voice}.wav|{text}|gt/{utt}.wav")
  (root / "meta.lst").write_text("\n".join(lines) + "\n")
  return root


@pytest.fixture(scope="module")
def pocketsphinx_asr():
  return asr_lib.make_asr("pocketsphinx")


# ----------------------------------------------------------------------------------------------------------------
# Lists and manifests


def test_read_metalist_relative_paths_and_field_counts(tmp_path):
  (tmp_path / "lists").mkdir()
  path = tmp_path / "lists" / "meta.lst"
  path.write_text("u1|prompt one|wavs/p1.wav|target one\n"
                  "\n"
                  "u2|prompt two|../p2.wav|target two|gt/u2.wav\r\n"
                  "u3||/abs/p3.wav|target three|\n")
  items = metalist.read_metalist(str(path))
  assert [it.utt for it in items] == ["u1", "u2", "u3"]
  assert items[0] == EvalItem("u1", "prompt one", str(tmp_path / "lists" / "wavs" / "p1.wav"), "target one", None)
  assert items[1].prompt_wav == str(tmp_path / "p2.wav")
  assert items[1].gt_wav == str(tmp_path / "lists" / "gt" / "u2.wav")
  assert items[2].prompt_wav == "/abs/p3.wav" and items[2].gt_wav is None and items[2].prompt_text == ""
  # write_metalist round-trips through relative paths.
  out = tmp_path / "elsewhere" / "copy.lst"
  metalist.write_metalist(items, str(out))
  assert "|../" in out.read_text()
  assert metalist.read_metalist(str(out)) == items


@pytest.mark.parametrize("bad_line, message", [
    ("u9|only|three", "expected 4 or 5"),
    ("u9|a|b.wav|c|d.wav|extra", "got 6"),
    ("u9|a||target", "empty prompt_wav"),
    ("u1|a|b.wav|dup", "already used on line 1"),
])
def test_malformed_metalist_line_names_the_line(tmp_path, bad_line, message):
  path = tmp_path / "meta.lst"
  path.write_text(f"u1|a|b.wav|c\n\n{bad_line}\n")
  with pytest.raises(metalist.MetalistError, match=rf"meta\.lst:3: .*{message}"):
    metalist.read_metalist(str(path))


def _write_manifest(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_manifest_items_prompt_with_same_speaker_other_utterance(tmp_path):
  rows = []
  for spk, n_train, n_test in (("A", 6, 3), ("B", 0, 2), ("C", 0, 1)):
    for i in range(n_train):
      rows.append({"id": f"{spk}_tr{i}", "audio": f"wav/{spk}_tr{i}.wav", "text": f"{spk} train {i}",
                   "speaker": spk, "split": "train"})
    for i in range(n_test):
      rows.append({"id": f"{spk}_te{i}", "audio": f"wav/{spk}_te{i}.wav", "text": f"{spk} test {i}",
                   "speaker": spk, "split": "test", "lang": "en"})
  path = tmp_path / "manifest.jsonl"
  _write_manifest(path, rows)
  by_id = {r["id"]: r for r in rows}
  items = metalist.items_from_manifest(str(path), seed=0)
  # C has a single utterance: nothing else to prompt with, so it is skipped.
  assert [it.utt for it in items] == ["A_te0", "A_te1", "A_te2", "B_te0", "B_te1"]
  for it in items:
    prompt_id = os.path.basename(it.prompt_wav)[:-4]
    assert prompt_id != it.utt
    assert by_id[prompt_id]["speaker"] == by_id[it.utt]["speaker"]
    assert it.prompt_text == by_id[prompt_id]["text"] and it.target_text == by_id[it.utt]["text"]
    assert it.gt_wav == str(tmp_path / "wav" / f"{it.utt}.wav")
    # Speaker A has train utterances, so its prompts come from train; B has only test ones.
    assert by_id[prompt_id]["split"] == ("train" if it.utt.startswith("A") else "test")
  # Deterministic for a seed, and the seed matters (6 candidates for 3 targets over several seeds).
  assert metalist.items_from_manifest(str(path), seed=0) == items
  assert any(metalist.items_from_manifest(str(path), seed=s) != items for s in range(1, 6))
  assert metalist.load_items(str(path), limit=2) == items[:2]


def test_manifest_items_take_prompts_no_longer_than_asked(tmp_path):
  # Speaker A: train utterances 1..6 s long; B: one 8 s train utterance, too long to prompt with.
  rows = [{"id": f"A_tr{i}", "audio": f"wav/A_tr{i}.wav", "text": f"a {i}", "speaker": "A", "split": "train",
           "duration": float(i)} for i in range(1, 7)]
  rows += [{"id": "B_tr0", "audio": "wav/B_tr0.wav", "text": "b", "speaker": "B", "split": "train", "duration": 8.0}]
  rows += [{"id": f"{s}_te", "audio": f"wav/{s}_te.wav", "text": f"{s} test", "speaker": s, "split": "test",
            "duration": 9.0} for s in "AB"]
  path = tmp_path / "manifest.jsonl"
  _write_manifest(path, rows)
  duration = {f"wav/{r['id']}.wav": r["duration"] for r in rows}
  prompt_seconds = lambda it: duration[os.path.relpath(it.prompt_wav, tmp_path)]
  unlimited = [metalist.items_from_manifest(str(path), seed=s) for s in range(8)]
  assert max(prompt_seconds(it) for items in unlimited for it in items if it.utt == "A_te") > 3.0
  for s in range(8):
    items = metalist.items_from_manifest(str(path), seed=s, max_prompt_seconds=3.0)
    assert [it.utt for it in items] == ["A_te"] and prompt_seconds(items[0]) <= 3.0   # B has no short prompt
    assert items[0].gt_wav == unlimited[s][0].gt_wav   # the targets are the same, whatever their length


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def test_bootstrap_ci_contains_mean_and_narrows():
  rng = np.random.default_rng(0)
  small, large = rng.exponential(size=20), rng.exponential(size=2000)
  ci_small, ci_large = stats.bootstrap_ci(small, seed=1), stats.bootstrap_ci(large, seed=1)
  for ci, x in ((ci_small, small), (ci_large, large)):
    assert ci["mean"] == pytest.approx(x.mean())
    assert ci["ci_low"] < ci["mean"] < ci["ci_high"]
  assert (ci_large["ci_high"] - ci_large["ci_low"]) < 0.5 * (ci_small["ci_high"] - ci_small["ci_low"])
  assert stats.bootstrap_ci(small, seed=1) == ci_small  # seeded
  one = stats.bootstrap_ci([0.3])
  assert one["ci_low"] == one["mean"] == one["ci_high"] == 0.3


def test_sign_test_matches_hand_computed_binomial():
  a = [1, 2, 3, 4, 5, 6, 7, 8, 1, 1, 5]
  b = [0, 1, 2, 3, 4, 5, 6, 7, 2, 2, 5]  # a higher 8 times, lower 2 times, 1 tie
  out = stats.sign_test(a, b)
  assert (out["n_a_higher"], out["n_b_higher"], out["n_ties"]) == (8, 2, 1)
  # Two-sided: 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 2 * (1 + 10 + 45) / 1024.
  assert out["p_value"] == pytest.approx(2 * 56 / 1024)
  assert stats.sign_test([1, 2], [1, 2])["p_value"] == 1.0


def test_paired_bootstrap_same_system_and_clear_difference():
  rng = np.random.default_rng(0)
  a = rng.uniform(size=200)
  same = stats.paired_bootstrap(a, a)
  assert same["diff"] == 0.0 and same["p_value"] == 1.0
  worse = stats.paired_bootstrap(a + 0.05 + 0.01 * rng.standard_normal(200), a)
  assert worse["p_value"] < 0.01 and worse["ci_low"] > 0.0
  with pytest.raises(ValueError, match="equal lengths"):
    stats.paired_bootstrap([1.0, 2.0], [1.0])


def test_paired_over_seeds_tests_seeds_then_pooled_sentences():
  from scipy import stats as sstats
  a, b = [50.0, 42.0, 47.0], [55.0, 50.0, 49.0]
  utt_a, utt_b = [0.0, 100.0, 50.0, 20.0], [10.0, 100.0, 70.0, 20.0]
  c = stats.paired_over_seeds(a, b, utt_a, utt_b, n_resamples=500)
  assert c["n_seeds"] == 3 and c["n_utterances"] == 4
  np.testing.assert_allclose([c["mean_a"], c["std_a"], c["mean_b"], c["std_b"]],
                             [np.mean(a), np.std(a, ddof=1), np.mean(b), np.std(b, ddof=1)])
  np.testing.assert_allclose(c["t_test_p"], sstats.ttest_rel(a, b).pvalue)
  boot = stats.paired_bootstrap(utt_a, utt_b, n_resamples=500)
  assert (c["utt_diff"], c["utt_ci_low"], c["utt_ci_high"], c["utt_p"]) == (
      boot["diff"], boot["ci_low"], boot["ci_high"], boot["p_value"])
  # One seed: no t-test and zero spread; no utterances: no bootstrap; identical systems: no t-test either.
  one = stats.paired_over_seeds([1.0], [2.0])
  assert one["t_test_p"] is None and one["std_a"] == 0.0 and one["utt_diff"] is None and one["n_utterances"] == 0
  assert stats.paired_over_seeds(a, a)["t_test_p"] is None
  with pytest.raises(ValueError, match="same seeds"):
    stats.paired_over_seeds(a, b[:2])


def test_compare_results_with_itself():
  results = {"summary": {}, "utterances": [{"utt": f"u{i}", "wer": w, "sim": s} for i, (w, s) in
                                           enumerate([(0.0, 0.8), (0.25, 0.7), (1.0, 0.5), (0.1, 0.9)])]}
  cmp = report.compare(results, results)
  assert cmp["n_common"] == 4 and cmp["only_a"] == cmp["only_b"] == 0
  for key in ("wer", "sim"):
    assert cmp[key]["diff"] == 0.0
    assert cmp[key]["p_bootstrap"] == 1.0 and cmp[key]["sign_test"]["p_value"] == 1.0
  assert cmp["wer"]["a"] == pytest.approx(100 * np.mean([0.0, 0.25, 1.0, 0.1]))
  assert "| WER % |" in report.compare_markdown(cmp)


# ----------------------------------------------------------------------------------------------------------------
# Judges


def test_registries_and_missing_backends(tmp_path):
  with pytest.raises(ValueError, match="unknown ASR"):
    asr_lib.make_asr("nope")
  with pytest.raises(FileNotFoundError, match="Whisper model folder not found"):
    asr_lib.make_asr("whisper", model_path=str(tmp_path / "missing"))
  assert speaker.make_speaker_encoder("none") is None
  with pytest.raises(ValueError, match="unknown speaker encoder"):
    speaker.make_speaker_encoder("nope")
  with pytest.raises(FileNotFoundError, match="wavlm_large_finetune"):
    speaker.make_speaker_encoder("wavlm_ecapa", checkpoint_path=str(tmp_path / "x.pth"),
                                 unispeech_dir=str(tmp_path), wavlm_path=str(tmp_path / "y.pt"))
  if importlib.util.find_spec("resemblyzer") is None:
    with pytest.raises(ImportError, match="pip install resemblyzer"):
      speaker.make_speaker_encoder("resemblyzer")


def test_internal_encoder_gets_16k_audio_and_cosine():
  seen = []

  def fn(wav):
    seen.append(wav.shape[0])
    return np.array([wav.std(), 1.0])

  enc = speaker.make_speaker_encoder("internal", fn=fn)
  x = np.sin(np.linspace(0, 2000, 24000)).astype(np.float32)  # 1 s at 24 kHz
  assert enc.similarity(x, 24000, x, 24000) == pytest.approx(1.0)
  assert seen == [16000, 16000]
  assert speaker.cosine_similarity([1, 0], [0, 1]) == 0.0
  assert speaker.cosine_similarity([1, 2], [-1, -2]) == pytest.approx(-1.0)


def test_pocketsphinx_resamples_and_downmixes(corpus, pocketsphinx_asr):
  wav, sr = sf.read(str(corpus / "gt" / "awb_box.wav"), dtype="float32")
  stereo = np.stack([audio.resample(wav, sr, 22050)] * 2, axis=1)  # [samples, 2] at 22.05 kHz
  hyp = pocketsphinx_asr.transcribe(stereo, 22050)
  assert hyp == pocketsphinx_asr.transcribe(wav, sr) or len(hyp.split()) >= 6
  assert "truck" in hyp
  assert pocketsphinx_asr.transcribe(np.zeros(0, np.float32), 16000) == ""


def test_pocketsphinx_transcript_does_not_depend_on_what_came_before(corpus):
  # A noisy wav sits where recognition is fragile: a front end adapted by earlier utterances changes its words.
  wav, sr = sf.read(str(corpus / "gt" / "awb_box.wav"), dtype="float32")
  noisy = (wav + 0.05 * np.random.default_rng(0).standard_normal(wav.shape)).astype(np.float32)
  alone = asr_lib.make_asr("pocketsphinx").transcribe(noisy, sr)
  shared = asr_lib.make_asr("pocketsphinx")
  other, _ = sf.read(str(corpus / "gt" / "rms_dish.wav"), dtype="float32")
  for before in (0.05 * other, 0.5 * np.random.default_rng(1).standard_normal(sr).astype(np.float32), other):
    shared.transcribe(before, sr)
    assert shared.transcribe(noisy, sr) == alone


# ----------------------------------------------------------------------------------------------------------------
# End to end


def _read_details(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def test_score_wav_folder_end_to_end(corpus, pocketsphinx_asr, tmp_path):
  wavs = tmp_path / "wavs"
  wavs.mkdir()
  for utt, _, _ in CLEAN:
    shutil.copy(corpus / "gt" / f"{utt}.wav", wavs / f"{utt}.wav")
  (wavs / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wav")
  items = metalist.read_metalist(str(corpus / "meta.lst"))
  items += [EvalItem("missing", PROMPT_TEXT, str(corpus / "prompts" / "awb.wav"), "No file for this one."),
            EvalItem("broken", PROMPT_TEXT, str(corpus / "prompts" / "awb.wav"), "This file is corrupt."),
            # The prompt IS the scored wav, so its SIM must be 1: proves SIM compares with the prompt.
            EvalItem("self_prompt", PROMPT_TEXT, str(wavs / "awb_box.wav"), CLEAN[0][2])]
  shutil.copy(wavs / "awb_box.wav", wavs / "self_prompt.wav")
  out = tmp_path / "out"
  results = harness.evaluate(
      items, str(out), wavs_dir=str(wavs), asr=pocketsphinx_asr, speaker_encoder=speaker.make_speaker_encoder("mfcc"),
      internal_scorer=lambda item, wav, sr: {"seconds": wav.size / sr}, n_resamples=500, progress=False)

  s = results["summary"]
  assert s["counts"] == {"items": 6, "scored": 4, "failed": 2, "sim_scored": 4, "sim_failed": 0}
  reasons = {f["utt"]: f["reason"] for f in results["failures"]}
  assert set(reasons) == {"missing", "broken"}
  assert "missing wav" in reasons["missing"] and "unreadable audio" in reasons["broken"]

  rows = _read_details(out / "details.csv")
  assert [r["utt"] for r in rows] == [it.utt for it in items]
  ok = {r["utt"]: r for r in rows if r["status"] == "ok"}
  for utt, _, _ in CLEAN:
    assert float(ok[utt]["wer"]) < 0.4, (utt, ok[utt]["hypothesis"])
  # The headline is the mean of per-utterance WERs in details.csv, x 100, and it matches the JSON list.
  assert s["wer"]["mean"] == pytest.approx(100 * np.mean([float(r["wer"]) for r in ok.values()]))
  assert s["wer"]["mean"] == pytest.approx(100 * np.mean([u["wer"] for u in results["utterances"]]))
  assert s["wer"]["mean"] < 40.0 and s["wer"]["ci_low"] <= s["wer"]["mean"] <= s["wer"]["ci_high"]
  assert float(ok["self_prompt"]["sim"]) == pytest.approx(1.0, abs=1e-5)
  assert all(-1.0 <= float(r["sim"]) <= 1.0 for r in ok.values())
  # gt == scored wav for the list items: duration ratio 1; no gt for self_prompt.
  assert float(ok["awb_box"]["duration_ratio"]) == pytest.approx(1.0, abs=1e-3)
  assert ok["self_prompt"]["duration_ratio"] == ""
  assert s["duration_ratio"]["n"] == 3
  assert s["internal"]["seconds"]["mean"] == pytest.approx(np.mean([float(r["duration_s"]) for r in ok.values()]))
  assert s["rtf"] is None  # nothing was synthesised

  with open(out / "results.json", encoding="utf-8") as f:
    assert json.load(f)["summary"] == s
  md = (out / "report.md").read_text()
  assert "## Failures" in md and "missing wav" in md and f"{s['wer']['mean']:.2f}" in md
  assert (out / "plots" / "wer_hist.png").stat().st_size > 1000
  mels = list((out / "plots").glob("mel_*.png"))
  assert len(mels) == 3 and all(f"plots/{p.name}" in md for p in mels)
  assert metalist.read_metalist(str(out / "items.lst")) == items


def test_synthesize_callback_writes_wavs_and_rescoring_matches(corpus, pocketsphinx_asr, tmp_path):
  items = metalist.read_metalist(str(corpus / "meta.lst"))[:2]
  items.append(EvalItem("boom", PROMPT_TEXT, items[0].prompt_wav, "This one fails."))

  def synthesize(item):
    if item.utt == "boom":
      raise RuntimeError("decoder diverged")
    wav, sr = sf.read(item.gt_wav, dtype="float32")
    return audio.resample(wav, sr, 24000), 24000, {"tokens": 42, "note": "ok", "array": np.zeros(3)}

  out = tmp_path / "synth"
  results = harness.evaluate(items, str(out), synthesize=synthesize, asr=pocketsphinx_asr, n_resamples=200,
                             num_mel_plots=1, progress=False)
  assert results["summary"]["counts"]["failed"] == 1
  assert results["failures"] == [{"utt": "boom", "reason": "RuntimeError: decoder diverged"}]
  assert sf.info(str(out / "wavs" / f"{items[0].utt}.wav")).samplerate == 24000
  assert not (out / "wavs" / "boom.wav").exists()
  rows = {r["utt"]: r for r in _read_details(out / "details.csv")}
  assert rows[items[0].utt]["extra_tokens"] == "42" and rows[items[0].utt]["extra_note"] == "ok"
  assert "extra_array" not in rows[items[0].utt]
  assert float(rows[items[0].utt]["rtf"]) > 0 and results["summary"]["rtf"]["n"] == 2
  # Scoring the written folder reproduces the per-utterance WERs, and comparing the two runs finds no difference.
  again = harness.evaluate(items[:2], str(tmp_path / "rescore"), wavs_dir=str(out / "wavs"), asr=pocketsphinx_asr,
                           compare_to=str(out / "results.json"), n_resamples=200, num_mel_plots=0, progress=False)
  assert [u["wer"] for u in again["utterances"]] == [u["wer"] for u in results["utterances"]]
  assert again["compare"]["wer"]["diff"] == 0.0 and again["compare"]["wer"]["p_bootstrap"] == 1.0
  assert "## Comparison" in (tmp_path / "rescore" / "report.md").read_text()


def test_asr_pool_scores_as_the_judge_in_process(corpus, pocketsphinx_asr, tmp_path):
  """evaluate with an ASRPool (transcripts from worker processes, collected at the end) writes what the in-process
  judge writes, failures included; a judge that cannot start fails each item with its reason."""
  items = metalist.read_metalist(str(corpus / "meta.lst"))
  items.append(EvalItem("missing", PROMPT_TEXT, items[0].prompt_wav, "No file for this one."))
  common = dict(wavs_dir=str(corpus / "gt"), speaker_encoder=speaker.make_speaker_encoder("mfcc"), n_resamples=200,
                num_mel_plots=0, progress=False)
  serial = harness.evaluate(items, str(tmp_path / "serial"), asr=pocketsphinx_asr, **common)
  with asr_lib.judge("pocketsphinx", workers=2) as pool:   # the CLIs' --asr_workers=2
    assert isinstance(pool, asr_lib.ASRPool) and pool.workers == 2
    pooled = harness.evaluate(items, str(tmp_path / "pooled"), asr=pool, **common)
  with pytest.raises(RuntimeError, match="shutdown"):   # left, the pool is shut down
    pool.submit(np.zeros(1600, np.float32), 16000)
  with asr_lib.judge("pocketsphinx") as one:
    assert isinstance(one, asr_lib.PocketSphinxASR)
  assert pooled["utterances"] == serial["utterances"] and pooled["failures"] == serial["failures"]
  assert pooled["summary"]["counts"] == {"items": 4, "scored": 3, "failed": 1, "sim_scored": 3, "sim_failed": 0}
  assert [r["hypothesis"] for r in _read_details(tmp_path / "pooled" / "details.csv")] == \
      [r["hypothesis"] for r in _read_details(tmp_path / "serial" / "details.csv")]
  assert pooled["meta"]["asr"] == "pocketsphinx"

  with asr_lib.ASRPool("pocketsphinx", workers=1, hmm=str(tmp_path / "no-model")) as broken:
    failed = harness.evaluate(items[:2], str(tmp_path / "broken"), asr=broken, **common)
  assert failed["summary"]["counts"]["scored"] == 0
  assert all("pocketsphinx hmm not found" in f["reason"] for f in failed["failures"])
  with pytest.raises(ValueError, match="unknown ASR 'sphinx'"):
    asr_lib.ASRPool("sphinx")


def test_ceiling_mode_with_roundtrip(corpus, pocketsphinx_asr, tmp_path, capsys):
  items = metalist.read_metalist(str(corpus / "meta.lst"))[:2]
  calls = []

  def roundtrip(wav, sr):
    calls.append(sr)
    return 0.5 * wav, sr

  ceil = harness.evaluate(items, str(tmp_path / "resynthesis"), ceiling=True, roundtrip=roundtrip,
                          asr=pocketsphinx_asr, n_resamples=200, num_mel_plots=0, progress=True)
  assert calls == [16000, 16000] and ceil["meta"]["mode"] == "ceiling"
  assert (tmp_path / "resynthesis" / "wavs" / f"{items[0].utt}.wav").exists()
  # The progress bar names the run by its folder (here a roundtrip, as the main job's resynthesis), not its mode.
  assert "eval[resynthesis]" in capsys.readouterr().err
  assert ceil["summary"]["duration_ratio"]["mean"] == pytest.approx(1.0, abs=1e-3)
  # A fake "system" result with double the ceiling's WER reports a ratio of 2.
  system = {"summary": {"wer": {"mean": 2 * ceil["summary"]["wer"]["mean"]}}}
  ratio = report.ceiling_ratio(system, ceil)
  assert ratio is None if ceil["summary"]["wer"]["mean"] == 0 else ratio == pytest.approx(2.0)
  with pytest.raises(ValueError, match="exactly one"):
    harness.evaluate(items, str(tmp_path / "x"), asr=pocketsphinx_asr)
  with pytest.raises(ValueError, match="exactly one"):
    harness.evaluate(items, str(tmp_path / "x"), wavs_dir=str(tmp_path), ceiling=True, asr=pocketsphinx_asr)


def test_cli_scores_wav_folder_and_compares(corpus, tmp_path):
  from e2etts_jax.cli import evaluate as cli  # pylint: disable=import-outside-toplevel
  out_a, out_b = tmp_path / "a", tmp_path / "b"
  args = [f"--list={corpus / 'meta.lst'}", f"--wavs={corpus / 'gt'}", "--noprogress", "--bootstrap=200",
          "--mel_plots=0", "--limit=2"]
  # The console path, in a fresh process.
  done = subprocess.run([sys.executable, "-m", "e2etts_jax.cli.evaluate", f"--out={out_a}"] + args,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "2 scored, 0 failed of 2" in done.stdout
  for name in ("results.json", "details.csv", "report.md", "plots/wer_hist.png", "items.lst"):
    assert (out_a / name).exists(), name
  # In-process main() with --compare against the first run, judged by two worker processes: same wavs, so no
  # difference.
  assert cli.main(["e2etts-eval", f"--out={out_b}", f"--compare={out_a / 'results.json'}", "--asr_workers=2"]
                  + args) == 0
  with open(out_b / "results.json", encoding="utf-8") as f:
    cmp = json.load(f)["compare"]
  assert cmp["n_common"] == 2 and cmp["wer"]["diff"] == 0.0 and cmp["wer"]["p_bootstrap"] == 1.0
  assert "## Comparison" in (out_b / "report.md").read_text()
  with pytest.raises(cli.app.UsageError, match="exactly one of --wavs, --workdir, --ceiling"):
    cli.main(["e2etts-eval", f"--out={out_b}", f"--list={corpus / 'meta.lst'}"])
  with pytest.raises(cli.app.UsageError, match="unknown arguments"):
    cli.main(["e2etts-eval", f"--out={out_b}", "stray"] + args)
  with pytest.raises(cli.app.UsageError, match="--asr_workers=0: need at least 1"):
    cli.main(["e2etts-eval", f"--out={out_b}", "--asr_workers=0"] + args)


def test_cli_workdir_uses_synthesis_module_or_says_it_is_missing(corpus, tmp_path, monkeypatch):
  from e2etts_jax.cli import evaluate as cli  # pylint: disable=import-outside-toplevel
  argv = ["e2etts-eval", f"--list={corpus / 'meta.lst'}", f"--out={tmp_path / 'o'}", f"--workdir={tmp_path}",
          "--noprogress", "--limit=1", "--mel_plots=0", "--bootstrap=100"]
  monkeypatch.delattr(e2etts_jax, "synthesis", raising=False)
  monkeypatch.setitem(sys.modules, "e2etts_jax.synthesis", None)  # as if the module did not exist
  with pytest.raises(cli.app.UsageError, match="e2etts_jax.synthesis"):
    cli.main(argv)

  class FakeSynthesizer:
    @classmethod
    def from_workdir(cls, workdir, inference=()):
      assert workdir == str(tmp_path) and inference == ["fm.ode_steps=3"]
      return cls()

    def synthesize_item(self, item):
      wav, sr = sf.read(item.gt_wav, dtype="float32")
      return wav, sr, {"steps": 3}

  monkeypatch.setitem(sys.modules, "e2etts_jax.synthesis", types.SimpleNamespace(Synthesizer=FakeSynthesizer))
  assert cli.main(argv + ["--inference=fm.ode_steps=3"]) == 0
  with open(tmp_path / "o" / "results.json", encoding="utf-8") as f:
    res = json.load(f)
  assert res["meta"]["mode"] == "synthesize" and res["summary"]["counts"]["scored"] == 1
  assert res["meta"]["inference"] == ["fm.ode_steps=3"]
  ceiling_argv = [a for a in argv if not a.startswith("--workdir")] + ["--ceiling", "--inference=fm.ode_steps=3"]
  with pytest.raises(cli.app.UsageError, match="--inference .* needs --workdir"):
    cli.main(ceiling_argv)
  assert math.isfinite(res["summary"]["rtf"]["overall"])
