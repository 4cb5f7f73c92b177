"""Diagnosis: each mel variant is what it claims to be, and diagnose() scores them with the judge and reports."""
import copy
import csv
import json
import os

import jax
import numpy as np
import pytest

from e2etts_jax import audio, config_lib, diagnosis, evaluation


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
  assert saved["meta"]["train_seed"] == synth.config.seed
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


def test_tts_variant_is_the_whole_system_against_the_same_ceiling(synth, workdir, tmp_path):
  items = evaluation.items_from_manifest(workdir["manifest"], split="test", seed=0)[:1]
  asr = evaluation.make_asr("pocketsphinx")
  rows = diagnosis.diagnose(synth, items, str(tmp_path / "d"), asr=asr, variants=["tts", "ground_truth"],
                            n_resamples=20, progress=False)
  assert list(rows) == ["ground_truth", "tts"] and rows["tts"]["scored"] == 1 and rows["tts"]["mel_mse"] is None
  evaluation.evaluate(items, str(tmp_path / "direct"), synthesize=synth.synthesize_item, asr=asr, n_resamples=20,
                      progress=False)
  fields = lambda run: [(r["duration_s"], r["hypothesis"], r["extra_tokens"])
                        for r in csv.DictReader(open(tmp_path / run / "details.csv"))]
  assert fields("d/tts") == fields("direct")   # the system's own synthesis of the item's text and prompt
  got = json.load(open(tmp_path / "d" / "tts" / "results.json"))
  assert got["ceiling"]["wer"]["mean"] == rows["ground_truth"]["wer"]


def test_recipe_names_size_and_non_default_training(tiny_config):
  c = tiny_config
  assert diagnosis.recipe(c) == f"d{c.fm.d_model} x {c.fm.num_layers} layers"
  c.fm.update(t_schedule="cosine", prior_start=True, encoder_layers=c.fm.encoder_layers + 1)
  c.rm.conv_kernel = 7
  c.train.stage1.learning_rate = 2e-3
  assert diagnosis.recipe(c) == (f"d{c.fm.d_model} x {c.fm.num_layers} layers, "
                                 f"encoder_layers={c.fm.encoder_layers}, t_schedule=cosine, prior_start=True, "
                                 f"rm.conv_kernel=7, train.stage1.learning_rate=0.002")
  # The LLM's keys are named against the size's own defaults (tiny's LLM is d32: not named until changed).
  c.llm.d_model = 48
  c.train.stage2.trainable = "llm"
  c.llm.dropout = 0.1
  c.text.update(frontend="phones", model_type="word")
  assert diagnosis.recipe(c).endswith("train.stage1.learning_rate=0.002, llm.d_model=48, text.frontend=phones, "
                                      "text.model_type=word, train.stage2.trainable=llm, llm.dropout=0.1")


def test_recipe_tells_cascade_and_ablation_arms_from_e2e(tiny_config):
  # One config trained three ways: the recipe (and so collect's grouping) must differ even at equal steps.
  size = f"d{tiny_config.fm.d_model} x {tiny_config.fm.num_layers} layers"
  cascade = config_lib.make_cascaded(copy.deepcopy(tiny_config))
  assert diagnosis.recipe(cascade) == f"{size}, train.mode=cascaded, train.stage1.trainable=tokenizer,rm"
  detached = copy.deepcopy(tiny_config)
  detached.train.stage1.token_grads = "rm,rm_spk"
  assert diagnosis.recipe(detached) == f"{size}, train.stage1.token_grads=rm,rm_spk"
  muon = copy.deepcopy(tiny_config)
  muon.train.optimizer = "muon"
  assert diagnosis.recipe(muon) == f"{size}, train.optimizer=muon"
  assert diagnosis.recipe(tiny_config) == size


def _fake_study(root, name, utt_wers, *, seed=None, recipe=None, prior=None, config_seed=None, tts=None):
  """A study folder as `diagnose` leaves it: diagnosis.json and resynthesis/results.json ({utt: WER fraction});
  `prior` and `tts` add those variants the same way; `config_seed` writes the run's config.json instead of meta's
  seed."""
  meta = {"items": len(utt_wers), "config": "tiny"}
  meta.update({} if seed is None else {"train_seed": seed}, **({} if recipe is None else {"recipe": recipe}))
  variants = {}
  for variant, wers in (("resynthesis", utt_wers), ("prior", prior), ("tts", tts)):
    if wers is None:
      continue
    os.makedirs(root / name / variant)
    mean = 100 * float(np.mean(list(wers.values())))
    variants[variant] = {"wer": mean, "ci_low": mean, "ci_high": mean, "wer_over_ceiling": mean / 20,
                         "mel_mse": 1.0, "scored": len(wers)}
    json.dump({"utterances": [{"utt": u, "wer": w} for u, w in wers.items()]},
              open(root / name / variant / "results.json", "w"))
  json.dump({"variants": variants, "meta": meta}, open(root / name / "diagnosis.json", "w"))
  if config_seed is not None:
    json.dump({"seed": config_seed}, open(root / name / "config.json", "w"))


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


def test_collect_seeds_pairs_recipes_over_training_seeds(tmp_path):
  from scipy import stats as sstats
  from e2etts_jax.evaluation import stats
  rng = np.random.default_rng(1)
  gains = {0: 0.10, 1: 0.25, 2: 0.05}   # how much the new recipe lowers each sentence's WER, per training seed
  base, new = {}, {}
  for s, gain in gains.items():
    base[s] = {f"u{i}": float(w) for i, w in enumerate(rng.uniform(0.4, 1.0, 12))}
    new[s] = {u: w - gain for u, w in base[s].items()}
    prior = {u: w / 2 for u, w in base[s].items()}   # the prior: the same for both recipes
    # Seed 0 of the baseline was diagnosed before 'train_seed' was saved: its seed comes from config.json.
    _fake_study(tmp_path, f"base-s{s}", base[s], prior=prior, recipe="r0", **(
        {"config_seed": 0} if s == 0 else {"seed": s}))
    _fake_study(tmp_path, f"new-s{s}", new[s], prior=prior, recipe="r1", seed=s)
  _fake_study(tmp_path, "new-s1-again", {"u0": 0.0}, recipe="r1", seed=1)   # a seed twice: the first counts
  _fake_study(tmp_path, "lone", base[0], recipe="r2", seed=0)              # one seed: not a row
  table = diagnosis.collect_seeds(str(tmp_path), baseline="base-s1", n_resamples=300)
  lines = table.splitlines()
  assert len(lines) == 4 and "resynthesis - base-s1's seeds" in lines[0] and "tts" not in lines[0]   # not run
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
  assert set(rows) == {"tiny, r0", "tiny, r1"}
  mean = lambda group: [100 * np.mean(list(group[s].values())) for s in sorted(group)]
  r0, r1 = rows["tiny, r0"], rows["tiny, r1"]
  assert r0[3] == "0, 1, 2" and r1[3] == "0, 1, 2"
  assert r1[5] == f"{np.mean(mean(new)):.1f} ± {np.std(mean(new), ddof=1):.1f} ({np.mean(mean(new)) / 20:.2f})"
  # Against the baseline's seeds: the seed means' difference, a t-test over seeds and the pooled sentences.
  pooled = lambda group: [100 * w for s in sorted(group) for _, w in sorted(group[s].items())]
  boot = stats.paired_bootstrap(pooled(new), pooled(base), n_resamples=300)
  p = sstats.ttest_rel(mean(new), mean(base)).pvalue
  assert r1[7] == (f"{-100 * np.mean(list(gains.values())):+.1f}, t-test p {p:.3f}; sentences {boot['diff']:+.1f} "
                   f"[{boot['ci_low']:+.1f}, {boot['ci_high']:+.1f}], p {boot['p_value']:.3f} (3 seeds)")
  assert r1[6] == "+0.0, t-test p -; sentences +0.0 [+0.0, +0.0], p 1.000 (3 seeds)"   # equal priors
  assert r0[6] == r0[7] == "-"   # the baseline's own group
  # Without a baseline no paired columns; nothing repeated, nothing to show; the CLI appends the table.
  assert diagnosis.collect_seeds(str(tmp_path)).splitlines()[0] == lines[0].split(" prior - ")[0]
  from e2etts_jax.cli import diagnose as cli
  md = tmp_path / "table.md"
  assert cli.main(["e2etts-diagnose", f"--collect={tmp_path}", "--baseline=base-s1", "--bootstrap=300",
                   f"--md={md}"]) == 0
  assert md.read_text().endswith("\nRecipes run with several training seeds:\n\n" + table)
  # A seed folder without its per-sentence results: the t-test keeps 3 seeds, the pooled sentences say they are 2.
  os.remove(tmp_path / "new-s2" / "resynthesis" / "results.json")
  part = diagnosis.collect_seeds(str(tmp_path), baseline="base-s1", n_resamples=300)
  cell = {line.split("|")[1].strip(): line.strip("|").split("|")[7].strip() for line in part.splitlines()[2:]}
  two = {s: new[s] for s in (0, 1)}
  boot2 = stats.paired_bootstrap(pooled(two), pooled({s: base[s] for s in (0, 1)}), n_resamples=300)
  assert cell["tiny, r1"] == (f"{-100 * np.mean(list(gains.values())):+.1f}, t-test p {p:.3f}; sentences "
                              f"{boot2['diff']:+.1f} [{boot2['ci_low']:+.1f}, {boot2['ci_high']:+.1f}], "
                              f"p {boot2['p_value']:.3f} over 2 of them (3 seeds)")
  solo = tmp_path / "solo"
  solo.mkdir()
  _fake_study(solo, "only", base[0], seed=0)
  assert diagnosis.collect_seeds(str(solo)) == ""
  # A variant some seeds of a group ran: its mean over those, and how many they are.
  some = tmp_path / "some"
  some.mkdir()
  for s in range(3):
    _fake_study(some, f"s{s}", base[s], seed=s, tts={"u0": 0.9} if s == 2 else None)
  lines = diagnosis.collect_seeds(str(some)).splitlines()
  assert "tts WER mean ± std (/ ceiling)" in lines[0]
  assert lines[2].strip("|").split("|")[5].strip() == "90.0 (4.50), 1 of 3 seeds"   # no prior: 6th cell


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


def test_cli_judges_in_worker_processes_as_in_process(workdir, tmp_path):
  from absl import app
  from e2etts_jax.cli import diagnose as cli
  args = [f"--workdir={workdir['run']}", f"--manifest={workdir['manifest']}", "--items=2",
          "--variants=ground_truth", "--bootstrap=20", "--noprogress"]
  assert cli.main(["e2etts-diagnose", f"--out={tmp_path / 'here'}"] + args) == 0
  assert cli.main(["e2etts-diagnose", f"--out={tmp_path / 'pool'}", "--asr_workers=2"] + args) == 0
  read = lambda run: json.load(open(tmp_path / run / "diagnosis.json"))["variants"]
  assert read("pool") == read("here") and read("here")["ground_truth"]["scored"] == 2
  rows = lambda run: [(r["utt"], r["hypothesis"], r["wer"])
                      for r in csv.DictReader(open(tmp_path / run / "ground_truth" / "details.csv"))]
  assert len(rows("pool")) == 2 and rows("pool") == rows("here")
  with pytest.raises(app.UsageError, match="--asr_workers=0: need at least 1"):
    cli.main(["e2etts-diagnose", f"--out={tmp_path / 'x'}", "--asr_workers=0"] + args)
