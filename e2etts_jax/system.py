"""The four networks as one system: module definitions, their parameter tree, and dummy inputs for init.

Parameters are a dict {'tokenizer', 'llm', 'fm', 'rm'} of each network's `params` collection, so optimizers,
freezing and checkpoints address networks by name.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from e2etts_jax import config_lib
from e2etts_jax.models.flow_matching import FlowMatchingDecoder
from e2etts_jax.models.fsq import FSQ
from e2etts_jax.models.llm import SpeechLLM
from e2etts_jax.models.reward import RewardModel
from e2etts_jax.models.tokenizer import SpeechTokenizer


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the networks need to know about the prepared data (vocabularies and label sets)."""
  text_vocab_size: int
  num_ctc_classes: int
  num_speakers: int
  num_aux: int

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=1)

  @classmethod
  def load(cls, path: str) -> "DataInfo":
    with open(path) as f:
      return cls(**json.load(f))

  @classmethod
  def for_config(cls, config: ml_collections.ConfigDict, num_speakers: int | None = None) -> "DataInfo":
    """Sizes from the config alone (tests, benchmarks, `jax.eval_shape` parameter counts)."""
    from e2etts_jax import text
    return cls(text_vocab_size=config.text.vocab_size, num_ctc_classes=text.ctc_vocab_size(config),
               num_speakers=num_speakers or config.rm.num_speakers,
               num_aux=len(config_lib.parse_list(config.rm.aux_tasks)))


class System:
  """Holds the module definitions (no parameters) of tokenizer, LLM, flow-matching decoder and reward model."""

  def __init__(self, config: ml_collections.ConfigDict, info: DataInfo):
    self.config, self.info = config, info
    self.fsq = FSQ(tuple(config.tokenizer.fsq_levels))
    self.tokenizer = SpeechTokenizer(config)
    self.llm = SpeechLLM(config, text_vocab_size=info.text_vocab_size)
    self.fm = FlowMatchingDecoder(config)
    self.rm = RewardModel(config, num_ctc_classes=info.num_ctc_classes, num_speakers=info.num_speakers,
                          num_aux=info.num_aux)

  def _looped_layers(self) -> "System":
    """This system with a one-layer-per-iteration layer loop (same parameters, cheaper to compile)."""
    config = self.config.copy_and_resolve_references()
    config.model.scan_unroll = 1
    return System(config, self.info)

  def dummy_batch(self, batch_size: int = 1, frames: int | None = None) -> dict:
    """Zeros in the batch format of `input_pipeline` (only shapes matter: used for init and tracing)."""
    c = self.config
    frames = frames or c.data.bucket_boundaries[0]
    return {
        "mel": jnp.zeros((batch_size, frames, c.audio.n_mels), jnp.float32),
        "mel_mask": jnp.ones((batch_size, frames), bool),
        "text_ids": jnp.ones((batch_size, c.text.max_text_tokens), jnp.int32),
        "text_mask": jnp.ones((batch_size, c.text.max_text_tokens), bool),
        "ctc_ids": jnp.ones((batch_size, c.text.max_ctc_len), jnp.int32),
        "ctc_mask": jnp.ones((batch_size, c.text.max_ctc_len), bool),
        "speaker": jnp.zeros((batch_size,), jnp.int32),
        "aux": jnp.zeros((batch_size, self.info.num_aux), jnp.int32),
        "valid": jnp.ones((batch_size,), bool),
    }

  def random_batch(self, batch_size: int, frames: int, seed: int = 0) -> dict:
    """A batch of random but well-formed inputs (speech-like log-mel range, ragged lengths, real label ranges):
    for tests and benchmarks that must not depend on prepared data."""
    c, rs = self.config, np.random.default_rng(seed)
    ds = c.tokenizer.downsample
    lengths = rs.integers(frames // (2 * ds), frames // ds + 1, size=batch_size) * ds
    lengths[0] = frames   # at least one full row, so shapes are exercised to the end
    mel_mask = np.arange(frames)[None] < lengths[:, None]
    mel = (rs.normal(size=(batch_size, frames, c.audio.n_mels)) * 2.0 - 5.0) * mel_mask[..., None]
    def ragged(n_max, vocab, lo=1):
      n = rs.integers(n_max // 4, n_max // 2 + 1, size=batch_size)
      mask = np.arange(n_max)[None] < n[:, None]
      return rs.integers(lo, vocab, size=(batch_size, n_max)) * mask, mask
    text_ids, text_mask = ragged(c.text.max_text_tokens, self.info.text_vocab_size)
    ctc_ids, ctc_mask = ragged(min(c.text.max_ctc_len, frames // ds), self.info.num_ctc_classes)
    ctc_ids = np.pad(ctc_ids, ((0, 0), (0, c.text.max_ctc_len - ctc_ids.shape[1])))
    ctc_mask = np.pad(ctc_mask, ((0, 0), (0, c.text.max_ctc_len - ctc_mask.shape[1])))
    return {
        "mel": jnp.asarray(mel, jnp.float32), "mel_mask": jnp.asarray(mel_mask),
        "text_ids": jnp.asarray(text_ids, jnp.int32), "text_mask": jnp.asarray(text_mask),
        "ctc_ids": jnp.asarray(ctc_ids, jnp.int32), "ctc_mask": jnp.asarray(ctc_mask),
        "speaker": jnp.asarray(rs.integers(0, self.info.num_speakers, size=batch_size), jnp.int32),
        "aux": jnp.asarray(rs.integers(0, self.config.rm.aux_classes, size=(batch_size, self.info.num_aux)),
                           jnp.int32),
        "valid": jnp.ones((batch_size,), bool),
    }

  def init(self, rng: jax.Array) -> dict:
    """Boxed (logically annotated) parameters {'tokenizer', 'llm', 'fm', 'rm'}; wrap in eval_shape to size.

    The layer stacks are initialised one layer per loop iteration whatever `model.scan_unroll` says: the values are
    the same (nn.scan splits the layers' keys before it loops), and the init program compiles each layer's
    parameter draws once instead of once per layer (`mini`: 19 s -> 15 s of compile time on a CPU core).
    """
    looped = self if self.config.model.scan_unroll == 1 else self._looped_layers()
    return looped.init_as_configured(rng)

  def init_as_configured(self, rng: jax.Array) -> dict:
    """`init` with the layer loop `model.scan_unroll` configures (the same parameters)."""
    b = self.dummy_batch()
    r_tok, r_llm, r_fm, r_rm = jax.random.split(rng, 4)
    d = self.fsq.dim
    frames = b["mel"].shape[1]
    tokens = frames // self.config.tokenizer.downsample
    codes = jnp.zeros((1, tokens, d))
    code_mask = jnp.ones((1, tokens), bool)
    spk = jnp.zeros((1, self.config.rm.spk_embed_dim))
    return {
        "tokenizer": self.tokenizer.init(r_tok, b["mel"], b["mel_mask"])["params"],
        "llm": self.llm.init(r_llm, b["text_ids"], b["text_mask"], codes, code_mask)["params"],
        "fm": self.fm.init(r_fm, b["mel"], jnp.zeros((1,)), codes, code_mask, b["mel"], spk,
                           b["mel_mask"])["params"],
        "rm": self.rm.init(r_rm, codes, code_mask)["params"],
    }


def parameter_counts(config: ml_collections.ConfigDict, info: DataInfo | None = None) -> dict[str, int]:
  """Per-network parameter counts from `jax.eval_shape` (nothing is allocated)."""
  info = info or DataInfo.for_config(config)
  abstract = jax.eval_shape(System(config, info).init, jax.random.key(0))
  return {name: sum(x.size for x in jax.tree.leaves(tree)) for name, tree in abstract.items()}


def save_data_info(workdir: str, info: DataInfo) -> None:
  os.makedirs(workdir, exist_ok=True)
  info.save(os.path.join(workdir, "data_info.json"))
