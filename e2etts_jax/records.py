"""The ArrayRecord record format: one prepared utterance <-> bytes.

Layout: b"E2TR" | uint8 version | uint32 little-endian header length | UTF-8 JSON header | array payload.
The header holds the scalars (`id`, `text`, `speaker`, `num_frames`) and, per array, its dtype, shape and byte
offset into the payload, so decoding is a JSON parse plus zero-copy `np.frombuffer` views (cheap enough to do
per batch in the input pipeline; a zip/npz container would cost a decompressor pass per record).

Record fields:
  id          str
  text        str     normalised text (`text.normalize_text`)
  speaker     int     index into the prepared `speakers.json` table
  num_frames  int     mel frames (= len(waveform) // hop_length; waveform is trimmed to a multiple of hop)
  mel         float32 [num_frames, n_mels]  `audio.log_mel` of the float waveform
  waveform    int16   [num_frames * hop_length]  PCM at config.audio.sample_rate
  text_ids    int32   [num_text_tokens]  sentencepiece ids (no bos/eos; 0 = pad never occurs)
  ctc_ids     int32   [num_ctc_labels]   CTC label ids (no blanks)
  aux         int32   [len(AUX_NAMES)]   class labels in AUX_NAMES order; -1 = unknown
"""
from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

MAGIC = b"E2TR"
VERSION = 1
AUX_NAMES = ("rate", "pitch")
ARRAY_FIELDS = {"mel": np.float32, "waveform": np.int16, "text_ids": np.int32, "ctc_ids": np.int32,
                "aux": np.int32}
SCALAR_FIELDS = ("id", "text", "speaker", "num_frames")
_PREFIX = struct.Struct("<4sBI")


def encode(example: dict[str, Any]) -> bytes:
  """Serialises an example with all SCALAR_FIELDS and ARRAY_FIELDS (arrays are cast to their fixed dtypes)."""
  header: dict[str, Any] = {k: example[k] for k in SCALAR_FIELDS}
  header["speaker"] = int(header["speaker"])
  header["num_frames"] = int(header["num_frames"])
  arrays, payload, offset = {}, [], 0
  for name, dtype in ARRAY_FIELDS.items():
    a = np.ascontiguousarray(np.asarray(example[name]), dtype=dtype)
    buf = a.tobytes()
    arrays[name] = [np.dtype(dtype).str, list(a.shape), offset]
    payload.append(buf)
    offset += len(buf)
  header["arrays"] = arrays
  head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
  return b"".join([_PREFIX.pack(MAGIC, VERSION, len(head)), head, *payload])


def decode(data: bytes, fields: tuple[str, ...] | None = None) -> dict[str, Any]:
  """Parses `encode`'s bytes. `fields` limits which arrays are materialised (scalars always are).

  Arrays are read-only views into `data`; copy before writing to them.
  """
  magic, version, head_len = _PREFIX.unpack_from(data, 0)
  if magic != MAGIC or version != VERSION:
    raise ValueError(f"not an e2etts record (magic={magic!r}, version={version}); re-run e2etts-prepare")
  start = _PREFIX.size
  header = json.loads(bytes(data[start:start + head_len]).decode("utf-8"))
  base = start + head_len
  out = {k: header[k] for k in SCALAR_FIELDS}
  for name, (dtype, shape, offset) in header["arrays"].items():
    if fields is not None and name not in fields:
      continue
    count = int(np.prod(shape)) if shape else 1
    out[name] = np.frombuffer(data, dtype=np.dtype(dtype), count=count, offset=base + offset).reshape(shape)
  return out
