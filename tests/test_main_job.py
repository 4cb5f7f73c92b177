"""The main job's own logic: budget defaults vs command-line overrides, the resume check, item choice, losses and
the summary."""
import json
import os
import shutil

import pytest

from e2etts_jax import config_lib, main_job, trainer
from e2etts_jax.evaluation.metalist import EvalItem


def test_budget_defaults_fit_and_yield_to_overrides():
  c = config_lib.get_config("small")
  applied = main_job.apply_defaults(c, {"train.stage1.steps"})
  assert "train.stage1.steps" not in applied
  assert c.train.stage1.steps == config_lib.get_config("small").train.stage1.steps
  assert c.train.stage2.steps == main_job.QUICKSTART_DEFAULTS["small"]["train.stage2.steps"]
  config_lib.validate(c, 1)   # the defaults form a valid config
  full = config_lib.get_config("small")
  main_job.apply_defaults(full, set())
  config_lib.validate(full, 1)
  for stage in config_lib.STAGES:
    assert full.train[stage].warmup_steps <= full.train[stage].steps
  # The budget trains small's FM (with a 4-layer token encoder) beside mini-shaped tokenizer, LLM and RM, the
  # tokenizer quantising to 3^8 codes.
  small, mini = config_lib.get_config("small"), config_lib.get_config("mini")
  for net in ("tokenizer", "llm", "rm"):
    fsq = {"fsq_levels": (3,) * 8} if net == "tokenizer" else {}
    assert full[net].to_dict() == {**small[net].to_dict(), **{k: mini[net][k] for k in main_job._NET_SHAPE}, **fsq}
  assert full.tokenizer.usage_dependence > 0   # without the dependence part 3^8's channels copy each other
  assert full.fm.to_dict() == {**small.fm.to_dict(), "encoder_layers": 4}
  assert full.train.stage1.learning_rate == 2e-3 != small.train.stage1.learning_rate
  # Stage 1 batches by frames in four length buckets; the two short stages train in one (a compile per shape).
  assert full.data.dynamic_batch and config_lib.stage_buckets(full, "stage1") == (100, 150, 200, 250)
  assert config_lib.stage_buckets(full, "stage2") == config_lib.stage_buckets(full, "stage3") == (250,)
  assert full.train.stage3.weights.to_dict() == {**small.train.stage3.weights.to_dict(), "llm": 3.0}
  # Stage 2 slows the RM and the LLM only; no other stage or network is scaled.
  assert full.train.stage2.lr_scale.to_dict() == {**small.train.stage2.lr_scale.to_dict(), "rm": 0.3, "llm": 0.3}
  assert full.train.stage3.lr_scale.to_dict() == small.train.stage3.lr_scale.to_dict()
  assert full.train.lr_scale.to_dict() == small.train.lr_scale.to_dict()
  wide = config_lib.get_config("small")
  assert "llm.d_model" not in main_job.apply_defaults(wide, {"llm.d_model"}) and wide.llm.d_model == 192
  # The cascade gets the same steps with stage 3's in stage 2 (config_lib.make_cascaded), not an E2E stage 3.
  cascaded = config_lib.get_config("small", "cascaded")
  main_job.apply_defaults(cascaded, set())
  steps = [full.train[s].steps for s in config_lib.STAGES]
  assert [cascaded.train[s].steps for s in config_lib.STAGES] == [steps[0], steps[1] + steps[2], 0]
  assert cascaded.train.stage2.warmup_steps == (steps[1] + steps[2]) // 10
  config_lib.validate(cascaded, 1)
  # Sizes without budget values are left alone.
  tiny = config_lib.get_config("tiny")
  assert main_job.apply_defaults(tiny, set()) == {}
  assert tiny.to_dict() == config_lib.get_config("tiny").to_dict()


def test_budget_of_records_each_stage_batch(tiny_config):
  tiny_config.train.stage3.batch_size = 2 * tiny_config.data.batch_size
  b = main_job.budget_of(tiny_config)
  assert b["steps"] == {s: tiny_config.train[s].steps for s in config_lib.STAGES}
  assert b["batch_size"] == tiny_config.data.batch_size
  assert b["stage_batch_sizes"] == {"stage1": tiny_config.data.batch_size, "stage2": tiny_config.data.batch_size,
                                    "stage3": 2 * tiny_config.data.batch_size}


def test_pick_items_spreads_over_speakers():
  items = [EvalItem(f"{spk}_{i:06d}_abcdef12", "p", "/p.wav", "t", None)
           for spk in ("flite_awb", "flite_rms", "flite_slt") for i in range(5)]
  picked = main_job.pick_items(items, 6)
  assert len(picked) == 6
  assert sorted({it.utt.rsplit("_", 2)[0] for it in picked}) == ["flite_awb", "flite_rms", "flite_slt"]
  assert main_job.pick_items(items, 0) == items and len(main_job.pick_items(items, 100)) == 15


def test_eval_manifest_drops_utterances_too_long_for_the_model(tmp_path):
  (tmp_path / "wavs").mkdir()
  rows = [{"id": f"u{i}", "audio": f"wavs/u{i}.wav", "text": "a b", "speaker": "s", "rate": 1.0, "rate_class": 1,
           "pitch": 1.0, "pitch_class": 1, "duration": d, "sample_rate": 16000, "split": "test"}
          for i, d in enumerate([1.0, 4.9, 5.1, 9.0])]
  src = tmp_path / "manifest.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = main_job.eval_manifest(str(src), str(tmp_path / "eval" / "m.jsonl"), 5.0)
  kept = [json.loads(l) for l in open(out)]
  assert [r["id"] for r in kept] == ["u0", "u1"]
  assert all(r["audio"].startswith(str(tmp_path)) for r in kept)   # absolute: the list lives elsewhere


def test_network_shapes_name_what_was_trained():
  import jax
  from e2etts_jax import system as system_lib
  c = config_lib.get_config("small")
  main_job.apply_defaults(c, set())
  info = system_lib.DataInfo.for_config(c)
  params = jax.eval_shape(system_lib.System(c, info).init, jax.random.key(0))
  shapes = main_job.network_shapes(c, params)
  assert {k: v["params"] for k, v in shapes.items()} == system_lib.parameter_counts(c, info)
  assert shapes["llm"]["d_model"] == 96 and shapes["fm"]["d_model"] == 192 and shapes["fm"]["encoder_layers"] == 4
  assert "fm d192 x 4 + 4-layer token encoder (" in main_job._network_line(shapes)
  assert main_job._network_line(shapes).startswith("networks: tokenizer d96 x 2 (")


def test_final_losses_and_summary_table(tmp_path):
  c = config_lib.get_config("tiny")
  c.train.stage1.steps, c.train.stage2.steps, c.train.stage3.steps = 4, 2, 2
  (tmp_path / "config.json").write_text(c.to_json())
  rows = [{"step": s, "split": "train", "loss/total": 10.0 - s, "loss/fm": 1.0 / s, "codes/perplexity": 3.0 + s,
           **({"steps_per_s": 2.0} if s > 1 else {}), **({"data/speech_share": s / 10} if s < 7 else {})}
          for s in range(1, 9)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  losses = main_job.final_losses(str(tmp_path))
  assert losses["stage1"]["loss/total"] == 6.0 and losses["stage1"]["step"] == 4
  # Early/late: means over the first and last third of each stage's logged rows (stage 1 logs steps 1-4).
  assert losses["stage1"]["early/loss/total"] == 9.0 and losses["stage1"]["late/loss/total"] == 6.0
  assert losses["stage2"]["early/loss/fm"] == 1.0 / 5 and losses["stage2"]["late/loss/fm"] == 1.0 / 6
  assert losses["stage2"]["codes/perplexity"] == 9.0 and losses["stage3"]["step_s"] == 0.5
  # The speech share: the mean over the stage's rows that have it (stage 3 logs none).
  assert losses["stage2"]["speech_share"] == pytest.approx(0.55) and "speech_share" not in losses["stage3"]
  ev = {"wer": 40.0, "wer_ci": [30.0, 50.0], "sim": 0.8, "rtf": 0.5, "scored": 3, "failed": 0}
  summary = {
      "workdir": str(tmp_path), "config_name": "tiny", "steps": {"stage1": 4}, "eval_items": 3,
      "corpus": {"utterances": 10, "hours": 0.01},
      "eval": {"tts": ev, "resynthesis": {**ev, "wer": 20.0}, "ceiling": {**ev, "wer": 10.0}},
      "final_losses": losses, "loss_keys": ["loss/total", "loss/fm"], "tts_code_perplexity": 5.0,
      "codebook_size": 27, "phases": {"train": 1.0}, "total_seconds": 2.0, "paths": {"x": "/y"}}
  md = main_job.summary_markdown(summary)
  assert "overrides" not in md and "(steps 4), corpus" in md
  summary["stage_batch_sizes"] = {"stage1": 8}
  assert "config: tiny (steps 4 x 8), corpus 10 utterances" in main_job.summary_markdown(summary)
  summary["overrides"] = {"train.stage3.trainable": "llm,fm", "data.join_prob": 0.5}
  md = main_job.summary_markdown(summary)
  assert "overrides: train.stage3.trainable=llm,fm, data.join_prob=0.5  \n" in md
  assert "| tts | 40.00 [30.00, 50.00] | 4.00 |" in md
  assert "| resynthesis | 20.00 [30.00, 50.00] | 2.00 |" in md
  assert "| stage2 | 6 | 5.000 -> 4.000 | 0.200 -> 0.167 | 9.0 | 0.50 | 55% |" in md and "code-usage perplexity" in md
  assert "| stage3 | 8 | 3.000 -> 2.000 | 0.143 -> 0.125 | 11.0 | 0.50 | - |" in md
  assert "every loss term fell within its stage" in md
  summary["speaker_ranking"] = {"speakers": 4, "tts": {"top1": 0.5, "n": 2}, "ceiling": {"top1": 1.0, "n": 2}}
  assert ("first of 4; chance 25%): tts 50% of 2, ceiling 100% of 2"
          in main_job.summary_markdown(summary))
  assert "warning" not in md and "networks:" not in md and "machine:" not in md and "resumes" not in md
  summary["train_seconds"] = 61.25   # the run's training over its resumes, beside this call's 1 s train phase
  assert "\ntraining time of the run over all its resumes: 61.2 s\n" in main_job.summary_markdown(summary)
  summary["machine"], summary["versions"] = "CPU (AMD EPYC), 2 cores (x86_64)", {"jax": "0.10.2", "soxr": None}
  assert "\nmachine: CPU (AMD EPYC), 2 cores (x86_64); jax 0.10.2  \n" in main_job.summary_markdown(summary)
  summary["networks"] = {"fm": {"d_model": 8, "num_layers": 2, "mlp_dim": 16, "params": 1234567, "encoder_layers": 1}}
  assert "\nnetworks: fm d8 x 2 + 1-layer token encoder (1.23M)\n" in main_job.summary_markdown(summary)
  summary["weights"], summary["ema"] = "raw", {"decay": 0.995, "networks": "llm,fm"}
  assert "synthesis weights" not in main_job.summary_markdown(summary)
  summary["weights"] = "ema"
  assert ("\nsynthesis weights: llm,fm averaged over ~200 updates (train.ema_decay=0.995)  \nnetworks: fm d8"
          in main_job.summary_markdown(summary))
  losses["stage3"]["late/loss/fm"] = 0.5
  assert "did not fall: stage3 loss/fm" in main_job.summary_markdown(summary)
  losses["stage3"]["codes/perplexity"] = 1.0
  assert "tokenizer uses about 1.0 code" in main_job.summary_markdown(summary)


def test_final_losses_prefer_held_out_rows(tmp_path):
  """With held-out rows (split 'eval') for a stage, early/late are its first and last such row, not the training
  thirds; a stage without two of them falls back to the training rows."""
  c = config_lib.get_config("tiny")
  c.train.stage1.steps, c.train.stage2.steps, c.train.stage3.steps = 4, 2, 0
  (tmp_path / "config.json").write_text(c.to_json())
  rows = [{"step": s, "split": "train", "loss/fm": float(s)} for s in range(1, 7)]   # training fm rises
  rows += [{"step": s, "split": "eval", "stage": 1.0, "loss/fm": 3.0 - s / 2, "llm/text_gain": s / 8}
           for s in (0, 2, 4)]
  rows += [{"step": 4, "split": "eval", "stage": 2.0, "loss/fm": 0.9}]
  # Stage 1's two draw sets at its start and end (split 'eval_set'); step 4's set 1 was read twice (a resumed run):
  # the later row counts. Moves -2.3 and -1.7: standard error 0.3.
  rows += [{"step": s, "split": "eval_set", "stage": 1.0, "draw": float(d), "loss/fm": v}
           for s, d, v in [(0, 0, 3.5), (0, 1, 2.5), (4, 1, 9.0), (4, 0, 1.2), (4, 1, 0.8)]]
  rows += [{"step": 4, "split": "eval_set", "stage": 2.0, "draw": 0.0, "loss/fm": 7.0}]   # another stage's read
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  losses = main_job.final_losses(str(tmp_path))
  assert losses["stage1"]["trend"] == 1.0 and losses["stage2"]["trend"] == 0.0
  assert (losses["stage1"]["early/loss/fm"], losses["stage1"]["late/loss/fm"]) == (3.0, 1.0)
  assert (losses["stage2"]["early/loss/fm"], losses["stage2"]["late/loss/fm"]) == (5.0, 6.0)
  assert losses["stage1"]["move_se/loss/fm"] == pytest.approx(0.3) and losses["stage1"]["move_sets"] == 2.0
  assert not any(k.startswith("move_") for k in losses["stage2"])   # no held-out rows there
  summary = {"workdir": "w", "config_name": "tiny", "steps": {}, "eval_items": 0,
             "corpus": {"utterances": 1, "hours": 0.0}, "eval": {}, "final_losses": losses,
             "loss_keys": ["loss/fm"], "codebook_size": 27, "phases": {}, "total_seconds": 0.0, "paths": {}}
  md = main_job.summary_markdown(summary)
  assert "| stage1 | 4 | 3.000 -> 1.000 |" in md and "did not fall: stage2 loss/fm" in md
  # The LLM's text gain (held-out only), start -> end of the stages that have it.
  assert (losses["stage1"]["early/llm/text_gain"], losses["stage1"]["late/llm/text_gain"]) == (0.0, 0.5)
  assert "late/llm/text_gain" not in losses["stage2"]
  assert "nats per token; near 0, the LLM ignores its text): stage1 0.000 -> 0.500\n" in md
  assert "first -> the last third" in md   # not every stage has held-out rows
  losses.pop("stage2")
  assert "held-out, at each stage's start -> end (fixed test batches; one fixed set of random draws)" in \
      main_job.summary_markdown(summary)
  summary["eval_draws"] = 4
  assert "(fixed test batches; the mean over 4 fixed sets of random draws)" in main_job.summary_markdown(summary)
  assert "e2etts-diagnose" not in main_job.summary_markdown(summary)
  losses["stage1"]["late/loss/fm"] = 3.5   # a rise, with its spread over the draw sets beside it
  summary["steps"] = {"stage1": 4, "stage2": 2, "stage3": 0}
  md = main_job.summary_markdown(summary)
  assert "did not fall: stage1 loss/fm (by 0.5000; standard error 0.3000 over 2 draw sets)\n" in md
  assert ("(to read stage1's moves on 64 draw sets: `e2etts-diagnose --workdir w --held_out_steps 0,4 "
          "--held_out_stage stage1 --draws 64`)") in md
  losses["stage1"]["move_se/loss/fm"] = 0.0   # a term that takes no draws moves alike on every set
  md = main_job.summary_markdown(summary)
  assert "did not fall: stage1 loss/fm (by 0.5000; the term takes no draws)\n" in md and "e2etts-diagnose" not in md


def test_speaker_ranking_counts_outputs_nearest_their_prompt_speaker(tmp_path):
  """Embeddings are read from the file name here: 'a' outputs embed near speaker a's reference, etc."""
  import numpy as np
  dirs = {"tts": tmp_path / "tts", "ceiling": tmp_path / "ceiling"}
  for d in dirs.values():
    d.mkdir()
  vectors = {"a": np.array([1.0, 0.1]), "b": np.array([0.1, 1.0])}
  items, names = [], {}
  for spk in ("flite_a", "flite_b"):
    for i in range(2):
      utt = f"{spk}_{i:06d}_abcdef12"
      gt = tmp_path / f"gt_{utt}.wav"
      gt.write_text("")
      names[str(gt)] = spk[-1]
      items.append(EvalItem(utt, "p", "/p.wav", "t", str(gt)))
      for system, d in dirs.items():
        # The TTS output of flite_b item 1 sounds like speaker a; every ceiling output is right.
        who = "a" if (system == "tts" and spk == "flite_b" and i == 1) else spk[-1]
        (d / f"{utt}.wav").write_text("")
        names[str(d / f"{utt}.wav")] = who
  missing = EvalItem("flite_a_000009_abcdef12", "p", "/p.wav", "t", None)   # no output, no gt: not counted
  embed = lambda path: vectors[names[path]]
  r = main_job.speaker_ranking(embed, items + [missing], {k: str(v) for k, v in dirs.items()})
  assert r == {"speakers": 2, "tts": {"top1": 0.75, "n": 4}, "ceiling": {"top1": 1.0, "n": 4}}
  one = main_job.speaker_ranking(embed, items[:2], {"tts": str(dirs["tts"])})
  assert one == {"speakers": 1}   # one speaker: nothing to rank against


def test_a_rerun_under_another_config_is_refused_before_the_corpus(workdir, tmp_path):
  """main_job.run asks trainer.check_resume first: a workdir trained under another loss weight is refused naming
  the key, before the corpus, the shards or the workdir are touched."""
  run = tmp_path / "run"
  shutil.copytree(workdir["run"], run)
  c = trainer.load_config(str(run))
  c.mesh.update(data=4, tensor=2)   # the test process's 8 devices take tiny's batch of 4 (the mesh is free)
  c.train.stage1.weights.fm = 2.0
  with pytest.raises(trainer.ResumeError, match=r"in 1 key\(s\): train\.stage1\.weights\.fm: 1\.0 -> 2\.0\. "):
    main_job.run(c, str(run), corpus_dir=str(tmp_path / "corpus"), num_utterances=10, progress=False)
  assert not (tmp_path / "corpus").exists()
  assert sorted(os.listdir(run)) == sorted(os.listdir(workdir["run"]))
