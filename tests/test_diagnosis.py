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


def test_recipe_names_size_and_non_default_training(tiny_config):
  c = tiny_config
  assert diagnosis.recipe(c) == f"d{c.fm.d_model} x {c.fm.num_layers} layers"
  c.fm.update(t_schedule="cosine", prior_start=True, encoder_layers=c.fm.encoder_layers + 1)
  c.rm.conv_kernel = 7
  c.train.stage1.learning_rate = 2e-3
  assert diagnosis.recipe(c) == (f"d{c.fm.d_model} x {c.fm.num_layers} layers, "
                                 f"encoder_layers={c.fm.encoder_layers}, t_schedule=cosine, prior_start=True, "
                                 f"rm.conv_kernel=7, train.stage1.learning_rate=0.002")


def _fake_study(root, name, utt_wers):
  """A study folder as `diagnose` leaves it: diagnosis.json and resynthesis/results.json ({utt: WER fraction})."""
  os.makedirs(root / name / "resynthesis")
  mean = 100 * float(np.mean(list(utt_wers.values())))
  row = {"wer": mean, "ci_low": mean, "ci_high": mean, "wer_over_ceiling": None, "mel_mse": 1.0,
         "scored": len(utt_wers)}
  json.dump({"variants": {"resynthesis": row}, "meta": {"items": len(utt_wers), "config": "tiny"}},
            open(root / name / "diagnosis.json", "w"))
  json.dump({"utterances": [{"utt": u, "wer": w} for u, w in utt_wers.items()]},
            open(root / name / "resynthesis" / "results.json", "w"))


def test_collect_pairs_each_study_with_the_baseline(tmp_path):
  rng = np.random.default_rng(0)
  base = {f"u{i}": float(w) for i, w in enumerate(rng.uniform(0.5, 1.0, 30))}
  better = {u: w - 0.2 for u, w in base.items()}          # 20 points lower on every sentence
  _fake_study(tmp_path, "a_base", base)
  _fake_study(tmp_path, "b_better", better)
  _fake_study(tmp_path, "c_other", {"x1": 0.3, "x2": 0.4})  # other sentences: nothing to pair
  table = diagnosis.collect(str(tmp_path), baseline="a_base", n_resamples=200)
  rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
  assert "resynthesis WER - a_base's" in table.splitlines()[0]
  last = lambda name: rows[name].strip().strip("|").split("|")[-1].strip()
  assert last("b_better") == "-20.0 [-20.0, -20.0], p 0.000 (30)"
  assert last("a_base") == "-" and last("c_other") == "-"
  # Without a baseline the table has no such column; an unknown baseline is named.
  assert "a_base's" not in diagnosis.collect(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="'nope'"):
    diagnosis.collect(str(tmp_path), baseline="nope")
  # The CLI: the same table into --md; a bad baseline is a usage error.
  from absl import app
  from e2etts_jax.cli import diagnose as cli
  md = tmp_path / "table.md"
  assert cli.main(["e2etts-diagnose", f"--collect={tmp_path}", "--baseline=a_base", "--bootstrap=200",
                   f"--md={md}"]) == 0
  assert md.read_text() == table
  with pytest.raises(app.UsageError, match="'nope'"):
    cli.main(["e2etts-diagnose", f"--collect={tmp_path}", "--baseline=nope"])


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
