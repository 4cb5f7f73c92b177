"""The ablation runner: variant configs, resumable runs, results.json content and the rendered claims table."""
import json
import os

import jax
import numpy as np
import pytest
from scipy import stats as sstats

from e2etts_jax import ablate, config_lib, flops, provenance, trainer
from e2etts_jax.system import DataInfo


def test_variant_configs_change_only_what_they_name():
  base = config_lib.get_config("small")
  e2e = ablate.variant_config(base, "e2e", 3)
  assert e2e.seed == 3 and e2e.data.shuffle_seed == 3
  e2e.seed = e2e.data.shuffle_seed = base.seed
  assert e2e.to_dict() == base.to_dict()
  rec = ablate.variant_config(base, "recognition_tokenizer", 0)
  assert config_lib.parse_list(rec.train.stage1.trainable) == ("tokenizer", "rm")
  w = rec.train.stage1.weights
  assert (w.rm, w.llm, w.fm, w.usage) == (1.0, 0.0, 0.0, base.train.stage1.weights.usage)
  # Stages 2 and 3 are those of e2e: only the tokenizer's objective differs.
  for s in ("stage2", "stage3"):
    assert rec.train[s].to_dict() == base.train[s].to_dict()
  cas = ablate.variant_config(base, "cascaded", 0)
  assert cas.train.mode == "cascaded" and cas.train.stage3.steps == 0
  assert ablate.variant_config(base, "no_usage", 0).train.stage1.weights.usage == 0.0
  detached = ablate.variant_config(base, "detached_tokens", 0)
  assert detached.train.stage1.token_grads == "rm,rm_spk" and base.train.stage1.token_grads == "llm,rm,rm_spk,fm"
  detached.train.stage1.token_grads = base.train.stage1.token_grads
  assert detached.to_dict() == base.to_dict()
  no_prior = ablate.variant_config(base, "no_prior", 0)
  assert (no_prior.fm.encoder_layers, no_prior.fm.prior_weight) == (0, 0.0) and base.fm.prior_weight > 0
  no_prior.fm.encoder_layers, no_prior.fm.prior_weight = base.fm.encoder_layers, base.fm.prior_weight
  assert no_prior.to_dict() == base.to_dict()
  assert base.train.stage1.weights.usage > 0   # the copies never touch the original
  # Equal compute: the cascade of the same config, stage 2 lengthened until the analytic training FLOPs match
  # e2e's to within one stage-2 step.
  equal = ablate.variant_config(base, "cascaded_equal_flops", 0)
  info = DataInfo.for_config(base)
  step2 = flops.step_flops(equal, info, base.data.batch_size, base.data.max_frames, "stage2")
  assert abs(flops.train_flops(equal, info) - flops.train_flops(base, info)) <= step2 / 2
  assert equal.train.stage2.steps > cas.train.stage2.steps   # a cascade's stage-1 step is cheaper than e2e's
  equal.train.stage2.steps = cas.train.stage2.steps
  assert equal.to_dict() == cas.to_dict()
  # The same for the recognition-only tokenizer: only its stage 2 grows, to e2e's FLOPs.
  rec_equal = ablate.variant_config(base, "recognition_tokenizer_equal_flops", 0)
  rec_step2 = flops.step_flops(rec_equal, info, base.data.batch_size, base.data.max_frames, "stage2")
  assert abs(flops.train_flops(rec_equal, info) - flops.train_flops(base, info)) <= rec_step2 / 2
  assert rec_equal.train.stage2.steps > rec.train.stage2.steps
  rec_equal.train.stage2.steps = rec.train.stage2.steps
  assert rec_equal.to_dict() == rec.to_dict()
  for v in ablate.VARIANTS:
    config_lib.validate(ablate.variant_config(base, v, 0), 1)
  with pytest.raises(ValueError, match="unknown variant 'e2f'"):
    ablate.variant_config(base, "e2f", 0)


def _components(wer):
  """WER components (in %) adding up to `wer`, as the eval harness summarises them."""
  return {"substitutions": 0.5 * wer, "deletions": 0.3 * wer, "insertions": 0.2 * wer}


def _missed(wer, utts):
  """Per-utterance words missed (in %) around the `_components(wer)` substitutions + deletions: 0.8 x wer - 1, ...
  in steps of 1 (their mean, for three sentences)."""
  return {u: 0.8 * wer + i - (len(utts) - 1) / 2 for i, u in enumerate(utts)}


def _eval_folder(run_dir, system, wer, utts, missed=None):
  """An eval folder as the harness leaves it: results.json (per-sentence WER) and details.csv (per-sentence counts
  of 1000 reference words, `missed` of them in %, plus a failed sentence that must be left out)."""
  d = os.path.join(run_dir, "eval", system)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "results.json"), "w") as f:
    json.dump({"summary": {"wer_components": _components(wer)},
               "utterances": [{"utt": u, "wer": wer / 100.0 + 0.01 * i} for i, u in enumerate(utts)]}, f)
  missed = _missed(wer, utts) if missed is None else missed
  lines = ["utt,status,substitutions,deletions,insertions,ref_len"]
  lines += [f"{u},ok,{round(10 * m) // 2},{round(10 * m) - round(10 * m) // 2},7,1000" for u, m in missed.items()]
  lines.append("broken,failed,,,,")
  with open(os.path.join(d, "details.csv"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _summary(workdir, tts, resyn, ceiling, utts, steps=None):
  """A main-job summary plus the eval folders' per-utterance results, as main_job.run leaves them."""
  for system, wer in (("tts", tts), ("resynthesis", resyn), ("ceiling", ceiling)):
    _eval_folder(workdir, system, wer, utts)
  ev = lambda w: {"wer": w, "wer_ci": [w - 1, w + 1], "sim": 0.5, "rtf": 0.4, "scored": len(utts), "failed": 0}
  return {"config_name": "tiny", "mode": "e2e", "steps": steps or {"stage1": 4, "stage2": 2, "stage3": 2},
          "eval": {"tts": ev(tts), "resynthesis": ev(resyn), "ceiling": ev(ceiling)},
          "final_losses": {"stage1": {"codes/perplexity": 7.0}}, "eval_items": len(utts),
          "phases": {"train": 60.0}, "total_seconds": 90.0, "resynthesis_mel_mse": resyn / 10.0,
          "resynthesis_mel_mse_per_utterance": {u: resyn / 10.0 + 0.1 * i for i, u in enumerate(utts)},
          "speaker_ranking": {"speakers": 4, "tts": {"top1": 0.75, "n": 4}, "resynthesis": {"top1": 1.0, "n": 4}}}


def test_run_study_skips_finished_runs_and_writes_results(tmp_path, monkeypatch):
  from e2etts_jax import main_job
  calls, given = [], []
  wers = {"e2e": 40.0, "cascaded": 60.0, "cascaded_equal_flops": 50.0}

  def fake_run(config, workdir, **kw):
    calls.append((config.train.mode, config.seed, kw["eval_seed"], os.path.basename(os.path.dirname(workdir))))
    given.append(kw["overrides"])
    variant = os.path.basename(os.path.dirname(workdir))
    summary = _summary(workdir, wers[variant] + config.seed, 30.0, 20.0, ["a", "b", "c"])
    if variant == "e2e":   # its training over every resume; a summary without it has only the train phase's 60 s
      summary["train_seconds"] = 600.0 + config.seed
    return {**summary, **main_job.budget_of(config)}   # as the real run records its budget

  monkeypatch.setattr(main_job, "run", fake_run)
  c = config_lib.get_config("tiny")
  overrides = {"train.stage2.steps": 1, "fm.ode_steps": 4}   # as the command line gave them (applied already)
  paths = ablate.run_study(c, str(tmp_path), ["e2e", "cascaded"], [0, 1], corpus_dir="x", num_utterances=10,
                           eval_items=3, progress=False, overrides=overrides)
  assert [(m, s, e, v) for m, s, e, v in calls] == [("e2e", 0, 0, "e2e"), ("cascaded", 0, 0, "cascaded"),
                                                  ("e2e", 1, 1, "e2e"), ("cascaded", 1, 1, "cascaded")]
  r = json.load(open(paths[2]))
  assert (r["variant"], r["seed"]) == ("e2e", 1)
  assert given == [overrides] * 4   # each run's summary records them
  assert r["overrides"] == ["fm.ode_steps=4", "train.stage2.steps=1"]
  assert r["train_seconds"] == 601.0
  np.testing.assert_allclose(r["ratio"]["tts"], 41.0 / 20.0)
  np.testing.assert_allclose(r["ratio"]["resynthesis"], 1.5)
  assert r["per_utterance_wer"]["tts"] == {"a": 0.41, "b": 0.42, "c": 0.43}
  assert r["wer_components"] == {"tts": _components(41.0), "resynthesis": _components(30.0),
                                 "ceiling": _components(20.0)}
  assert r["per_utterance_missed"]["tts"] == pytest.approx({"a": 31.8, "b": 32.8, "c": 33.8})
  assert r["per_utterance_missed"]["resynthesis"] == pytest.approx({"a": 23.0, "b": 24.0, "c": 25.0})
  assert r["mel_mse"] == 3.0 and r["per_utterance_mel_mse"] == {"a": 3.0, "b": 3.1, "c": 3.2}
  assert r["speaker_first"] == {"tts": 0.75, "resynthesis": 1.0}
  assert r["stage_batch_sizes"] == {s: c.data.batch_size for s in config_lib.STAGES}
  assert r["versions"]["numpy"] == np.__version__ and r["versions"]["jax"] == jax.__version__
  assert set(provenance.VERSIONED) < set(r["versions"])
  assert c.data.shards == os.path.join(str(tmp_path), "shards")   # shared by every run
  info = DataInfo.for_config(c)
  assert r["study_steps"] == sum(c.train[s].steps for s in config_lib.STAGES)
  assert r["train_flops"] == pytest.approx(flops.train_flops(c, info))
  # A variant that takes more steps than the study still records the study's budget, so it pairs with the
  # others; its FLOPs are those of the config it trained.
  ablate.run_study(c, str(tmp_path), ["cascaded_equal_flops"], [0], corpus_dir="x", num_utterances=10,
                   eval_items=3, progress=False)
  eq = json.load(open(tmp_path / "cascaded_equal_flops" / "seed0" / "results.json"))
  equal = ablate.variant_config(c, "cascaded_equal_flops", 0)
  assert sum(eq["steps"].values()) > r["study_steps"] == eq["study_steps"]
  assert eq["train_seconds"] == 60.0
  assert eq["train_flops"] == pytest.approx(flops.train_flops(equal, info))
  rows = ablate.load_results([str(tmp_path)])
  assert len(rows) == 5
  assert ablate.compare(rows, "e2e", "cascaded_equal_flops", "tts")["n_seeds"] == 1
  # A second call finds every results.json and trains nothing.
  ablate.run_study(c, str(tmp_path), ["e2e", "cascaded", "cascaded_equal_flops"], [0], corpus_dir="x",
                   num_utterances=10, eval_items=3, progress=False)
  assert len(calls) == 5
  # A run the main job refuses to resume (begun under another config) is named; the others go on and are counted.
  def refusing(config, workdir, **kw):
    if "cascaded" in workdir:
      raise trainer.ResumeError(f"{workdir} was trained to step 3 under another config")
    return fake_run(config, workdir, **kw)

  monkeypatch.setattr(main_job, "run", refusing)
  with pytest.raises(trainer.ResumeError, match=rf"1 of 2 runs refused, .*: {tmp_path}/cascaded/seed2\. "):
    ablate.run_study(c, str(tmp_path), ["cascaded", "e2e"], [2], corpus_dir="x", num_utterances=10,
                     eval_items=3, progress=False)
  assert os.path.exists(tmp_path / "e2e" / "seed2" / "results.json")
  assert not os.path.exists(tmp_path / "cascaded" / "seed2" / "results.json")


def test_stage_column_names_a_batch_only_where_a_stage_has_its_own():
  row = {"steps": {"stage1": 1900, "stage2": 150, "stage3": 75}, "batch_size": 4}
  assert ablate._stages(row) == "1900/150/75"   # saved before per-stage batches
  assert ablate._stages({**row, "stage_batch_sizes": {"stage1": 4, "stage2": 4, "stage3": 4}}) == "1900/150/75"
  assert (ablate._stages({**row, "stage_batch_sizes": {"stage1": 4, "stage2": 4, "stage3": 8}})
          == "1900/150/75 x 4/4/8")


def _row(variant, seed, tts, utt_wers, utt_mel=None, utt_missed=True):
  # cascaded spends stage 3's steps in stage 2: the same total budget, so the runs still pair up.
  steps = {"stage1": 2, "stage2": 2, "stage3": 0} if variant == "cascaded" else {"stage1": 2, "stage2": 1, "stage3": 1}
  return {"variant": variant, "seed": seed, "config": "small", "steps": steps,
          "batch_size": 8, "machine": "CPU", "ratio": {"tts": tts, "resynthesis": None},
          "wer": {"ceiling": 20.0}, "per_utterance_wer": {"tts": dict(zip("abc", utt_wers))},
          "mel_mse": 2.0 * tts, "speaker_first": {"tts": 1.0 - tts / 10.0},
          "wer_components": {"resynthesis": _components(40.0 * tts), "tts": _components(30.0 * tts)},
          **({} if utt_mel is None else {"per_utterance_mel_mse": dict(zip("abc", utt_mel))}),
          **({"per_utterance_missed": {"resynthesis": _missed(40.0 * tts, "abc")}} if utt_missed else {})}


def test_claims_table_matches_scipy_and_reads_only_study_results(tmp_path):
  a = [1.2, 1.5, 1.1]
  b = [1.9, 2.4, 1.7]
  mel_a = [[1.0, 2.0, 1.5], [1.1, 2.1, 1.4], [0.9, 1.8, 1.6]]
  mel_b = [[1.5, 2.5, 1.5], [2.0, 2.2, 1.9], [1.2, 2.4, 2.0]]
  rows = [_row("e2e", s, a[s], [0.1, 0.2, 0.3], mel_a[s]) for s in range(3)]
  # The third cascaded run was saved before per-utterance mel errors: its seed's sentences drop out of that
  # bootstrap (and only of that one).
  rows += [_row("cascaded", s, b[s], [0.3, 0.2, 0.6], mel_b[s] if s < 2 else None, utt_missed=s < 2)
           for s in range(3)]
  for r in rows:
    d = tmp_path / r["variant"] / f"seed{r['seed']}"
    (d / "eval" / "tts").mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(r))
    (d / "eval" / "tts" / "results.json").write_text(json.dumps({"summary": {}, "utterances": []}))
  # Another study at the same config and budget (other code, say): its runs are listed but never paired with these.
  for s in range(3):
    d = tmp_path / "other" / "e2e" / f"seed{s}"
    d.mkdir(parents=True)
    row = _row("e2e", s, 9.0, [0.9, 0.9, 0.9])
    del row["speaker_first"]   # saved before the field existed
    (d / "results.json").write_text(json.dumps(row))
  # A results.json without speaker_first (written before the field) takes it from the run's summary.json.
  (tmp_path / "other" / "e2e" / "seed0" / "summary.json").write_text(json.dumps(
      {"speaker_ranking": {"speakers": 4, "tts": {"top1": 0.85, "n": 20}}}))
  # ... and without train_flops, the flops of the run's config.json.
  tiny = config_lib.get_config("tiny")
  (tmp_path / "other" / "e2e" / "seed0" / "config.json").write_text(json.dumps(tiny.to_dict()))
  loaded = ablate.load_results([str(tmp_path)])
  assert len(loaded) == 9   # the eval folders' own results.json are not runs
  other0 = next(r for r in loaded if r["study"] == "other" and r["seed"] == 0)
  assert other0["train_flops"] == pytest.approx(flops.train_flops(tiny, DataInfo.for_config(tiny)))
  assert {r["study"] for r in loaded} == {tmp_path.name, "other"}
  c = ablate.compare(loaded, "e2e", "cascaded", "tts")
  assert c["n_seeds"] == 3 and c["n_utterances"] == 9
  np.testing.assert_allclose([c["mean_a"], c["std_a"]], [np.mean(a), np.std(a, ddof=1)])
  np.testing.assert_allclose(c["t_test_p"], sstats.ttest_rel(a, b).pvalue)
  np.testing.assert_allclose(c["utt_diff"], 100 * np.mean(np.array([0.1, 0.2, 0.3]) - [0.3, 0.2, 0.6]))
  # The mel-error metric pairs the same seeds; its bootstrap pairs the sentences of the seeds both saved.
  m = ablate.compare(loaded, "e2e", "cascaded", ablate.MEL_MSE)
  np.testing.assert_allclose([m["mean_a"], m["mean_b"]], [2 * np.mean(a), 2 * np.mean(b)])
  np.testing.assert_allclose(m["t_test_p"], sstats.ttest_rel(a, b).pvalue)
  assert m["n_seeds"] == 3 and m["n_utterances"] == 6
  np.testing.assert_allclose(m["utt_diff"], np.mean(np.subtract(mel_a[:2], mel_b[:2])))
  # The speaker metric: the share of TTS outputs whose prompt speaker is not ranked first, paired the same way.
  spk = ablate.compare(loaded, "e2e", "cascaded", ablate.SPEAKER_MISS)
  np.testing.assert_allclose([spk["mean_a"], spk["mean_b"]], [np.mean(a) / 10, np.mean(b) / 10])
  np.testing.assert_allclose(spk["t_test_p"], sstats.ttest_rel(a, b).pvalue)
  assert spk["utt_diff"] is None
  # Words the judge missed (substitutions + deletions: the WER without insertions), seeds paired; the bootstrap
  # pairs the sentences of the seeds both saved per-utterance counts for.
  missed = ablate.compare(loaded, "e2e", "cascaded", "resynthesis" + ablate.MISSED)
  np.testing.assert_allclose([missed["mean_a"], missed["mean_b"]], [32 * np.mean(a), 32 * np.mean(b)])
  np.testing.assert_allclose(missed["t_test_p"], sstats.ttest_rel(a, b).pvalue)
  assert missed["n_seeds"] == 3 and (missed["utt_seeds"], missed["n_utterances"]) == (2, 6)
  np.testing.assert_allclose(missed["utt_diff"], 32 * np.mean(np.subtract(a[:2], b[:2])))
  assert (c["utt_seeds"], spk["utt_seeds"], m["utt_seeds"]) == (3, 0, 2)
  tts_missed = ablate.compare(loaded, "e2e", "cascaded", "tts" + ablate.MISSED)   # any system's, by its name
  np.testing.assert_allclose([tts_missed["mean_a"], tts_missed["mean_b"]], [24 * np.mean(a), 24 * np.mean(b)])
  assert tts_missed["utt_diff"] is None   # no per-utterance counts saved for tts here
  md = ablate.write_report([str(tmp_path)], str(tmp_path / "docs" / "results.md"))
  assert md == (tmp_path / "docs" / "results.md").read_text()
  assert f"| {tmp_path.name} | small | 4 x 8 | 2/2/0 | cascaded | 0 | CPU | 1.90 | - | 20.0 | 3.800 |" in md
  assert (f"| other | small | 4 x 8 | 2/1/1 | e2e | 0 | CPU | 9.00 | - | 20.0 | 18.000 | - | 85 | "
          f"{other0['train_flops'] / 1e12:.1f} |") in md
  assert "| other | small | 4 x 8 | 2/1/1 | e2e | 1 | CPU | 9.00 | - | 20.0 | 18.000 | - | - | - |" in md
  assert f"| {tmp_path.name} | small | 4 x 8 | 2/1/1 | e2e | 1 | CPU | 1.50 | - | 20.0 | 3.000 | - | 85 |" in md
  p = sstats.ttest_rel(a, b).pvalue
  assert p < 0.05 and f"e2e lower (p = {p:.3f})" in md
  mel_line = next(line for line in md.splitlines() if line.startswith("| e2e vs cascaded: mel_mse"))
  assert f"| {m['utt_diff']:+.2f} ({m['utt_p']:.3f}), 2 of 3 seeds |" in mel_line
  missed_line = next(line for line in md.splitlines() if line.startswith("| e2e vs cascaded: resynthesis_missed"))
  assert f"| {missed['utt_diff']:+.1f} ({missed['utt_p']:.3f}), 2 of 3 seeds |" in missed_line
  tts_line = next(line for line in md.splitlines() if line.startswith("| e2e vs cascaded: tts"))
  assert f"| {c['utt_diff']:+.1f} ({c['utt_p']:.3f}) |" in tts_line   # every seed in it: no count
  # With two seeds the verdict says so instead of testing.
  two = [r for r in loaded if r["seed"] < 2 and r["study"] != "other"]
  assert "too few seeds (2 < 3)" in ablate.results_markdown(two)
  with pytest.raises(FileNotFoundError, match="no ablation results.json"):
    ablate.write_report([str(tmp_path / "nothing")], str(tmp_path / "x.md"))


def test_backfill_adds_wer_components_and_mel_errors_whose_mean_comes_back_and_names_the_rest(workdir, tmp_path,
                                                                                             capsys):
  """(The per-utterance words missed come in with the WER components: one field filled in per run.)"""
  import shutil
  from e2etts_jax import main_job, synthesis
  from e2etts_jax.cli import ablate as ablate_cli
  study = tmp_path / "study"
  runs = {seed: study / "e2e" / f"seed{seed}" for seed in (1, 2)}
  for run in runs.values():
    shutil.copytree(workdir["run"], run)
    main_job.eval_manifest(workdir["manifest"], str(run / "eval" / "manifest.jsonl"), 3.5)
  # Seed 1 was scored on resynthesis only; seed 2 has no eval results at all.
  _eval_folder(str(runs[1]), "resynthesis", 90.0, ["x", "y", "z"])
  # What main_job.run would have saved for seed 1: the mean over its scored sentences.
  synth = synthesis.Synthesizer.from_workdir(str(runs[1]))
  items = main_job.eval_items_of(str(runs[1] / "eval" / "manifest.jsonl"), 1, 3)
  want = main_job.resynthesis_mel_errors(synth, items, 1)
  assert len(want) == 3 and len(set(want.values())) == 3
  saved = {seed: {"variant": "e2e", "seed": seed, "eval_items": 3, "ratio": {}, "speaker_first": {},
                  "mel_mse": float(np.mean(list(want.values())))} for seed in runs}
  saved[2]["mel_mse"] *= 1.1   # seed 2's saved mean is not what its checkpoint gives
  for seed, run in runs.items():
    (run / "results.json").write_text(json.dumps(saved[seed]))
  ablate_cli._backfill(ablate, str(study))
  out = capsys.readouterr().out
  assert "backfill: 2 fields filled in, 2 failed" in out
  assert f"{runs[2] / 'results.json'}: recomputed resynthesis mel errors average" in out
  assert "not the run that was scored" in out
  assert f"{runs[2] / 'results.json'}: no eval/<system>/results.json beside it" in out
  got = json.loads((runs[1] / "results.json").read_text())
  assert got.pop("per_utterance_mel_mse") == pytest.approx(want, rel=1e-5)
  assert got.pop("wer_components") == {"resynthesis": _components(90.0)}
  assert got.pop("per_utterance_missed") == {"resynthesis": pytest.approx(_missed(90.0, "xyz"))} and got == saved[1]
  assert json.loads((runs[2] / "results.json").read_text()) == saved[2]   # refused: untouched
  assert ablate.add_mel_errors(str(runs[1] / "results.json")) is None     # has them: nothing to do
  assert ablate.add_wer_components(str(runs[1] / "results.json")) is False
  os.remove(runs[2] / "eval" / "manifest.jsonl")
  with pytest.raises(FileNotFoundError, match="no eval manifest"):
    ablate.add_mel_errors(str(runs[2] / "results.json"))


def test_add_wer_components_fills_per_utterance_missed_only_from_the_eval_that_was_scored(tmp_path):
  run = tmp_path / "e2e" / "seed0"
  _eval_folder(str(run), "resynthesis", 50.0, list("abc"))
  # Saved with the components but before the per-utterance counts: only those are added.
  saved = {"variant": "e2e", "seed": 0, "wer_components": {"resynthesis": _components(50.0)}}
  (run / "results.json").write_text(json.dumps(saved))
  assert ablate.add_wer_components(str(run / "results.json")) is True
  got = json.loads((run / "results.json").read_text())
  assert got.pop("per_utterance_missed") == {"resynthesis": pytest.approx({"a": 39.0, "b": 40.0, "c": 41.0})}
  assert got == saved
  assert ablate.add_wer_components(str(run / "results.json")) is False
  # An eval folder whose sentences do not average to the saved components is refused, the file left as it was.
  _eval_folder(str(run), "resynthesis", 50.0, list("abc"), missed={"a": 39.0, "b": 40.0, "c": 44.0})
  (run / "results.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="miss 41.0000% of words on average, the saved WER components 40.0000%"):
    ablate.add_wer_components(str(run / "results.json"))
  assert json.loads((run / "results.json").read_text()) == saved
