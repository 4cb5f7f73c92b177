"""The train loop on real (tiny) data: stages learn, cascaded mode, resumption across meshes and after SIGKILL,
SIGTERM preemption, and two processes over jax.distributed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from e2etts_jax import (checkpoint, config_lib, flops, input_pipeline, metric_writer, optim, sharding, train_step,
                        trainer)
from tests.conftest import tiny_train_config, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(shape):
  cfg = config_lib.get_config("tiny").mesh
  cfg.update(dict(zip(("data", "fsdp", "tensor"), shape)))
  return sharding.make_mesh(cfg, jax.devices()[: int(np.prod(shape))])


def _losses(history, key="loss/total"):
  return {int(h["step"]): h[key] for h in history if key in h}


def _first_last(history, stage, key):
  vals = [h[key] for h in history if h["stage"] == stage and key in h]
  k = max(1, len(vals) // 3)
  return float(np.mean(vals[:k])), float(np.mean(vals[-k:]))


def test_every_stage_learns(tiny_shards, tmp_path):
  c = tiny_train_config(tiny_shards, steps=(24, 12, 12))
  result = trainer.train(c, str(tmp_path / "run"), progress=False, mesh=_mesh((1, 1, 1)))
  assert result.global_step == 48 and result.stage == "stage3"
  for stage, key in [("stage1", "loss/total"), ("stage1", "loss/llm"), ("stage1", "loss/rm"),
                     ("stage2", "loss/llm"), ("stage2", "loss/rm"), ("stage3", "loss/total")]:
    first, last = _first_last(result.history, stage, key)
    assert last < first, (stage, key, first, last)
  stage3 = [h for h in result.history if h["stage"] == "stage3"]
  assert all(k in stage3[-1] for k in ("loss/e2e_fm", "loss/e2e_asr", "loss/e2e_spk", "loss/llm"))
  assert os.path.exists(tmp_path / "run" / "loss_curves.png")
  assert {"config.json", "data_info.json", "spm.model"} <= set(os.listdir(tmp_path / "run"))


def test_held_out_losses_use_fixed_batches_and_draws(tiny_shards, tmp_path):
  """Held-out rows at each stage's start and end and every eval_every steps. Their batches and random draws are
  fixed, so the end of stage 1 and the start of stage 2 (the same parameters) give identical values for the terms
  both stages compute, while training between two rows moves them."""
  c = tiny_train_config(tiny_shards, steps=(4, 2, 0))
  c.data.batch_size = 2            # the 40-utterance corpus holds out 2: one full held-out batch
  c.train.update(eval_every=2, eval_batches=1)
  result = trainer.train(c, str(tmp_path / "run"), progress=False, mesh=_mesh((1, 1, 1)))
  assert [(int(r["step"]), int(r["stage"])) for r in result.evals] == [(0, 1), (2, 1), (4, 1), (4, 2), (6, 2)]
  end1, start2 = result.evals[2], result.evals[3]
  for k in ("loss/fm", "loss/rm", "loss/llm"):
    assert end1[k] == start2[k], k
    assert result.evals[0][k] != end1[k], k
  assert "loss/usage" in end1 and "loss/usage" not in start2   # each stage's own terms
  from e2etts_jax import metric_writer
  rows = metric_writer.read_metrics(str(tmp_path / "run"), split="eval")
  assert [r["loss/fm"] for r in rows] == [r["loss/fm"] for r in result.evals]


def test_cascaded_mode_runs_end_to_end(tiny_shards, tmp_path):
  c = tiny_train_config(tiny_shards, steps=(6, 4, 4), mode="cascaded")
  result = trainer.train(c, str(tmp_path / "run"), progress=False, mesh=_mesh((1, 1, 1)))
  assert result.global_step == 14 and result.stage == "stage2"
  stage1 = [h for h in result.history if h["stage"] == "stage1"]
  # Recognition-only tokenizer: stage 1 computes the RM loss alone and updates only tokenizer and RM.
  assert all("loss/llm" not in h and "loss/fm" not in h for h in stage1)
  assert {k for k in stage1[-1] if k.startswith("grad_norm/")} == {"grad_norm/tokenizer", "grad_norm/rm"}
  stage2 = [h for h in result.history if h["stage"] == "stage2"]
  assert {k for k in stage2[-1] if k.startswith("grad_norm/")} == {"grad_norm/llm", "grad_norm/fm", "grad_norm/rm"}


def test_resume_on_another_mesh_continues_identically(tiny_shards, tmp_path):
  c = tiny_train_config(tiny_shards, steps=(8, 0, 0))
  full = trainer.train(c, str(tmp_path / "full"), progress=False, mesh=_mesh((4, 1, 1)))
  part = trainer.train(c, str(tmp_path / "split"), progress=False, mesh=_mesh((4, 1, 1)), stop_after=4)
  assert part.global_step == 4
  ckpt = checkpoint.Checkpointer(str(tmp_path / "split" / "checkpoints"), every=1, keep=8, async_save=False)
  saved = ckpt.restore_meta(4)["train_seconds"]
  ckpt.close()
  assert 0 < saved <= part.train_seconds
  t = time.perf_counter()
  rest = trainer.train(c, str(tmp_path / "split"), progress=False, mesh=_mesh((2, 1, 2)))
  took = time.perf_counter() - t
  assert rest.global_step == 8
  # The run's training time carries over the resume: the first call's (as its last checkpoint saved it) plus this
  # call's own, so a resumed run does not report only its last part.
  assert saved + 0.9 * took < rest.train_seconds <= saved + took
  a, b = _losses(full.history), _losses(rest.history)
  assert sorted(b) == [5, 6, 7, 8]
  np.testing.assert_allclose([b[s] for s in b], [a[s] for s in b], rtol=1e-5)


def test_a_stage_with_its_own_batch_trains_at_it_and_resumes_exactly(tiny_shards, tmp_path):
  """train.stage3.batch_size: stage 3 trains at its own batch (a second iterator), and a run stopped at the stage
  boundary or inside stage 3 continues with the same losses to the bit."""
  c = tiny_train_config(tiny_shards, steps=(2, 0, 3))
  c.train.stage3.batch_size = 2
  mesh = _mesh((1, 1, 1))
  full = trainer.train(c, str(tmp_path / "full"), progress=False, mesh=mesh)
  assert {h["stage"]: int(h["batch_size"]) for h in full.history} == {"stage1": 4, "stage3": 2}
  for stop in (2, 4):
    workdir = str(tmp_path / f"stop{stop}")
    assert trainer.train(c, workdir, progress=False, mesh=mesh, stop_after=stop).global_step == stop
    rest = trainer.train(c, workdir, progress=False, mesh=mesh)
    a, b = _losses(full.history), _losses(rest.history)
    assert sorted(b) == list(range(stop + 1, 6))
    assert [b[s] for s in b] == [a[s] for s in b]   # exact, not approximate


def test_dynamic_batches_train_their_rows_per_bucket_and_resume_exactly(tiny_shards, tmp_path):
  """data.dynamic_batch: a short bucket's batches hold twice the rows (one compile per shape), the logged
  throughput counts each step's own rows, a stage with its own length buckets (train.stage3.bucket_boundaries)
  trains in those alone, and a run stopped in either stage continues with the same losses."""
  c = tiny_train_config(tiny_shards, steps=(6, 0, 2))
  c.data.update(bucket_boundaries=(100, 200), dynamic_batch=True, batch_size=2)
  c.train.stage3.bucket_boundaries = (200,)
  # A seed whose first 6 batches draw both buckets (few of the tiny corpus's utterances fit 100 frames).
  for c.seed in range(50):
    plan = input_pipeline.make_plan(c, "train", seed=c.seed)
    planned = {step + 1: (len(plan.batch(step)[0]), plan.batch(step)[2]) for step in range(6)}
    if {rows for rows, _ in planned.values()} == {4, 2}:
      break
  mesh = _mesh((1, 1, 1))
  full = trainer.train(c, str(tmp_path / "full"), progress=False, mesh=mesh)
  trained = {int(h["step"]): (int(h["batch_size"]), int(h["frames"])) for h in full.history}
  assert trained == {**planned, 7: (2, 200), 8: (2, 200)}
  logged = [h for h in full.history if "tokens_per_s" in h]
  assert logged and all(h["tokens_per_s"] > 0 and 0 < h["mfu"] for h in logged)
  workdir = str(tmp_path / "split")
  assert trainer.train(c, workdir, progress=False, mesh=mesh, stop_after=3).global_step == 3
  resumed = {}
  for stop in (7, None):   # resumed inside stage 1, stopped inside stage 3 (its own iterator), resumed there
    resumed.update(_losses(trainer.train(c, workdir, progress=False, mesh=mesh, stop_after=stop).history))
  a = _losses(full.history)
  assert sorted(resumed) == [4, 5, 6, 7, 8]
  assert resumed == {s: a[s] for s in resumed}   # exact, not approximate


def test_logged_throughput_sums_each_steps_own_shape(tiny_shards, monkeypatch):
  """Between two logs, dynamic batches have different shapes: MFU and tokens/s add each step's own FLOPs and
  frames, rather than scaling the last step's by the step rate."""
  c = tiny_train_config(tiny_shards)
  c.train.log_every = 3
  info = input_pipeline.dataset_info(tiny_shards, c)
  clock = iter([0.0, 10.0, 16.0, 20.0])   # the logger's start, then its logs at steps 1, 3 and 6
  monkeypatch.setattr(trainer.time, "perf_counter", lambda: next(clock))
  logged = []
  writer = types.SimpleNamespace(scalars=lambda step, host: logged.append(host))
  bar = types.SimpleNamespace(set_postfix=lambda **kw: None)
  peak = 1e9
  logger = trainer._StepLogger(writer, c, info, "stage1", 0, 6, peak, bar, [], "ckpt")
  shapes = [(4, 200), (6, 100), (4, 200), (8, 100), (6, 100), (4, 200)]
  for step, (rows, frames) in enumerate(shapes, 1):
    logger.push((step, {"bad_steps": 0.0, "loss/total": 1.0}, rows, frames))
  logger.flush()
  assert [h["step"] for h in logged] == [1, 3, 6] and "mfu" not in logged[0]   # step 1 holds the compile
  step_flops = lambda shape: flops.step_flops(c, info, *shape, "stage1")
  for h, window, seconds in ((logged[1], shapes[1:3], 6.0), (logged[2], shapes[3:], 4.0)):
    assert h["mfu"] == pytest.approx(sum(map(step_flops, window)) / seconds / peak, rel=1e-12)
    assert h["tokens_per_s"] == pytest.approx(sum(r * f for r, f in window) / c.tokenizer.downsample / seconds)
    assert h["steps_per_s"] == pytest.approx(len(window) / seconds)
  # The last step's shape times the step rate would say otherwise here.
  assert logged[2]["mfu"] != pytest.approx(3 * step_flops(shapes[-1]) / 4.0 / peak, rel=1e-3)
  assert logged[2]["tokens_per_s"] != pytest.approx(3 * 4 * 200 / c.tokenizer.downsample / 4.0, rel=1e-3)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_weight_average_spans_stages_and_is_what_synthesis_loads(tiny_shards, tmp_path):
  """train.ema_decay: each averaged network's average runs over every update it gets, across stages (the FM
  trains in stages 1-2, the LLM in 1-3), is checkpointed with the state, and is what load_trained(ema=True) and
  Synthesizer.from_workdir give unless model.use_ema=false."""
  from e2etts_jax import synthesis
  decay = 0.5
  c = tiny_train_config(tiny_shards, steps=(2, 1, 1))
  c.train.update(ema_decay=decay, ema_networks="llm,fm", checkpoint_every=1, keep_checkpoints=10, eval_batches=0)
  run = str(tmp_path / "run")
  result = trainer.train(c, run, progress=False, mesh=_mesh((1, 1, 1)))
  ema = jax.device_get(result.state.ema)
  assert {n: int(v) for n, v in ema["count"].items()} == {"llm": 4, "fm": 3}
  raw = [trainer.load_trained(run, step=k)[1] for k in (1, 2, 3, 4)]
  for net, updates in (("llm", 4), ("fm", 3)):
    w = np.array([decay ** (updates - i) for i in range(1, updates + 1)])
    want = [sum(wi * x for wi, x in zip(w / w.sum(), xs)) for xs in zip(*[_leaves(p[net]) for p in raw[:updates]])]
    for a, b in zip(_leaves(ema["params"][net]), want, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=net)
  _, loaded, meta = trainer.load_trained(run, ema=True)
  assert meta["weights"] == "ema" and trainer.load_trained(run)[2]["weights"] == "raw"
  for net, want in [("llm", ema["params"]["llm"]), ("fm", ema["params"]["fm"]), ("rm", raw[-1]["rm"]),
                    ("tokenizer", raw[-1]["tokenizer"])]:
    for a, b in zip(_leaves(loaded[net]), _leaves(want), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=net)
  synth = synthesis.Synthesizer.from_workdir(run)
  assert synth.meta["weights"] == "ema" and synthesis.inference_settings(synth.config)["model.use_ema"] is True
  synth = synthesis.Synthesizer.from_workdir(run, inference=["model.use_ema=false"])
  assert synth.meta["weights"] == "raw"
  for a, b in zip(_leaves(synth.params["fm"]), _leaves(raw[-1]["fm"]), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="model.use_emma"):
    synthesis.Synthesizer.from_workdir(run, inference=["model.use_emma=false"])


@pytest.fixture(scope="module")
def trained_source(tiny_shards, tmp_path_factory):
  """A workdir after 2 steps of stage 1 (checkpoint at step 2): the source of warm starts and resumes below."""
  source = str(tmp_path_factory.mktemp("trained") / "source")
  trainer.train(tiny_train_config(tiny_shards, steps=(2, 0, 0)), source, progress=False, mesh=_mesh((1, 1, 1)))
  return source


def test_warm_start_takes_the_named_networks_from_another_workdir(tiny_shards, trained_source, tmp_path):
  source = trained_source
  _, src, _ = trainer.load_trained(source)
  c = tiny_train_config(tiny_shards, steps=(0, 1, 0))
  c.train.stage2.trainable = "fm"   # tokenizer, rm and llm keep their starting values exactly
  c.train.update(init_from=source, init_networks="tokenizer,rm")
  result = trainer.train(c, str(tmp_path / "warm"), progress=False, mesh=_mesh((1, 1, 1)))
  params = result.state.params
  # The fresh init the trainer makes (the same jit, so bit-identical).
  fresh, _ = train_step.create_train_state(result.system, optim.make_optimizer(c, "stage2"), _mesh((1, 1, 1)),
                                           jax.random.key(c.seed))
  fresh = fresh.params
  for net, want in [("tokenizer", src), ("rm", src), ("llm", fresh)]:
    for a, b in zip(_leaves(params[net]), _leaves(want[net]), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=net)
  assert any((a != b).any() for a, b in zip(_leaves(params["tokenizer"]), _leaves(fresh["tokenizer"])))

  # A workdir with checkpoints of its own resumes from them and never reads init_from again (a key a resume may
  # change freely; the longer stage is a change it must be allowed, and is logged).
  c.train.stage2.steps = 2
  c.train.init_from = str(tmp_path / "gone")
  warm = str(tmp_path / "warm")
  assert trainer.train(c, warm, progress=False, mesh=_mesh((1, 1, 1)), allow_config_change=True).global_step == 2
  with open(os.path.join(warm, trainer.CONFIG_CHANGES)) as f:
    assert [json.loads(line) for line in f] == [{"step": 1, "changes": {"train.stage2.steps": [1, 2]}}]


def test_warm_start_names_a_network_that_does_not_fit_and_a_missing_source(tiny_shards, trained_source, tmp_path,
                                                                          monkeypatch):
  source = trained_source
  made = []   # the metric writers of these runs, which raise after opening theirs

  class Recording(metric_writer.MetricWriter):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)

  monkeypatch.setattr(metric_writer, "MetricWriter", Recording)
  c = tiny_train_config(tiny_shards, steps=(1, 0, 0))
  c.llm.d_model = 48
  c.train.update(init_from=source, init_networks="tokenizer,llm")
  with pytest.raises(trainer.TrainingError, match=r"init_from=.*source: its llm does not fit"):
    trainer.train(c, str(tmp_path / "wider"), progress=False, mesh=_mesh((1, 1, 1)))
  c.train.init_from = str(tmp_path / "nowhere")
  with pytest.raises(checkpoint.CheckpointError, match="nowhere"):
    trainer.train(c, str(tmp_path / "missing"), progress=False, mesh=_mesh((1, 1, 1)))
  # Each failed run closed its writer on the way out (left to an atexit hook, Python 3.12 cannot close it).
  assert len(made) == 2 and all(w.closed for w in made)


def test_a_branch_continues_its_source_exactly_or_under_its_own_config(tiny_shards, tmp_path):
  """trainer.branch: a workdir started at another's last stage-2 checkpoint trains stage 3 to the source's losses
  bit for bit under the same config, and to others under another stage-3 learning rate; the source is untouched.
  Its held-out log is the source's: stage 3's first read, at the checkpoint's step, is made once, by the branch."""
  c = tiny_train_config(tiny_shards, steps=(2, 2, 3))
  c.data.batch_size = 2            # the 40-utterance corpus holds out 2: one full held-out batch
  c.train.eval_batches = 1
  mesh = _mesh((1, 1, 1))
  source = str(tmp_path / "source")
  full = _losses(trainer.train(c, source, progress=False, mesh=mesh).history)
  saved = sorted(os.listdir(os.path.join(source, "checkpoints")))
  logged = open(os.path.join(source, metric_writer.JSONL)).read()
  same = str(tmp_path / "same")
  trainer.branch(source, 4, same)
  assert os.listdir(os.path.join(same, "checkpoints")) == ["4"]
  copied = metric_writer.read_metrics(same)
  assert copied and max(r["step"] for r in copied) == 4
  rest = _losses(trainer.train(c, same, progress=False, mesh=mesh).history)
  assert sorted(rest) == [5, 6, 7] and [rest[s] for s in rest] == [full[s] for s in rest]   # exact
  assert metric_writer.read_metrics(same, "eval") == metric_writer.read_metrics(source, "eval")
  assert [(r["step"], r["stage"]) for r in metric_writer.read_metrics(same, "eval")] == [
      (0, 1.0), (2, 1.0), (2, 2.0), (4, 2.0), (4, 3.0), (7, 3.0)]
  assert json.load(open(os.path.join(same, trainer.BRANCH))) == {"source": source, "step": 4}
  assert not os.path.exists(os.path.join(same, trainer.CONFIG_CHANGES))   # it went on under the source's config
  lr = c.train.stage3.learning_rate
  c.train.stage3.learning_rate = 10 * lr
  other = str(tmp_path / "other")
  trainer.branch(source, 4, other)
  with pytest.raises(trainer.ResumeError, match=r"in 1 key\(s\): train\.stage3\.learning_rate: "):
    trainer.train(c, other, progress=False, mesh=mesh)   # under its own config only when told so
  moved = _losses(trainer.train(c, other, progress=False, mesh=mesh, allow_config_change=True).history)
  # Step 5's loss is read before any update, and its warm-up step has a zero rate: step 7 is the first to differ.
  assert moved[5] == full[5] and moved[7] != full[7]
  # The keys it went on under are logged; past its branch point it compares with its own config.
  with open(os.path.join(other, trainer.CONFIG_CHANGES)) as f:
    assert [json.loads(line) for line in f] == [{"step": 4, "changes": {"train.stage3.learning_rate": [lr, 10 * lr]}}]
  c.train.stage3.learning_rate = lr
  with pytest.raises(trainer.ResumeError, match=rf"trained to step 7 under another config .* in 1 key\(s\): "
                                                rf"train\.stage3\.learning_rate: {10 * lr!r} -> {lr!r}\. "):
    trainer.train(c, other, progress=False, mesh=mesh)
  assert sorted(os.listdir(os.path.join(source, "checkpoints"))) == saved
  assert open(os.path.join(source, metric_writer.JSONL)).read() == logged
  listed = ", ".join(sorted(saved, key=int))
  with pytest.raises(checkpoint.CheckpointError, match=rf"at step 3: its checkpoints are at {listed} "):
    trainer.branch(source, 3, str(tmp_path / "nowhere"))
  with pytest.raises(checkpoint.CheckpointError, match="already holds checkpoints"):
    trainer.branch(source, 4, same)
  assert not os.path.exists(str(tmp_path / "nowhere"))


def test_resume_refuses_a_checkpoint_its_stage_budgets_misplace(tiny_shards, trained_source):
  run = trained_source
  written = open(os.path.join(run, "config.json")).read()
  # Step 2 ended stage 1; with stage 1 one step long it would be continued inside stage 2 with stage 1's state.
  with pytest.raises(trainer.TrainingError, match=r"global step 2 of stage1, .*stage1 steps 0-1, stage2 steps 1-3"):
    trainer.train(tiny_train_config(tiny_shards, steps=(1, 2, 0)), run, progress=False, mesh=_mesh((1, 1, 1)))
  assert open(os.path.join(run, "config.json")).read() == written   # the refused run changed nothing


def test_resume_refuses_keys_that_change_training_unless_allowed(tiny_shards, trained_source, tmp_path):
  """A resume under another loss weight (or any key outside trainer.RESUME_FREE) would train a run its config.json
  no longer describes: refused, naming the keys, with nothing written; allowed, it goes on and logs them."""
  run = str(tmp_path / "run")
  shutil.copytree(trained_source, run)
  written = open(os.path.join(run, "config.json")).read()
  c = tiny_train_config(tiny_shards, steps=(2, 0, 0))
  c.train.update(log_every=5, eval_every=7, checkpoint_every=9)   # how often, not what: free
  c.mesh.data = 1
  assert trainer.check_resume(c, run) == []
  c.train.stage1.weights.llm = 0.5
  c.train.gumbel_tau = 0.5
  refusal = (r"trained to step 2 under another config .* in 2 key\(s\): train\.gumbel_tau: 1\.0 -> 0\.5; "
             r"train\.stage1\.weights\.llm: 0\.1 -> 0\.5\. Resume with that config")
  with pytest.raises(trainer.ResumeError, match=refusal):
    trainer.check_resume(c, run)
  with pytest.raises(trainer.ResumeError, match=refusal):
    trainer.train(c, run, progress=False, mesh=_mesh((1, 1, 1)))
  assert open(os.path.join(run, "config.json")).read() == written
  assert not os.path.exists(os.path.join(run, trainer.CONFIG_CHANGES))
  assert trainer.check_resume(c, run, allow_config_change=True) == [
      ("train.gumbel_tau", 1.0, 0.5), ("train.stage1.weights.llm", 0.1, 0.5)]
  assert trainer.train(c, run, progress=False, mesh=_mesh((1, 1, 1)), allow_config_change=True).global_step == 2
  with open(os.path.join(run, trainer.CONFIG_CHANGES)) as f:
    assert [json.loads(line) for line in f] == [
        {"step": 2, "changes": {"train.gumbel_tau": [1.0, 0.5], "train.stage1.weights.llm": [0.1, 0.5]}}]
  assert trainer.check_resume(c, run) == []   # its config.json is now the one it went on under
  assert trainer.check_resume(c, str(tmp_path / "fresh")) == []


def test_resume_with_another_optimizer_names_the_changed_key_and_keeps_the_config(tiny_shards, trained_source):
  run = trained_source
  written = open(os.path.join(run, "config.json")).read()
  c = tiny_train_config(tiny_shards, steps=(2, 0, 0))
  c.train.optimizer = "muon"   # another optimizer state tree than the checkpoint's AdamW one
  with pytest.raises(trainer.ResumeError, match=r"in 1 key\(s\): train\.optimizer: 'adamw' -> 'muon'\. "):
    trainer.train(c, run, progress=False, mesh=_mesh((1, 1, 1)))
  # Allowed to go on under it, the state still does not restore: the restore error names the key as well.
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"(?s)cannot restore step 2 .*differs from the one that wrote it .* in 1 key\(s\): "
                           r"train\.optimizer: 'adamw' -> 'muon'\. Resume with that config"):
    trainer.train(c, run, progress=False, mesh=_mesh((1, 1, 1)), allow_config_change=True)
  d = c.llm.d_model
  c.llm.d_model = 2 * d   # every changed key is named, in key order
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"in 2 key\(s\): llm\.d_model: {d} -> {2 * d}; train\.optimizer: 'adamw' -> 'muon'\. "):
    trainer.train(c, run, progress=False, mesh=_mesh((1, 1, 1)), allow_config_change=True)
  assert not os.path.exists(os.path.join(run, trainer.CONFIG_CHANGES))   # logged only once it goes on
  assert open(os.path.join(run, "config.json")).read() == written
  kept = checkpoint.Checkpointer(os.path.join(run, "checkpoints"), 1, 1)
  assert kept.latest_step() == 2
  kept.close()


def _train_cmd(shards, workdir, steps=8):
  return [sys.executable, "-m", "e2etts_jax.cli.train", "--config", os.path.join(REPO, "configs/tiny.py"),
          "--workdir", workdir, f"--config.data.shards={shards}", "--config.data.bucket_boundaries=(200,)",
          f"--config.train.stage1.steps={steps}", "--config.train.stage2.steps=0", "--config.train.stage3.steps=0",
          "--config.train.stage1.warmup_steps=1", "--config.train.log_every=1",
          "--config.train.checkpoint_every=2", "--config.mesh.data=1", "--distributed=off"]


def _env(devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _metrics(workdir):
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      rows[int(r["step"])] = r["loss/total"]   # later lines (after a restart) win
  return rows


def _wait_for_checkpoint(workdir, step, proc, timeout=600):
  path = os.path.join(workdir, "checkpoints", str(step))
  t0 = time.time()
  while not os.path.isdir(path):
    assert proc.poll() is None, f"training exited early: {proc.communicate()}"
    assert time.time() - t0 < timeout
    time.sleep(0.2)


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tiny_shards, tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  subprocess.run(_train_cmd(tiny_shards, full), env=_env(), check=True, capture_output=True)
  proc = subprocess.Popen(_train_cmd(tiny_shards, killed), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  _wait_for_checkpoint(killed, 4, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = subprocess.run(_train_cmd(tiny_shards, killed), env=_env(), check=True, capture_output=True, text=True)
  assert "done: step 8" in out.stdout
  a, b = _metrics(full), _metrics(killed)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  assert [b[s] for s in range(1, 9)] == [a[s] for s in range(1, 9)]   # exact, not approximate


def test_cli_branch_says_where_it_parts_from_config_and_a_later_resume_under_it_is_refused(tiny_shards, trained_source,
                                                                                          tmp_path):
  """e2etts-train --branch_from trains under the source's config.json and prints the keys where that differs from
  --config; a later plain resume under --config is refused (exit 1) naming the keys, its config.json untouched."""
  workdir = str(tmp_path / "branch")
  cmd = _train_cmd(tiny_shards, workdir, steps=2)
  out = subprocess.run(cmd + [f"--branch_from={trained_source}:2", "--config.train.stage1.weights.llm=0.5"],
                       env=_env(), capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert "done: step 2" in out.stdout
  # tiny_train_config's stage LRs are not the file's; the override is in both, so not among them.
  assert f"differ from it (--config -> {trained_source}): " in out.stdout
  assert "train.stage2.learning_rate: 0.0003 -> 0.002" in out.stdout and "weights.llm" not in out.stdout
  with open(os.path.join(workdir, trainer.CONFIG_CHANGES)) as f:   # mesh and checkpoint_every are free
    assert [json.loads(line) for line in f] == [{"step": 2, "changes": {"train.stage1.weights.llm": [0.1, 0.5]}}]
  written = open(os.path.join(workdir, "config.json")).read()
  refused = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
  assert refused.returncode == 1
  assert "was trained to step 2 under another config" in refused.stderr
  assert "train.stage1.weights.llm: 0.5 -> 0.1" in refused.stderr
  assert open(os.path.join(workdir, "config.json")).read() == written


def test_sigterm_saves_and_exits_cleanly(tiny_shards, tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(_train_cmd(tiny_shards, workdir, steps=400), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(workdir, 2, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "preempted, checkpoint saved" in out
  stopped_at = int(out.split("preempted, checkpoint saved: step ")[1].split(",")[0])
  assert 2 <= stopped_at < 400
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == stopped_at


def test_a_second_sigterm_acts_as_without_the_trainer():
  """The first SIGTERM only asks the loop to stop after its step; the handler from before the run is back for the
  next one (by default: terminate, for a run stuck in a long compile)."""
  before = []
  previous = signal.signal(signal.SIGTERM, lambda *_: before.append(1))
  try:
    with trainer._Preemption() as preemption:
      assert not preemption.reached(1)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)   # Python runs the handler between bytecodes of the main thread
      assert preemption.reached(2) and before == []
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)
      assert before == [1]
  finally:
    signal.signal(signal.SIGTERM, previous)


def _read_and_close(f):
  f.seek(0)
  text = f.read()
  f.close()
  return text


def test_two_processes_agree_on_the_global_loss_and_on_where_a_preemption_stops_them(tiny_shards, tmp_path):
  port = 20000 + os.getpid() % 20000
  workdir = str(tmp_path / "run")
  procs = []
  for i in range(2):
    env = _env(devices=2)
    env.update(E2ETTS_COORDINATOR=f"127.0.0.1:{port}", E2ETTS_NUM_PROCESSES="2", E2ETTS_PROCESS_ID=str(i))
    cmd = _train_cmd(tiny_shards, workdir, steps=2000)
    cmd = [a for a in cmd if not a.startswith("--distributed") and not a.startswith("--config.mesh")]
    # Files, not pipes: nobody reads a pipe while the processes train, and a full one would stall a process.
    logs = [open(tmp_path / f"{name}{i}.txt", "w+") for name in ("out", "err")]
    procs.append((subprocess.Popen(cmd + ["--distributed=on", "--config.mesh.data=-1"], env=env, stdout=logs[0],
                                   stderr=logs[1], text=True), logs))
  _wait_for_checkpoint(workdir, 2, procs[0][0])
  # Only one host is notified: every step and the save are collective, so both must stop after the same step.
  procs[0][0].send_signal(signal.SIGTERM)
  outs = []
  for p, logs in procs:
    p.wait(timeout=900)
    out, err = [_read_and_close(f) for f in logs]
    assert p.returncode == 0, err[-3000:]
    outs.append((out, err))
  stops = [int(out.split("preempted, checkpoint saved: step ")[1].split(",")[0]) for out, _ in outs]
  assert stops[0] == stops[1] and 2 <= stops[0] < 2000
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == stops[0]
  losses = [float(out.split("loss/total=")[1].split(",")[0]) for out, _ in outs]
  assert np.isfinite(losses[0]) and losses[0] == losses[1]
  # Their compiled programs are cached apart from single-process ones (perf.enable_compilation_cache).
  assert any(f.startswith("jit_step") for f in os.listdir(os.path.join(os.environ["E2ETTS_XLA_CACHE"], "2-processes")))
