"""The Grain input pipeline: prepared ArrayRecord shards -> length-bucketed, padded, sharded global batches.

Design. Every epoch has a seeded *batch plan* (`BatchPlan`): record indices are grouped by length bucket
(`data.bucket_boundaries`), shuffled inside each bucket, cut into global batches, and the batch order is
shuffled. Leftovers of a bucket (fewer than a batch) are carried up into the next bucket, so per epoch only
`num_records % batch_size` records are dropped (different ones each epoch) while padding stays bounded by the
bucket widths. With `data.join_prob` a training row may hold two utterances of one speaker, joined with a token
of silence between (`JoinSpec`): each record still anchors one row per epoch, so the count of batches stays fixed,
while fewer frames are padding and the LLM reads sentence pairs it never saw together. With `data.dynamic_batch`
a training batch of a shorter bucket holds more rows (`BatchPlan.bucket_rows`), so every batch pads to about the
same number of frames. The plan is a pure function of (seed, epoch), so a `grain.MapDataset` of batch positions
(`range(batches_per_epoch).repeat(num_epochs)`) mapped to "load + pad my rows of global batch i" is
deterministic, needs no shuffle buffers, and its iterator state is a single index: checkpoints are tiny and a
restored iterator yields exactly the batches the uninterrupted one would have.

Multi-host: every process computes the same plan and takes rows [p * B/P, (p+1) * B/P) of every global batch,
so all processes step in lockstep with identical shapes (the frame length F of a batch comes from the index,
not from the rows a process happens to load). `make_global_iterator` assembles the per-process rows into global
`jax.Array`s sharded over the batch axes (`sharding.batch_sharding`).

Batch (host numpy from `make_dataset`, jax.Array from `make_global_iterator`); B = rows of this process:
  mel       float32 [B, F, n_mels]  F = a bucket boundary (a multiple of tokenizer.downsample); padding 0.0
  mel_mask  bool    [B, F]
  text_ids  int32   [B, text.max_text_tokens]  sentencepiece ids, right-padded with 0;  text_mask bool
  ctc_ids   int32   [B, text.max_ctc_len]      CTC labels (0 = blank never occurs), 0-padded; ctc_mask bool
  speaker   int32   [B]                         index into dataset_info(...)['speakers'] (0 on padding rows)
  aux       int32   [B, num_aux]                classes for rm.aux_tasks in order; -1 = unknown
  valid     bool    [B]                         False for padding rows (only when drop_remainder=False)

Checkpointing the iterator with Orbax (the trainer's CheckpointManager):
  it = input_pipeline.make_global_iterator(config, mesh, "train", seed=config.seed)
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data_iter=input_pipeline.iterator_save_args(it)))
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                        data_iter=input_pipeline.iterator_restore_args(it)))
  # `it` itself now continues from the saved position (restored["data_iter"] is the same object).
Each process writes/reads its own `process_{i}-of-{n}.json` (grain's handler). A restore needs the same shards,
seed, batch size, process count and num_workers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import grain
import jax
from absl import flags
import numpy as np
from etils import epath

from e2etts_jax import audio, config_lib, records, sharding
from e2etts_jax import text as text_lib

BATCH_KEYS = ("mel", "mel_mask", "text_ids", "text_mask", "ctc_ids", "ctc_mask", "speaker", "aux", "valid")
ITERATOR_ITEM = "data_iter"  # suggested Composite item name for the iterator state
_AUDIO_KEYS = ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "fmin", "fmax", "log_floor")


# ------------------------------------------------------------------------------------------------- metadata


def dataset_info(shards_dir: str, config=None) -> Any:
  """What `e2etts-prepare` wrote about `shards_dir`.

  Without `config`: a dict with speakers (names; index = speaker id), num_speakers, text_vocab_size
  (sentencepiece, incl. pad/unk; at most text.vocab_size), ctc_vocab_size (incl. blank), ctc_units, aux_names,
  counts {split: records}, hours {split: hours}, spm_model (path), audio (the audio config the features were
  computed with), shards {split: [paths]}.
  With `config`: the `system.DataInfo` the networks are built from, after checking that the shards were
  prepared with this config's audio settings and CTC units (raises ValueError otherwise).
  """
  path = os.path.join(shards_dir, "info.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run e2etts-prepare --out {shards_dir} first")
  with open(path) as f:
    info = json.load(f)
  splits = info["splits"]
  out = {
      "speakers": info["speakers"], "num_speakers": info["num_speakers"],
      "text_vocab_size": info["text_vocab_size"], "ctc_vocab_size": info["ctc_vocab_size"],
      "ctc_units": info["ctc_units"], "aux_names": info["aux_names"],
      "counts": {s: v["num_records"] for s, v in splits.items()},
      "hours": {s: v["hours"] for s, v in splits.items()},
      "spm_model": os.path.join(shards_dir, "spm.model"), "audio": info["audio"],
      "shards": {s: [os.path.join(shards_dir, n) for n in v["shards"]] for s, v in splits.items()},
  }
  if config is None:
    return out
  _check_compatible(config, shards_dir, out)
  from e2etts_jax import system  # the model definitions are only needed by this caller (not by data workers)
  return system.DataInfo(text_vocab_size=out["text_vocab_size"], num_ctc_classes=out["ctc_vocab_size"],
                         num_speakers=out["num_speakers"], num_aux=len(aux_columns(config)))


def load_index(shards_dir: str, split: str) -> dict[str, list]:
  """Per-record ids, lengths (num_frames, num_text_tokens, num_ctc) and `speakers` (shards prepared before that
  field lack it) in data-source order."""
  with open(os.path.join(shards_dir, f"{split}-index.json")) as f:
    return json.load(f)


def _check_compatible(config, shards_dir: str, info: dict) -> None:
  bad = [k for k in _AUDIO_KEYS if not np.isclose(float(info["audio"][k]), float(config.audio[k]))]
  if bad:
    raise ValueError(f"{shards_dir} was prepared with other audio settings ("
                     + ", ".join(f"audio.{k}={info['audio'][k]} vs config {config.audio[k]}" for k in bad)
                     + "): re-run e2etts-prepare with this config")
  if info["ctc_units"] != config.text.ctc_units:
    raise ValueError(f"{shards_dir} has ctc_units={info['ctc_units']!r} but text.ctc_units="
                     f"{config.text.ctc_units!r}: re-run e2etts-prepare with this config")


def aux_columns(config) -> list[int]:
  """Positions of rm.aux_tasks in the records' aux labels (records.AUX_NAMES)."""
  cols = []
  for name in config_lib.parse_list(config.rm.aux_tasks):
    if name not in records.AUX_NAMES:
      raise ValueError(f"rm.aux_tasks names {name!r}; the prepared records have {records.AUX_NAMES}")
    cols.append(records.AUX_NAMES.index(name))
  return cols


# -------------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class JoinSpec:
  """Which records may share a training row (`data.join_prob`), and the limits the joined row must keep.

  A joined row is the anchor record, `gap` frames of silence, then a partner of the same speaker: its mel
  `lengths[a] + gap + lengths[p] <= max_frames`, its text `text_tokens[a] + text_tokens[p] <= max_text` and its
  CTC labels `ctc_labels[a] + sep + ctc_labels[p] <= max_ctc`. A gap of one token's frames (`tokenizer.downsample`)
  also keeps the joined CTC target feasible: it adds at least one CTC frame for the separator.
  """
  prob: float
  speakers: np.ndarray      # [num_records] speaker index
  text_tokens: np.ndarray   # [num_records]
  ctc_labels: np.ndarray    # [num_records]
  max_frames: int
  max_text: int
  max_ctc: int
  gap: int
  sep: int


class BatchPlan:
  """The seeded grouping of record indices into global batches, per epoch.

  Args:
    lengths: [num_records] mel frames per record (data-source order).
    eligible: record indices that may be used (others are never planned).
    boundaries: increasing frame lengths a batch may be padded to.
    global_batch: rows per global batch (with `dynamic`, per batch of the longest bucket).
    bucketing: group by length bucket (True) or batch a plain permutation (False; each batch is still padded
      to the smallest boundary that fits its longest row, so both modes share the same shapes).
    join: where given, every row is still anchored on one record (each eligible record anchors one row per
      epoch, so the count of batches is unchanged), and with probability `join.prob` a random partner that fits
      (`JoinSpec`) is appended to it; rows are bucketed by their joined length.
    dynamic: a batch cut from bucket k holds global_batch * boundaries[-1] / boundaries[k] rows, rounded down to
      a multiple of `multiple`, and is padded to boundaries[k] (`bucket_rows`, `rows_for`): every batch pads to at
      most global_batch * boundaries[-1] frames. Needs bucketing and no joining (a joined row's length, so its
      bucket, changes every epoch).
  """

  _JOIN_TRIES = 4  # partner draws per anchor before it stays alone (a long anchor has few that fit)

  def __init__(self, lengths: np.ndarray, eligible: np.ndarray, boundaries: tuple[int, ...], global_batch: int,
               *, seed: int, shuffle: bool = True, drop_remainder: bool = True, bucketing: bool = True,
               join: JoinSpec | None = None, dynamic: bool = False, multiple: int = 1):
    self.lengths = np.asarray(lengths, np.int64)
    self.eligible = np.asarray(eligible, np.int64)
    self.boundaries = np.asarray(boundaries, np.int64)
    self.global_batch = int(global_batch)
    self.seed, self.shuffle, self.drop_remainder, self.bucketing = int(seed), shuffle, drop_remainder, bucketing
    self.join = join if join is not None and join.prob > 0 else None
    self.dynamic = bool(dynamic)
    if self.dynamic and (not bucketing or self.join is not None):
      raise ValueError("dynamic batches need bucketing and rows that are not joined")
    # [num_boundaries] rows of a batch cut from each bucket.
    if self.dynamic:
      if multiple < 1 or self.global_batch % multiple:
        raise ValueError(f"dynamic batches: the row multiple {multiple} must divide the batch {self.global_batch}")
      self.bucket_rows = self.global_batch * self.boundaries[-1] // self.boundaries // multiple * multiple
    else:
      self.bucket_rows = np.full(len(self.boundaries), self.global_batch, np.int64)
    # The count is the same every epoch (only the final partial batch can be dropped), which lets the
    # MapDataset map a step index to (epoch, batch) with plain arithmetic. Without dynamic batches it is
    # n // global_batch (rounded up when the partial batch is kept); with them it follows the buckets' sizes,
    # which do not change between epochs.
    n, b = len(self.eligible), self.global_batch
    if self.dynamic:
      sizes = np.bincount(np.searchsorted(self.boundaries, self.lengths[self.eligible], side="left"),
                          minlength=len(self.boundaries))
      count, carry = 0, 0
      for size, rows in zip(sizes, self.bucket_rows):
        count, carry = count + (carry + size) // rows, (carry + size) % rows
      self.batches_per_epoch = count + (0 if drop_remainder or not carry else 1)
    else:
      self.batches_per_epoch = n // b if drop_remainder else -(-n // b)
    self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_cache"] = {}
    return state

  def partners(self, epoch: int) -> np.ndarray:
    """[num_records] the partner joined after each record in `epoch` (-1 = none; all -1 without `join`).

    Drawn from its own generator, so the rows and their order are those of the same plan without joining."""
    partner = np.full(len(self.lengths), -1, np.int64)
    j = self.join
    if j is None:
      return partner
    rng = np.random.default_rng([self.seed, epoch, 1])
    anchors = self.eligible
    joined = rng.random(len(anchors)) < j.prob
    picks = rng.random((len(anchors), self._JOIN_TRIES))
    by_speaker = {}  # speaker -> (its eligible records by length, their lengths)
    for spk in np.unique(j.speakers[anchors]):
      members = anchors[j.speakers[anchors] == spk]
      members = members[np.argsort(self.lengths[members], kind="stable")]
      by_speaker[spk] = (members, self.lengths[members])
    for i in np.flatnonzero(joined):
      a = anchors[i]
      members, member_lengths = by_speaker[j.speakers[a]]
      fits = int(np.searchsorted(member_lengths, j.max_frames - j.gap - self.lengths[a], side="right"))
      for u in picks[i] if fits else ():
        p = members[int(u * fits)]
        if (p != a and j.text_tokens[a] + j.text_tokens[p] <= j.max_text
            and j.ctc_labels[a] + j.sep + j.ctc_labels[p] <= j.max_ctc):
          partner[a] = p
          break
    return partner

  def _bucket_len(self, row_lengths: np.ndarray) -> int:
    return int(self.boundaries[np.searchsorted(self.boundaries, int(row_lengths.max()), side="left")])

  def rows_for(self, frames: int) -> int:
    """Rows of a global batch padded to `frames` (a boundary)."""
    return int(self.bucket_rows[np.searchsorted(self.boundaries, frames, side="left")])

  def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows [batches_per_epoch, max(bucket_rows)] anchor record indices, -1 = padding row; partners, the same
    shape, -1 = none; frames [batches_per_epoch]). Batch i is rows[i, :rows_for(frames[i])] (the columns past it
    are -1 with dynamic batches only)."""
    if epoch in self._cache:
      return self._cache[epoch]
    rng = np.random.default_rng([self.seed, epoch])
    b = self.global_batch
    home = []  # with dynamic batches, the bucket each group was cut from: its frame length
    partner = self.partners(epoch)
    row_len = self.lengths + np.where(partner >= 0, self.lengths[partner] + (self.join.gap if self.join else 0), 0)
    if self.bucketing:
      bucket = np.searchsorted(self.boundaries, row_len[self.eligible], side="left")
      groups, carry = [], np.zeros([0], np.int64)
      for k, rows_k in enumerate(self.bucket_rows):
        members = self.eligible[bucket == k]
        if self.shuffle:
          members = rng.permutation(members)
        members = np.concatenate([carry, members])
        full = len(members) // rows_k * rows_k
        groups += list(members[:full].reshape(-1, rows_k))
        home += [k] * (full // rows_k)
        carry = members[full:]
      if len(carry):
        groups.append(carry)
        home.append(len(self.boundaries) - 1)
    else:
      order = rng.permutation(self.eligible) if self.shuffle else self.eligible
      groups = [order[i:i + b] for i in range(0, len(order), b)]
    if self.drop_remainder and groups and len(groups[-1]) < self.bucket_rows[-1]:
      groups.pop()
    assert len(groups) == self.batches_per_epoch, (len(groups), self.batches_per_epoch)
    order = rng.permutation(len(groups)) if self.shuffle else np.arange(len(groups))
    rows = np.full([len(groups), int(self.bucket_rows.max())], -1, np.int64)
    frames = np.zeros([len(groups)], np.int64)
    for i, j in enumerate(order):
      g = groups[j]
      rows[i, :len(g)] = g
      # A dynamic batch keeps its bucket's length even when it holds only rows carried up from shorter buckets:
      # its row count is the bucket's, and `rows_for` reads the count back from the length.
      frames[i] = self.boundaries[home[j]] if self.dynamic else self._bucket_len(row_len[g])
    partners = np.where(rows >= 0, partner[rows], -1)
    if len(self._cache) >= 2:  # the pipeline only ever straddles one epoch boundary
      self._cache.pop(min(self._cache))
    self._cache[epoch] = (rows, partners, frames)
    return rows, partners, frames

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(global batch rows, their partners, frame length) at global position `step` (epoch = step //
    batches_per_epoch)."""
    epoch, i = divmod(step, self.batches_per_epoch)
    rows, partners, frames = self.epoch(epoch)
    n = self.rows_for(int(frames[i]))
    return rows[i, :n], partners[i, :n], int(frames[i])


# ---------------------------------------------------------------------------------------------- loading


class _LoadBatch(grain.transforms.MapWithIndex):
  """Step index -> this process's padded rows of that global batch (numpy dict, BATCH_KEYS)."""

  def __init__(self, paths: list[str], plan: BatchPlan, process_index: int, process_count: int, n_mels: int,
               max_text: int, max_ctc: int, aux_cols: list[int], *, silence: float, ctc_sep: tuple[int, ...]):
    self.source = grain.sources.ArrayRecordDataSource(paths)
    self.plan = plan
    self.process_index, self.process_count = process_index, process_count
    self.n_mels, self.max_text, self.max_ctc, self.aux_cols = n_mels, max_text, max_ctc, aux_cols
    self.silence, self.ctc_sep = float(silence), np.asarray(ctc_sep, np.int32)

  def _joined(self, rec: dict, other: dict) -> dict:
    """`rec`, a gap of silent frames, then `other` (same speaker); aux labels that differ become unknown."""
    gap = np.full([self.plan.join.gap, self.n_mels], self.silence, np.float32)
    return {"mel": np.concatenate([rec["mel"], gap, other["mel"]]),
            "text_ids": np.concatenate([rec["text_ids"], other["text_ids"]]),
            "ctc_ids": np.concatenate([rec["ctc_ids"], self.ctc_sep, other["ctc_ids"]]),
            "aux": np.where(rec["aux"] == other["aux"], rec["aux"], -1), "speaker": rec["speaker"]}

  def map_with_index(self, index: int, element: Any) -> dict[str, np.ndarray]:
    del element  # the position in the epoch is recomputed from the global index
    rows, partners, frames = self.plan.batch(index)
    b = len(rows) // self.process_count
    mine = rows[self.process_index * b:(self.process_index + 1) * b]
    theirs = partners[self.process_index * b:(self.process_index + 1) * b]
    out = {
        "mel": np.zeros([b, frames, self.n_mels], np.float32), "mel_mask": np.zeros([b, frames], bool),
        "text_ids": np.zeros([b, self.max_text], np.int32), "text_mask": np.zeros([b, self.max_text], bool),
        "ctc_ids": np.zeros([b, self.max_ctc], np.int32), "ctc_mask": np.zeros([b, self.max_ctc], bool),
        "speaker": np.zeros([b], np.int32), "aux": np.full([b, len(self.aux_cols)], -1, np.int32),
        "valid": mine >= 0,
    }
    real = np.flatnonzero(mine >= 0)
    joined = real[theirs[real] >= 0]
    if len(real):
      blobs = self.source.__getitems__([int(mine[r]) for r in real] + [int(theirs[r]) for r in joined])
      decoded = [records.decode(blob, fields=("mel", "text_ids", "ctc_ids", "aux")) for blob in blobs]
      recs = dict(zip(real, decoded[:len(real)]))
      for r, other in zip(joined, decoded[len(real):]):
        recs[r] = self._joined(recs[r], other)
      for r, rec in recs.items():
        t, n, c = len(rec["mel"]), len(rec["text_ids"]), len(rec["ctc_ids"])
        out["mel"][r, :t] = rec["mel"]
        out["mel_mask"][r, :t] = True
        out["text_ids"][r, :n] = rec["text_ids"]
        out["text_mask"][r, :n] = True
        out["ctc_ids"][r, :c] = rec["ctc_ids"]
        out["ctc_mask"][r, :c] = True
        out["speaker"][r] = rec["speaker"]
        out["aux"][r] = rec["aux"][self.aux_cols]
    return out


def _record_speakers(paths: list[str], num_records: int) -> np.ndarray:
  """[num_records] speaker of each record, read from the records' headers (for shards whose index predates the
  `speakers` field)."""
  source = grain.sources.ArrayRecordDataSource(paths)
  return np.asarray([records.decode(blob, fields=())["speaker"]
                     for blob in source.__getitems__(list(range(num_records)))], np.int64)


def make_plan(config, split: str, *, seed: int, shuffle: bool = True, drop_remainder: bool | None = None,
              bucketing: bool = True, shards_dir: str | None = None) -> BatchPlan:
  """The `BatchPlan` that `make_dataset` reads with the same arguments (see there); training rows are joined
  (`data.join_prob`) or batched by frames (`data.dynamic_batch`) only for the shuffled 'train' split."""
  shards_dir = shards_dir or config.data.shards
  drop_remainder = (split == "train") if drop_remainder is None else drop_remainder
  d = config.data
  info = dataset_info(shards_dir)
  _check_compatible(config, shards_dir, info)
  if info["counts"].get(split, 0) == 0:
    raise ValueError(f"{shards_dir} has no {split!r} records (counts: {info['counts']})")
  index = load_index(shards_dir, split)
  frames = np.asarray(index["num_frames"])
  text_tokens, ctc_labels = np.asarray(index["num_text_tokens"]), np.asarray(index["num_ctc"])
  ok = ((frames <= d.max_frames) & (text_tokens <= config.text.max_text_tokens)
        & (ctc_labels <= config.text.max_ctc_len))
  if not ok.all():
    # Only possible when the shards were prepared with looser limits than this config: say so, loudly.
    logging.warning("%s/%s: %d of %d records exceed this config's data.max_frames / text limits and are skipped",
                    shards_dir, split, int((~ok).sum()), len(ok))
  boundaries = tuple(int(x) for x in d.bucket_boundaries)
  join = None
  if split == "train" and shuffle and d.join_prob > 0:
    speakers = index.get("speakers")
    speakers = (np.asarray(speakers) if speakers is not None
                else _record_speakers(info["shards"][split], len(frames)))
    join = JoinSpec(prob=float(d.join_prob), speakers=speakers, text_tokens=text_tokens, ctc_labels=ctc_labels,
                    max_frames=boundaries[-1], max_text=int(config.text.max_text_tokens),
                    max_ctc=int(config.text.max_ctc_len), gap=int(config.tokenizer.downsample),
                    sep=len(text_lib.ctc_separator(config)))
  dynamic = bool(split == "train" and shuffle and bucketing and d.dynamic_batch)
  plan = BatchPlan(frames, np.flatnonzero(ok), boundaries, d.batch_size, seed=seed, shuffle=shuffle,
                   drop_remainder=drop_remainder, bucketing=bucketing, join=join, dynamic=dynamic,
                   multiple=int(d.batch_multiple))
  if plan.batches_per_epoch == 0:
    raise ValueError(f"{split}: {int(ok.sum())} usable records make no full batch of data.batch_size="
                     f"{d.batch_size}")
  return plan


def make_dataset(config, split: str, *, seed: int, process_index: int | None = None,
                 process_count: int | None = None, num_epochs: int | None = None, shuffle: bool = True,
                 drop_remainder: bool | None = None, bucketing: bool = True,
                 shards_dir: str | None = None) -> grain.IterDataset:
  """Host batches of this process: a `grain.IterDataset` of numpy dicts (module docstring), `iter()` it.

  Args:
    config: the full config (`audio`, `text`, `data`, `tokenizer`, `rm` sections are read).
    split: 'train' or 'test'.
    seed: plan seed (the same on every process).
    process_index / process_count: default jax.process_index() / jax.process_count().
    num_epochs: None = repeat forever.
    shuffle: False gives bucket-ordered, unshuffled batches (evaluation).
    drop_remainder: drop the final partial global batch (default: True for 'train', else False, where the
      partial batch is padded with `valid=False` rows).
    bucketing: False batches a plain permutation (for measuring what bucketing saves).
    shards_dir: default config.data.shards.
  """
  shards_dir = shards_dir or config.data.shards
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  d = config.data
  if d.batch_size % process_count:
    raise ValueError(f"data.batch_size={d.batch_size} is not divisible by the process count {process_count}")
  if split == "train" and d.dynamic_batch and d.batch_multiple % process_count:
    raise ValueError(f"data.batch_multiple={d.batch_multiple} (the rows of dynamic batches divide by it) is not "
                     f"divisible by the process count {process_count}")
  plan = make_plan(config, split, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder, bucketing=bucketing,
                   shards_dir=shards_dir)
  load = _LoadBatch(dataset_info(shards_dir)["shards"][split], plan, process_index, process_count,
                    config.audio.n_mels, config.text.max_text_tokens, config.text.max_ctc_len, aux_columns(config),
                    silence=audio.silence(config.audio), ctc_sep=text_lib.ctc_separator(config))
  ds = grain.MapDataset.range(plan.batches_per_epoch).repeat(num_epochs).map_with_index(load)
  # Threads overlap record reads/decoding inside a process; worker processes sidestep the GIL when
  # decoding+padding is the bottleneck. Neither changes the order of batches.
  prefetch = max(1, int(d.prefetch))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
  if d.num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read its absl flags; outside an absl app (notebooks, pytest) nothing parsed
      # them, so take their defaults instead of failing in the first worker.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers,
                                                     per_worker_buffer_size=prefetch))
  return ds


class _ToGlobal(grain.transforms.Map):
  """Host rows of this process -> global jax.Arrays sharded over the mesh's batch axes."""

  def __init__(self, mesh: jax.sharding.Mesh):
    self.mesh = mesh

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, v.ndim), v)
            for k, v in batch.items()}


def make_global_iterator(config, mesh: jax.sharding.Mesh, split: str = "train", *, seed: int,
                         num_epochs: int | None = None, shuffle: bool = True, drop_remainder: bool | None = None,
                         shards_dir: str | None = None) -> grain.DatasetIterator:
  """An iterator of global batches: dicts of jax.Arrays with leading dim data.batch_size (with
  `data.dynamic_batch`, a multiple of it: `BatchPlan.bucket_rows`), sharded over the batch axes of `mesh`. It is
  a `grain.DatasetIterator`: checkpoint it with `iterator_save_args` / `iterator_restore_args` (module
  docstring)."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.data.batch_size % shards:
    raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by the mesh's batch shards "
                     f"(data*fsdp = {shards})")
  if split == "train" and config.data.dynamic_batch and config.data.batch_multiple % shards:
    raise ValueError(f"data.batch_multiple={config.data.batch_multiple} (the rows of dynamic batches divide by it) "
                     f"is not divisible by the mesh's batch shards (data*fsdp = {shards})")
  ds = make_dataset(config, split, seed=seed, num_epochs=num_epochs, shuffle=shuffle,
                    drop_remainder=drop_remainder, shards_dir=shards_dir)
  # The device transfer runs in this process after prefetching, so the iterator state stays the count of
  # batches handed to the caller: nothing fetched ahead is lost or repeated on restore.
  return iter(ds.map(_ToGlobal(mesh)))


# --------------------------------------------------------------------------------------------- checkpoints


def iterator_save_args(it: grain.DatasetIterator) -> Any:
  """Orbax args saving `it`'s position; put them in `ocp.args.Composite(..., data_iter=...)`."""
  return grain.checkpoint.CheckpointSave(it)


def iterator_restore_args(it: grain.DatasetIterator) -> Any:
  """Orbax args restoring the saved position into `it` (a freshly made iterator of the same pipeline)."""
  return grain.checkpoint.CheckpointRestore(it)


def save_iterator_state(directory: str, it: grain.DatasetIterator) -> None:
  """Writes `it`'s state into `directory` outside a CheckpointManager (same files as the Orbax handler)."""
  path = epath.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  grain.checkpoint.CheckpointHandler().save(path, args=grain.checkpoint.CheckpointSave(it))


def restore_iterator_state(directory: str, it: grain.DatasetIterator) -> grain.DatasetIterator:
  """Sets `it` to the state saved by `save_iterator_state` (or by the Orbax handler) and returns it."""
  return grain.checkpoint.CheckpointHandler().restore(epath.Path(directory),
                                                      args=grain.checkpoint.CheckpointRestore(it))


def text_vocab_sizes(config, shards_dir: str | None = None) -> tuple[int, int]:
  """(sentencepiece vocab, CTC classes incl. blank) of the prepared data; for sizing embeddings/heads."""
  info = dataset_info(shards_dir or config.data.shards)
  return info["text_vocab_size"], info["ctc_vocab_size"]

