"""Held-out loss terms: fixed batches, draw sets, and re-reading a run's checkpoints (held_out.reread, moves)."""
import json

import jax
import numpy as np
import pytest

from e2etts_jax import checkpoint, config_lib, held_out, input_pipeline, sharding, trainer
from tests.conftest import tiny_train_config


def _mesh():
  return sharding.make_mesh(config_lib.get_config("tiny").mesh, jax.devices()[:1])


@pytest.fixture(scope="module")
def run(tiny_shards, tmp_path_factory):
  """A tiny run of 2 + 2 steps that reads its held-out batch under 2 draw sets at steps 0, 2 (stage 1's end and
  stage 2's start) and 4, with checkpoints at 2 and 4."""
  c = tiny_train_config(tiny_shards, steps=(2, 2, 0))
  c.data.batch_size = 2            # the 40-utterance corpus holds out 2: one full held-out batch
  c.train.update(eval_batches=1, eval_draws=2)
  workdir = str(tmp_path_factory.mktemp("held_out") / "run")
  result = trainer.train(c, workdir, progress=False, mesh=_mesh())
  return workdir, {(int(r["step"]), int(r["stage"])): r for r in result.evals}


def test_logged_values_are_the_mean_over_draw_sets(run, monkeypatch):
  """Each logged value is the mean of the draw sets' values. Set 0's keys do not depend on the count; the sets
  differ on a term that takes draws (the FM's flow times and noise) and agree on one that takes none (the LLM's
  next-token loss)."""
  workdir, logged = run
  sets = held_out.reread(workdir, [2], stage="stage1", draws=2, progress=False)[2]
  alone = held_out.reread(workdir, [2], stage="stage1", draws=1, progress=False)[2]
  # Read in one call with set 1 or alone: the same keys, so the same values up to float rounding.
  assert alone[0] == pytest.approx(sets[0], rel=1e-6)
  assert abs(sets[0]["loss/fm"] - sets[1]["loss/fm"]) > 1e-4
  assert sets[0]["loss/llm"] == pytest.approx(sets[1]["loss/llm"], rel=1e-7)
  monkeypatch.setattr(held_out, "CHUNK", 1)   # one set per call: the same values
  for one, both in zip(held_out.reread(workdir, [2], stage="stage1", draws=2, progress=False)[2], sets):
    assert one == pytest.approx(both, rel=1e-6)
  for k in ("loss/fm", "loss/llm", "loss/rm", "loss/total", "llm/text_gain"):
    assert logged[(2, 1)][k] == pytest.approx((sets[0][k] + sets[1][k]) / 2, rel=1e-6), k


def test_reread_reads_both_ends_of_a_stage_as_training_did(run):
  """Stage 2's held-out terms re-read at its first checkpoint (written by stage 1) and its last equal what training
  logged at those steps, and `moves` gives the logged move."""
  workdir, logged = run
  read = held_out.reread(workdir, [2, 4], stage="stage2", draws=2, progress=False)
  means = {s: {k: np.mean([v[k] for v in read[s]]) for k in read[s][0]} for s in read}
  assert "loss/usage" not in means[2]   # stage 2's terms, not stage 1's, though stage 1 wrote that checkpoint
  for step in (2, 4):
    for k in means[step]:
      assert logged[(step, 2)][k] == pytest.approx(means[step][k], rel=1e-6), (step, k)
  moved = held_out.moves(read[2], read[4])
  for k, m in moved.items():
    assert m["move"] == pytest.approx(logged[(4, 2)][k] - logged[(2, 2)][k], rel=1e-5, abs=1e-7), k
    assert m["sets"] == 2 and 0 <= m["sets_rising"] <= 2
  assert moved["loss/llm"]["move_se"] == 0.0   # the LLM term takes no draws: both sets move alike


def test_moves_against_hand_computed_values():
  start = [{"loss/a": 1.0, "loss/b": 0.5}, {"loss/a": 3.0, "loss/b": 0.5}, {"loss/a": 2.0, "loss/b": 0.5}]
  end = [{"loss/a": 2.0}, {"loss/a": 5.0}, {"loss/a": 1.0}]
  m = held_out.moves(start, end)
  assert list(m) == ["loss/a"]   # a term read at one end only has no move
  assert m["loss/a"]["start"] == pytest.approx(2.0) and m["loss/a"]["end"] == pytest.approx(8 / 3)
  assert m["loss/a"]["move"] == pytest.approx(2 / 3)
  assert m["loss/a"]["move_se"] == pytest.approx(np.std([1.0, 2.0, -1.0], ddof=1) / np.sqrt(3))
  assert m["loss/a"]["sets_rising"] == 2 and m["loss/a"]["sets"] == 3
  assert held_out.moves(start[:1], end[:1])["loss/a"]["move_se"] is None
  with pytest.raises(ValueError, match="3 draw sets at the start but 2 at the end"):
    held_out.moves(start, end[:2])


def test_reread_names_what_is_missing(run, tmp_path):
  workdir, _ = run
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint for step 3 .*have: \[2, 4\]"):
    held_out.reread(workdir, [3], progress=False)
  with pytest.raises(checkpoint.CheckpointError, match="not a training workdir"):
    held_out.reread(str(tmp_path), [2], progress=False)
  with pytest.raises(ValueError, match="draws=0"):
    held_out.reread(workdir, [2], draws=0, progress=False)


def test_eval_batches_minus_one_reads_every_full_test_batch(tiny_shards):
  c = tiny_train_config(tiny_shards)
  c.data.batch_size = 1            # the 40-utterance corpus holds out 2
  counts = {}
  for n in (-1, 1, 5):
    c.train.eval_batches = n
    counts[n] = [b["mel"].shape[0] for b in held_out.eval_batches(c, _mesh())]
  assert counts == {-1: [1, 1], 1: [1], 5: [1, 1]}


def test_eval_batches_take_one_shape_whatever_the_buckets(tiny_shards):
  """Held-out batches pad to data.max_frames (one eval program per stage), even where the length buckets would
  pad one to a shorter bucket."""
  c = tiny_train_config(tiny_shards)
  c.data.batch_size = 1
  c.train.eval_batches = -1
  lengths = input_pipeline.load_index(tiny_shards, "test")["num_frames"]
  step = c.tokenizer.downsample
  c.data.bucket_boundaries = (-(-min(lengths) // step) * step, c.data.max_frames)   # the shortest fits the first
  plan = input_pipeline.make_plan(c, "test", seed=c.seed, shuffle=False, drop_remainder=True)
  assert min(plan.batch(i)[2] for i in range(plan.batches_per_epoch)) < c.data.max_frames
  assert [b["mel"].shape[:2] for b in held_out.eval_batches(c, _mesh())] == [(1, c.data.max_frames)] * len(lengths)


def test_diagnose_cli_writes_the_moves(run, tmp_path, capsys):
  from absl import app
  from e2etts_jax.cli import diagnose as cli
  workdir, logged = run
  assert cli.main(["e2etts-diagnose", f"--workdir={workdir}", "--held_out_steps=2,4", "--held_out_stage=stage2",
                   "--draws=2", f"--out={tmp_path}", "--noprogress"]) == 0
  with open(tmp_path / "held_out.json") as f:
    saved = json.load(f)
  assert saved["draws"] == 2 and sorted(saved["sets"]) == ["2", "4"]
  move = saved["moves"]["loss/llm"]["move"]
  assert move == pytest.approx(logged[(4, 2)]["loss/llm"] - logged[(2, 2)]["loss/llm"], rel=1e-5)
  assert f"| loss/llm | {logged[(2, 2)]['loss/llm']:.4f} | {logged[(4, 2)]['loss/llm']:.4f} | {move:+.4f} |" in \
      capsys.readouterr().out
  for bad, message in [("--held_out_stage=stage4", "choose from stage1"), ("--held_out_steps=2,x", "integers")]:
    with pytest.raises(app.UsageError, match=message):
      cli.main(["e2etts-diagnose", f"--workdir={workdir}", "--held_out_steps=2,4", bad])


def test_each_draw_set_is_logged_and_gives_the_summary_its_spread(run):
  """With several draw sets training logs each set's values (split 'eval_set'): they are what `reread` reads, and
  the main job's summary takes each stage's move's standard error over them."""
  from e2etts_jax import main_job, metric_writer
  workdir, logged = run
  rows = [r for r in metric_writer.read_metrics(workdir, split="eval_set") if (r["step"], r["stage"]) == (4, 2.0)]
  assert [int(r["draw"]) for r in rows] == [0, 1]
  read = held_out.reread(workdir, [2, 4], stage="stage2", draws=2, progress=False)
  for r, values in zip(rows, read[4]):
    for k, v in values.items():
      assert r[k] == pytest.approx(v, rel=1e-6), k
  se = main_job.final_losses(workdir)["stage2"]
  for k, m in held_out.moves(read[2], read[4]).items():
    if k.startswith("loss/"):
      assert se[f"move_se/{k}"] == pytest.approx(m["move_se"], rel=1e-4, abs=1e-7), k
