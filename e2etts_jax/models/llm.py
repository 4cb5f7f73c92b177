"""The speech LLM: a Qwen2-style causal decoder (RMSNorm, SwiGLU, RoPE, GQA) over text then speech tokens.

Sequence per example (CosyVoice 2): [sos, text_1..text_n, task, speech_1..speech_m] as input, predicting
[speech_1..speech_m, eos]. Rows are packed: each row's speech follows its own text directly, with contiguous
positions 0..n+m+1 and padding only at the end, so a right-padded row gives the same logits as the row alone.

Vocabulary layout (V = text_vocab_size, S = FSQ codebook size = prod(tokenizer.fsq_levels)):
  input table `text_embed` [V + 2, d]:  0..V-1 text pieces, V = sos, V + 1 = task.
  speech input: dense(code vector [D] -> d) + bias. No speech rows in a table: a token's input is the
                projection of its FSQ code (fsq.indices_to_codes), so hard codes, straight-through codes and
                soft mixtures of codebook rows all embed the same way and gradients reach the codes.
  output head [d, S + 1]:  0..S-1 speech tokens, S = eos.
The speech token with index i is never confused with text piece i: the two live in different tables.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from e2etts_jax.models import layers
from e2etts_jax.models.fsq import FSQ

Array = jax.Array


class SpeechLLM(nn.Module):
  """Text + speech-token decoder. `config` is the full config (uses `llm`, `model`, `tokenizer`)."""
  config: ml_collections.ConfigDict
  text_vocab_size: int

  def setup(self):
    self.tcfg = layers.TransformerConfig.from_config(self.config.llm, self.config.model, causal=True)
    d = self.tcfg.d_model
    self.text_embed = layers.embedding(self.text_vocab_size + 2, d, "text_embed", dtype=self.tcfg.dtype)
    self.speech_in = layers.dense(d, (None, "embed"), self.tcfg.dtype, "speech_in", use_bias=True)
    self.decoder = layers.Transformer(self.tcfg, name="decoder")
    # The head computes in float32: sampling and the loss read small probability differences.
    self.head = layers.dense(self.num_speech_tokens + 1, ("embed", "vocab"), jnp.float32, "head")

  # Ids and sizes (usable on an unbound module).
  @property
  def fsq(self) -> FSQ:
    return FSQ(self.config.tokenizer.fsq_levels)

  @property
  def num_speech_tokens(self) -> int:
    return self.fsq.codebook_size

  @property
  def sos_id(self) -> int:
    return self.text_vocab_size

  @property
  def task_id(self) -> int:
    return self.text_vocab_size + 1

  @property
  def eos_id(self) -> int:
    """Index of eos in the output logits."""
    return self.num_speech_tokens

  def embed_speech(self, speech_codes: Array) -> Array:
    """[..., D] code vectors -> [..., d_model]."""
    return self.speech_in(speech_codes.astype(jnp.float32))

  def pack(self, text_ids: Array, text_mask: Array, speech_codes: Array,
           speech_mask: Array) -> tuple[Array, Array, Array]:
    """Builds the packed input [sos, text, task, speech] per row.

    text_ids [B, Tt], text_mask [B, Tt], speech_codes [B, Ts, D], speech_mask [B, Ts] (Ts may be 0).
    Returns (x [B, Tt + Ts + 2, d_model], valid [B, Tt + Ts + 2] bool, text_len [B] int32).
    """
    b, tt = text_ids.shape
    if speech_codes.shape[1] == 0:
      speech_codes = jnp.zeros((b, 1, speech_codes.shape[2]), jnp.float32)
      speech_mask = jnp.zeros((b, 1), bool)
    ts = speech_codes.shape[1]
    lt = jnp.sum(text_mask, axis=1).astype(jnp.int32)
    ls = jnp.sum(speech_mask, axis=1).astype(jnp.int32)
    text_e = self.text_embed(text_ids)                                       # [B, Tt, d]
    special = self.text_embed(jnp.array([self.sos_id, self.task_id]))      # [2, d]
    speech_e = self.embed_speech(speech_codes).astype(text_e.dtype)         # [B, Ts, d]
    p = jnp.arange(tt + ts + 2)[None, :]
    ti = jnp.clip(p - 1, 0, tt - 1)
    si = jnp.clip(p - lt[:, None] - 2, 0, ts - 1)
    gt = jnp.take_along_axis(text_e, jnp.broadcast_to(ti, (b, p.shape[1]))[..., None], axis=1)
    gs = jnp.take_along_axis(speech_e, jnp.broadcast_to(si, (b, p.shape[1]))[..., None], axis=1)
    lt_ = lt[:, None, None]
    pp = p[..., None]
    x = jnp.where(pp == 0, special[0], jnp.where(pp <= lt_, gt, jnp.where(pp == lt_ + 1, special[1], gs)))
    valid = p < (lt + ls + 2)[:, None]
    return x, valid, lt

  def backbone(self, x: Array, valid: Array, positions: Array | None = None, cache: dict | None = None,
               cache_index: Array | None = None, kv_valid: Array | None = None):
    """The decoder stack (see layers.Transformer): returns (hidden [B, T, d_model], new cache or None)."""
    return self.decoder(x, valid, positions, cache=cache, cache_index=cache_index, kv_valid=kv_valid)

  def logits(self, hidden: Array) -> Array:
    """[..., d_model] -> [..., S + 1] float32."""
    return self.head(hidden).astype(jnp.float32)

  def __call__(self, text_ids: Array, text_mask: Array, speech_codes: Array, speech_mask: Array) -> Array:
    """Teacher-forced logits [B, Ts + 1, S + 1] float32.

    logits[:, j] predicts speech token j for j < len (row's speech length) and eos at j = len; entries past
    len are meaningless. speech_codes [B, Ts, D] are code vectors (hard, straight-through or soft).
    """
    x, valid, lt = self.pack(text_ids, text_mask, speech_codes, speech_mask)
    h, _ = self.backbone(x, valid)
    ts = speech_codes.shape[1]
    # The output for speech token j is read at the position just before it: task (j = 0) or speech j - 1.
    idx = jnp.clip(lt[:, None] + 1 + jnp.arange(ts + 1)[None, :], 0, x.shape[1] - 1)
    h = jnp.take_along_axis(h, idx[..., None], axis=1)
    return self.logits(h)


def llm_loss(logits: Array, target_indices: Array, speech_mask: Array) -> tuple[Array, dict[str, Array]]:
  """Cross-entropy over speech tokens and eos, averaged over valid targets.

  logits [B, Ts + 1, S + 1]; target_indices [B, Ts] int; speech_mask [B, Ts] bool (right-padded).
  Targets per row: target_indices[:len] then eos (= S) at position len. Returns (loss, dict(acc, eos_acc)):
  acc is top-1 accuracy over all valid targets (speech and eos, as CosyVoice reports it), eos_acc over the eos
  targets alone.
  """
  b, ts = target_indices.shape
  eos = logits.shape[-1] - 1
  ls = jnp.sum(speech_mask, axis=1).astype(jnp.int32)
  j = jnp.arange(ts + 1)[None, :]
  padded = jnp.concatenate([target_indices.astype(jnp.int32), jnp.zeros((b, 1), jnp.int32)], axis=1)
  targets = jnp.where(j < ls[:, None], padded, eos)
  valid = j <= ls[:, None]
  is_eos = j == ls[:, None]
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss = layers.masked_mean(logz - gold, valid)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return loss, dict(acc=layers.masked_mean(correct, valid), eos_acc=layers.masked_mean(correct, is_eos))


def last_layer_attention(intermediates: dict) -> Array:
  """The attention weights [B, H, T, T] of the decoder's last layer, from the 'intermediates' collection of an
  apply with mutable=['intermediates'] (layers.Attention sows them; the layer scan stacks them)."""
  return intermediates["decoder"]["layers"]["attn"]["probs"][0][-1]


def alignment_loss(probs: Array, text_len: Array, speech_len: Array, sigma: float) -> Array:
  """Guided attention (DC-TTS, Tachibana et al. 2018) on the packed sequence [sos, text, task, speech].

  A decoder-only TTS model has to find which text piece each speech token says; on little data it barely does
  (the held-out text gain, objectives.loss_fn). This cost gives the constrained heads that alignment as a prior:
  each speech position should attend to text, near the diagonal. (On this project's corpora it aligns the head
  always, and raises the text gain only with thousands of training utterances: docs/diagnosis.md.)
  probs [B, H, T, T] (T = Tt + Ts + 2, the LLM's packed length) weights of the heads to constrain; text_len [B],
  speech_len [B] int. Queries: the positions that predict speech token j = 0..m (m = speech_len; j = m is eos),
  i.e. task, speech_1..speech_m. A key on text piece i (of n) costs
  1 - exp(-((i + 1/2) / n - (j + 1/2) / (m + 1))^2 / (2 sigma^2)); every other key (sos, task, speech) costs 1.
  Returns the weight-averaged cost over those queries and the heads: 0 when all weight lies on the diagonal piece,
  1 when none lies on text.
  """
  t = probs.shape[-1]
  p = jnp.arange(t)[None, :]
  lt, ls = text_len.astype(jnp.int32)[:, None], speech_len.astype(jnp.int32)[:, None]
  j = p - lt - 1                                                            # [B, T] query's speech index
  i = p - 1                                                                 # [B, T] key's text index
  queries = (j >= 0) & (j <= ls)
  qn = (j + 0.5) / (ls + 1).astype(jnp.float32)
  kn = (i + 0.5) / jnp.maximum(lt, 1).astype(jnp.float32)
  cost = 1.0 - jnp.exp(-jnp.square(kn[:, None, :] - qn[:, :, None]) / (2.0 * sigma ** 2))    # [B, Tq, Tk]
  cost = jnp.where(((i >= 0) & (i < lt))[:, None, :], cost, 1.0)
  per_query = jnp.einsum("bhqk,bqk->bhq", probs.astype(jnp.float32), cost)
  return layers.masked_mean(per_query, queries[:, None, :])


from e2etts_jax.models.generation import generate, generate_reference  # noqa: E402  (re-export)
