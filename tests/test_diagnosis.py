"""Diagnosis: each mel variant is what it claims to be, and diagnose() scores them with the judge and reports."""
import json
import os

import jax
import numpy as np
import pytest

from e2etts_jax import audio, diagnosis, evaluation


@pytest.fixture(scope="module")
def mel(synth, utts):
  return synth.mel_of(audio.load_audio(utts[0]["audio"], 16000), 16000)


def test_each_variant_is_the_named_mel(synth, mel):
  n = (mel.shape[0] // synth.ds) * synth.ds
  rng = jax.random.key(3)
  gt = diagnosis.variant_mel(synth, mel, "ground_truth", rng)
  np.testing.assert_array_equal(gt, mel[:n])
  np.testing.assert_array_equal(diagnosis.variant_mel(synth, mel, "envelope", rng, envelope_coeffs=6),
                                audio.spectral_envelope(mel[:n], 6))
  tokens = synth.tokenize_mel(mel[:n])
  np.testing.assert_array_equal(diagnosis.variant_mel(synth, mel, "prior", rng), synth.prior_mel(tokens))
  np.testing.assert_array_equal(diagnosis.variant_mel(synth, mel, "resynthesis", rng),
                                synth.decode_tokens(tokens, rng))
  with pytest.raises(ValueError, match="unknown variant 'vocoder'"):
    diagnosis.variant_mel(synth, mel, "vocoder", rng)


def test_diagnose_scores_every_variant_against_the_ceiling(synth, workdir, tmp_path):
  out = tmp_path / "run1"
  items = evaluation.items_from_manifest(workdir["manifest"], split="test", seed=0)[:2]
  rows = diagnosis.diagnose(synth, items, str(out), asr=evaluation.make_asr("pocketsphinx"),
                            variants=["prior", "ground_truth", "envelope"], envelope_coeffs=6, n_resamples=20,
                            progress=False, meta={"split": "test"})
  assert list(rows) == ["ground_truth", "envelope", "prior"]   # the ceiling first, whatever the order asked
  assert rows["ground_truth"]["mel_mse"] == 0.0 and rows["envelope"]["mel_mse"] > 0.0
  for v in ("envelope", "prior"):
    r = rows[v]
    assert r["scored"] == 2
    per_variant = json.load(open(out / v / "results.json"))
    assert r["wer"] == per_variant["summary"]["wer"]["mean"]
    if rows["ground_truth"]["wer"]:
      assert r["wer_over_ceiling"] == pytest.approx(r["wer"] / rows["ground_truth"]["wer"])
  saved = json.load(open(out / "diagnosis.json"))
  assert saved["variants"] == rows and saved["meta"]["envelope_coeffs"] == 6 and saved["meta"]["split"] == "test"
  assert saved["meta"]["step"] == synth.meta["global_step"] and saved["meta"]["config"] == "tiny"
  # The collected table: one row for the study; each variant's WER; '-' for the variant not run.
  row = [line for line in diagnosis.collect(str(tmp_path)).splitlines() if line.startswith("| run1 |")]
  cells = [c.strip() for c in row[0].strip("|").split("|")]
  assert cells[1].startswith("tiny, ") and cells[3] == "test, 2"
  for i, v in enumerate(diagnosis.VARIANTS[:3]):
    assert cells[4 + i].startswith(f"{rows[v]['wer']:.1f}"), (v, cells)
  assert cells[7] == "-"
  table = (out / "diagnosis.md").read_text()
  assert all(f"| {v} |" in table for v in rows)
  with pytest.raises(ValueError, match="unknown variant"):
    diagnosis.diagnose(synth, items, str(tmp_path / "x"), asr=None, variants=["ceiling"])


def test_cli_names_a_bad_variant_and_a_missing_workdir(workdir, tmp_path):
  from absl import app
  from e2etts_jax.cli import diagnose as cli
  base = ["e2etts-diagnose", f"--manifest={workdir['manifest']}", f"--out={tmp_path}"]
  with pytest.raises(app.UsageError, match="unknown --variants prior2"):
    cli.main(base + [f"--workdir={workdir['run']}", "--variants=prior2"])
  with pytest.raises(app.UsageError, match="nowhere"):
    cli.main(base + [f"--workdir={tmp_path / 'nowhere'}"])
  assert not os.path.exists(tmp_path / "diagnosis.json")
  with pytest.raises(app.UsageError, match="no \\*/diagnosis.json under"):
    cli.main(["e2etts-diagnose", f"--collect={tmp_path}"])
