"""The Grain pipeline: batch contract, determinism, exact resume through Orbax, process sharding, bucketing."""
import json
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import soundfile as sf

from tests.conftest import sine_wave
from e2etts_jax import config_lib, input_pipeline, prepare, records, sharding
from e2etts_jax import text as text_lib

SR = 16000
NUM_TRAIN = 44
NUM_TEST = 5
WORDS = "the a cat dog sun red big old sea sky tree".split()


def _config(shards):
  c = config_lib.get_config("tiny")
  c.data.shards = str(shards)
  c.data.batch_size = 8  # one row per fake device
  return c


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline_corpus")
  rng = np.random.default_rng(0)
  os.makedirs(root / "wavs")
  rows = []
  for i in range(NUM_TRAIN + NUM_TEST):
    sec = float(rng.uniform(0.5, 3.9))
    rid = f"utt{i:03d}"
    sf.write(str(root / "wavs" / f"{rid}.wav"), sine_wave(sec, SR, freq=120 + 7 * i, seed=i), SR,
             subtype="PCM_16")
    words = " ".join(rng.choice(WORDS, size=max(1, int(sec * 1.5))))
    rows.append({"id": rid, "audio": f"wavs/{rid}.wav", "text": words, "speaker": f"spk{i % 3}",
                 "rate_class": i % 3, "split": "test" if i >= NUM_TRAIN else "train"})
  with open(root / "manifest.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\n")
  out = root / "shards"
  s = prepare.prepare(_config(out), str(root / "manifest.jsonl"), str(out), num_workers=1, progress=False,
                      verbose=False)
  assert s["counts"] == {"train": NUM_TRAIN, "test": NUM_TEST}, s
  return out


def _take(ds_or_it, n):
  it = iter(ds_or_it)
  return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_dataset_info(shards):
  info = input_pipeline.dataset_info(str(shards))
  assert info["counts"] == {"train": NUM_TRAIN, "test": NUM_TEST}
  assert info["speakers"] == ["spk0", "spk1", "spk2"] and info["num_speakers"] == 3
  assert info["ctc_vocab_size"] == 29 and 20 <= info["text_vocab_size"] <= 64
  assert os.path.exists(info["spm_model"])
  # With the config: the trainer's DataInfo, after checking the shards fit the config.
  data_info = input_pipeline.dataset_info(str(shards), _config(shards))
  assert (data_info.text_vocab_size, data_info.num_ctc_classes) == (info["text_vocab_size"], 29)
  assert (data_info.num_speakers, data_info.num_aux) == (3, 2)


def test_batch_contract(shards):
  c = _config(shards)
  batches = _take(input_pipeline.make_dataset(c, "train", seed=0, num_epochs=1), NUM_TRAIN // 8)
  index = input_pipeline.load_index(str(shards), "train")
  total_frames = 0
  for b in batches:
    f = b["mel"].shape[1]
    assert f in c.data.bucket_boundaries and f % c.tokenizer.downsample == 0
    assert b["mel"].shape == (8, f, c.audio.n_mels) and b["mel"].dtype == np.float32
    assert b["mel_mask"].shape == (8, f) and b["mel_mask"].dtype == bool
    assert b["text_ids"].shape == (8, c.text.max_text_tokens) and b["text_ids"].dtype == np.int32
    assert b["ctc_ids"].shape == (8, c.text.max_ctc_len) and b["ctc_ids"].dtype == np.int32
    assert b["speaker"].shape == (8,) and b["speaker"].dtype == np.int32
    assert b["aux"].shape == (8, 2) and b["aux"].dtype == np.int32 and b["valid"].all()
    assert not b["mel"][~b["mel_mask"]].any()  # padding frames are 0.0
    np.testing.assert_array_equal(b["text_mask"], b["text_ids"] != 0)
    np.testing.assert_array_equal(b["ctc_mask"], b["ctc_ids"] != 0)
    lens = b["mel_mask"].sum(1)
    assert (lens > 0).all() and (b["mel_mask"][:, :1]).all()  # masks are left-aligned prefixes
    assert np.all(np.diff(b["mel_mask"].astype(int), axis=1) <= 0)
    # The bucket is the smallest boundary holding the longest row.
    assert f == min(x for x in c.data.bucket_boundaries if x >= lens.max())
    assert set(b["aux"][:, 1]) == {-1} and set(b["aux"][:, 0]) <= {0, 1, 2}
    total_frames += lens.sum()
  assert total_frames <= sum(index["num_frames"])


def test_plan_covers_each_epoch(shards):
  index = input_pipeline.load_index(str(shards), "train")
  frames = np.asarray(index["num_frames"])
  plan = input_pipeline.BatchPlan(frames, np.arange(len(frames)), (50, 100, 200), 8, seed=3)
  assert plan.batches_per_epoch == NUM_TRAIN // 8
  seen = []
  for epoch in range(3):
    rows, partners, lens = plan.epoch(epoch)
    assert len(np.unique(rows)) == rows.size == NUM_TRAIN // 8 * 8 and (rows >= 0).all()
    assert (partners == -1).all()  # no joining unless asked
    for r, f in zip(rows, lens):
      assert frames[r].max() <= f
    seen.append(rows)
  assert not np.array_equal(seen[0], seen[1])  # reshuffled every epoch


def test_same_seed_same_batches(shards):
  c = _config(shards)
  a = _take(input_pipeline.make_dataset(c, "train", seed=7), 9)  # crosses an epoch boundary (5 per epoch)
  b = _take(input_pipeline.make_dataset(c, "train", seed=7), 9)
  _assert_same(a, b)
  other = _take(input_pipeline.make_dataset(c, "train", seed=8), 9)
  assert any(x["mel"].shape != y["mel"].shape or not np.array_equal(x["mel"], y["mel"])
             for x, y in zip(a, other))


def test_exact_resume_through_orbax(shards, tmp_path):
  c = _config(shards)
  mesh = sharding.make_mesh(c.mesh)
  it = input_pipeline.make_global_iterator(c, mesh, "train", seed=1)
  _take(it, 4)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  state = {"step": np.asarray(4, np.int32)}
  mngr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                       data_iter=input_pipeline.iterator_save_args(it)))
  mngr.wait_until_finished()
  expected = _take(it, 5)  # continues past the end of epoch 0
  it.close()

  fresh = input_pipeline.make_global_iterator(c, mesh, "train", seed=1)
  mngr2 = ocp.CheckpointManager(tmp_path / "ckpt")
  restored = mngr2.restore(mngr2.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(state), data_iter=input_pipeline.iterator_restore_args(fresh)))
  assert int(restored["state"]["step"]) == 4
  _assert_same(_take(fresh, 5), expected)


def test_resume_with_worker_processes(shards, tmp_path):
  c = _config(shards)
  reference = _take(input_pipeline.make_dataset(c, "train", seed=2, process_index=0, process_count=1), 6)
  c.data.num_workers = 2
  it = iter(input_pipeline.make_dataset(c, "train", seed=2, process_index=0, process_count=1))
  _assert_same(_take(it, 2), reference[:2])  # worker processes do not change the batches
  input_pipeline.save_iterator_state(str(tmp_path / "it"), it)
  _assert_same(_take(it, 4), reference[2:])
  it.close()
  fresh = iter(input_pipeline.make_dataset(c, "train", seed=2, process_index=0, process_count=1))
  input_pipeline.restore_iterator_state(str(tmp_path / "it"), fresh)
  _assert_same(_take(fresh, 4), reference[2:])
  fresh.close()


def test_two_processes_split_each_global_batch(shards):
  c = _config(shards)
  whole = _take(input_pipeline.make_dataset(c, "train", seed=4, process_index=0, process_count=1), 7)
  parts = [_take(input_pipeline.make_dataset(c, "train", seed=4, process_index=p, process_count=2), 7)
           for p in range(2)]
  for g, p0, p1 in zip(whole, *parts):
    assert p0["mel"].shape[0] == p1["mel"].shape[0] == 4
    assert p0["mel"].shape == p1["mel"].shape  # lockstep: same bucket length on both processes
    for k in g:
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), g[k], err_msg=k)
  # Disjoint: the plan's global batch has distinct records, and the halves are its two row ranges.
  index = input_pipeline.load_index(str(shards), "train")
  plan = input_pipeline.BatchPlan(np.asarray(index["num_frames"]), np.arange(NUM_TRAIN), (50, 100, 200), 8,
                                  seed=4)
  for step in range(7):
    rows, _, _ = plan.batch(step)
    assert not set(rows[:4]) & set(rows[4:]) and len(set(rows)) == 8


def _padding_fraction(ds, n):
  masks = [b["mel_mask"] for b in _take(ds, n)]
  return 1.0 - sum(m.sum() for m in masks) / sum(m.size for m in masks)


def test_bucketing_reduces_padding(shards):
  c = _config(shards)
  n = 3 * (NUM_TRAIN // 8)
  bucketed = _padding_fraction(input_pipeline.make_dataset(c, "train", seed=5), n)
  plain = _padding_fraction(input_pipeline.make_dataset(c, "train", seed=5, bucketing=False), n)
  print(f"padding fraction: bucketed {bucketed:.3f}, unbucketed {plain:.3f}")
  assert bucketed < plain - 0.1 and bucketed < 0.35


def _dynamic_config(shards, batch_size=2, multiple=2):
  c = _config(shards)
  c.data.update(batch_size=batch_size, dynamic_batch=True, batch_multiple=multiple)
  return c


def test_dynamic_plan_holds_more_rows_in_shorter_buckets(shards):
  index = input_pipeline.load_index(str(shards), "train")
  frames = np.asarray(index["num_frames"])
  plan = input_pipeline.make_plan(_dynamic_config(shards), "train", seed=3)
  fixed = input_pipeline.make_plan(_config(shards), "train", seed=3)
  np.testing.assert_array_equal(plan.bucket_rows, [8, 4, 2])   # 2 * 200 // (50, 100, 200)
  # The count per epoch follows from the buckets' sizes: rows carried up from a bucket fill the next one's batches.
  sizes = [int(((lo < frames) & (frames <= hi)).sum()) for lo, hi in zip((0, 50, 100), (50, 100, 200))]
  count, carry = 0, 0
  for size, rows in zip(sizes, (8, 4, 2)):
    count, carry = count + (carry + size) // rows, (carry + size) % rows
  assert plan.batches_per_epoch == count
  # Fewer batches per epoch than 2 rows each would take: the shorter buckets' batches hold more rows.
  assert plan.batches_per_epoch < NUM_TRAIN // 2
  seen = []
  for epoch in range(3):
    rows, partners, lens = plan.epoch(epoch)
    assert len(rows) == plan.batches_per_epoch and (partners == -1).all()
    used = []
    for step in range(plan.batches_per_epoch):
      r, _, f = plan.batch(epoch * plan.batches_per_epoch + step)
      assert f == lens[step] and len(r) == plan.rows_for(f) == 2 * (200 // f)
      assert (r >= 0).all() and frames[r].max() <= f and len(r) * f <= 2 * 200   # within the frame budget
      assert (rows[step, len(r):] == -1).all()
      used += list(r)
    assert len(set(used)) == len(used) >= NUM_TRAIN - 1   # each record once; at most a partial last batch of 2 dropped
    seen.append(used)
  assert seen[0] != seen[1]   # reshuffled every epoch
  # The same seed's plan is the same; the held-out split and an unshuffled read keep fixed batches.
  np.testing.assert_array_equal(input_pipeline.make_plan(_dynamic_config(shards), "train", seed=3).epoch(1)[0],
                                plan.epoch(1)[0])
  for split, shuffle in (("test", False), ("train", False)):
    other = input_pipeline.make_plan(_dynamic_config(shards), split, seed=3, shuffle=shuffle)
    assert not other.dynamic and set(other.bucket_rows) == {2}
  assert not fixed.dynamic and fixed.batches_per_epoch == NUM_TRAIN // 8
  with pytest.raises(ValueError, match="dynamic batches need bucketing"):
    input_pipeline.BatchPlan(frames, np.arange(len(frames)), (50, 100, 200), 2, seed=0, bucketing=False,
                             dynamic=True)
  # Rows are the frame budget over the bucket's length, rounded down to the row multiple.
  for multiple, expected in ((1, [16, 13, 4]), (2, [16, 12, 4]), (4, [16, 12, 4])):
    odd = input_pipeline.BatchPlan(frames, np.arange(len(frames)), (50, 60, 200), 4, seed=0, dynamic=True,
                                   multiple=multiple)
    np.testing.assert_array_equal(odd.bucket_rows, expected)
    assert (odd.bucket_rows * odd.boundaries <= 4 * 200).all()
  with pytest.raises(ValueError, match="the row multiple 3 must divide the batch 4"):
    input_pipeline.BatchPlan(frames, np.arange(len(frames)), (50, 60, 200), 4, seed=0, dynamic=True, multiple=3)


def test_dynamic_batches_load_their_rows_and_split_over_processes(shards):
  c = _dynamic_config(shards)
  plan = input_pipeline.make_plan(c, "train", seed=4)
  n = plan.batches_per_epoch + 2   # into the next epoch
  index = input_pipeline.load_index(str(shards), "train")
  whole = _take(input_pipeline.make_dataset(c, "train", seed=4, process_index=0, process_count=1), n)
  parts = [_take(input_pipeline.make_dataset(c, "train", seed=4, process_index=p, process_count=2), n)
           for p in range(2)]
  assert len({b["mel"].shape for b in whole}) > 1
  for step, (b, p0, p1) in enumerate(zip(whole, *parts)):
    rows, _, f = plan.batch(step)
    assert b["mel"].shape[:2] == (len(rows), f) and b["valid"].all()
    np.testing.assert_array_equal(b["mel_mask"].sum(1), np.asarray(index["num_frames"])[rows])
    for k in b:
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), b[k], err_msg=k)


def test_dynamic_batches_resume_exactly_through_orbax(shards, tmp_path):
  c = _dynamic_config(shards, batch_size=8, multiple=8)   # one row per fake device in the longest bucket
  mesh = sharding.make_mesh(c.mesh)
  it = input_pipeline.make_global_iterator(c, mesh, "train", seed=1)
  first = _take(it, 2)
  assert {b["mel"].shape[0] for b in first} <= {8, 16, 32}
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(2, args=ocp.args.Composite(data_iter=input_pipeline.iterator_save_args(it)))
  mngr.wait_until_finished()
  assert input_pipeline.make_plan(c, "train", seed=1).batches_per_epoch < 2 + 5
  expected = _take(it, 5)   # past the end of the epoch
  it.close()
  fresh = input_pipeline.make_global_iterator(c, mesh, "train", seed=1)
  ocp.CheckpointManager(tmp_path / "ckpt").restore(2, args=ocp.args.Composite(
      data_iter=input_pipeline.iterator_restore_args(fresh)))
  _assert_same(_take(fresh, 5), expected)
  # Rows that the mesh's batch shards (or the processes) cannot split are refused before any batch is read.
  c.data.batch_multiple = 4
  with pytest.raises(ValueError, match=r"data.batch_multiple=4 .* mesh's batch shards \(data\*fsdp = 8\)"):
    input_pipeline.make_global_iterator(c, mesh, "train", seed=1)
  with pytest.raises(ValueError, match="data.batch_multiple=4 .* process count 8"):
    input_pipeline.make_dataset(c, "train", seed=1, process_index=0, process_count=8)


def _joined_config(shards, prob=1.0):
  c = _config(shards)
  c.data.join_prob = prob
  return c


def test_join_plan_pairs_fitting_records_of_one_speaker(shards):
  c = _joined_config(shards)
  index = input_pipeline.load_index(str(shards), "train")
  frames, speakers = np.asarray(index["num_frames"]), np.asarray(index["speakers"])
  text, ctc = np.asarray(index["num_text_tokens"]), np.asarray(index["num_ctc"])
  plan = input_pipeline.make_plan(c, "train", seed=3)
  plain = input_pipeline.make_plan(_joined_config(shards, 0.0), "train", seed=3)
  assert plan.batches_per_epoch == plain.batches_per_epoch == NUM_TRAIN // 8
  gap, joined = c.tokenizer.downsample, 0
  for epoch in range(3):
    rows, partners, lens = plan.epoch(epoch)
    assert len(np.unique(rows)) == rows.size and (rows >= 0).all()  # each record anchors one row at most
    has = partners >= 0
    joined += has.sum()
    a, p = rows[has], partners[has]
    assert (p != a).all() and (speakers[p] == speakers[a]).all()
    assert (text[a] + text[p] <= c.text.max_text_tokens).all()
    assert (ctc[a] + 1 + ctc[p] <= c.text.max_ctc_len).all()  # + the space between them
    row_len = frames[rows] + np.where(has, gap + frames[partners], 0)
    for r, f in zip(row_len, lens):
      assert f == min(x for x in c.data.bucket_boundaries if x >= r.max())  # bucketed by the joined length
    # A record left alone had no partner that fits (each anchor draws up to 4 times; probability 1 here).
    alone = rows[~has]
    room = c.data.max_frames - gap - frames[alone]
    fits = [(frames[(speakers == speakers[x]) & (np.arange(len(frames)) != x)] <= r).sum() for x, r in
            zip(alone, room)]
    assert np.mean(np.asarray(fits) == 0) > 0.5
  assert joined > 0.3 * 3 * rows.size
  # Joining draws from its own generator: without it the plan is the plain one, batch for batch.
  off = input_pipeline.make_plan(_joined_config(shards, 0.0), "train", seed=3)
  for epoch in range(2):
    for x, y in zip(off.epoch(epoch), plain.epoch(epoch)):
      np.testing.assert_array_equal(x, y)
  # Shards whose index predates the speakers field: the speakers come from the records themselves.
  info = input_pipeline.dataset_info(str(shards))
  np.testing.assert_array_equal(input_pipeline._record_speakers(info["shards"]["train"], len(frames)), speakers)


def test_joined_rows_hold_both_records(shards):
  c = _joined_config(shards)
  plan = input_pipeline.make_plan(c, "train", seed=6)
  source = grain.sources.ArrayRecordDataSource(input_pipeline.dataset_info(str(shards))["shards"]["train"])
  rec = lambda i: records.decode(source[int(i)])
  batches = _take(input_pipeline.make_dataset(c, "train", seed=6), plan.batches_per_epoch + 1)
  _assert_same(batches, _take(input_pipeline.make_dataset(c, "train", seed=6), plan.batches_per_epoch + 1))
  silence, checked = np.log(c.audio.log_floor), 0
  for step, b in enumerate(batches):
    rows, partners, frames = plan.batch(step)
    assert b["mel"].shape[1] == frames
    for r, (i, j) in enumerate(zip(rows, partners)):
      x = rec(i)
      parts = [x] if j < 0 else [x, rec(j)]
      gap = c.tokenizer.downsample
      mel = np.concatenate([parts[0]["mel"]] + ([np.full([gap, c.audio.n_mels], silence, np.float32), parts[1]["mel"]]
                                                if j >= 0 else []))
      n = int(b["mel_mask"][r].sum())
      assert n == len(mel)
      np.testing.assert_array_equal(b["mel"][r, :n], mel)
      text = np.concatenate([p["text_ids"] for p in parts])
      np.testing.assert_array_equal(b["text_ids"][r][b["text_mask"][r]], text)
      ctc = np.concatenate([parts[0]["ctc_ids"]] + ([[text_lib.ctc_separator(c)[0]], parts[1]["ctc_ids"]]
                                                     if j >= 0 else []))
      np.testing.assert_array_equal(b["ctc_ids"][r][b["ctc_mask"][r]], ctc)
      assert b["speaker"][r] == x["speaker"] == parts[-1]["speaker"]
      rate = [p["aux"][0] for p in parts]
      assert b["aux"][r, 0] == (rate[0] if len(set(rate)) == 1 else -1)  # a label the two disagree on: unknown
      checked += j >= 0
  assert checked > 0


def test_joining_reduces_padding(shards):
  n = 3 * (NUM_TRAIN // 8)
  joined = _padding_fraction(input_pipeline.make_dataset(_joined_config(shards), "train", seed=5), n)
  single = _padding_fraction(input_pipeline.make_dataset(_config(shards), "train", seed=5), n)
  print(f"padding fraction: joined {joined:.3f}, single {single:.3f}")
  assert joined < single - 0.05


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2)])
def test_global_arrays_are_sharded(shards, mesh_shape):
  c = _config(shards)
  c.mesh.data, c.mesh.fsdp = mesh_shape
  mesh = sharding.make_mesh(c.mesh)
  assert mesh.devices.size == 8
  it = input_pipeline.make_global_iterator(c, mesh, "train", seed=0)
  batch = next(it)
  assert set(batch) == set(input_pipeline.BATCH_KEYS)
  for k, v in batch.items():
    assert isinstance(v, jax.Array) and v.shape[0] == 8
    assert v.sharding == sharding.batch_sharding(mesh, v.ndim), k
    assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape[0] == 1
  it.close()


def test_eval_split_keeps_every_record(shards):
  c = _config(shards)
  batches = _take(input_pipeline.make_dataset(c, "test", seed=0, num_epochs=1, shuffle=False), 1)
  (b,) = batches
  assert b["valid"].sum() == NUM_TEST and not b["valid"][NUM_TEST:].any()
  assert not b["mel_mask"][~b["valid"]].any() and (b["aux"][~b["valid"]] == -1).all()
  with pytest.raises(StopIteration):
    next(iter(_iter_after(input_pipeline.make_dataset(c, "test", seed=0, num_epochs=1, shuffle=False), 1)))


def _iter_after(ds, n):
  it = iter(ds)
  for _ in range(n):
    next(it)
  return it


def test_mismatched_audio_config_is_refused(shards):
  c = _config(shards)
  c.audio.n_mels = 40
  with pytest.raises(ValueError, match="n_mels"):
    input_pipeline.make_dataset(c, "train", seed=0)
