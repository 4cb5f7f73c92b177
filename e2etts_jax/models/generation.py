"""Autoregressive speech-token generation for `SpeechLLM`: KV-cached, batched, one compiled `lax.while_loop`.

Per row the prefix is [sos, prompt_text + text, task, prompt_speech] (zero-shot continuation: the prompt's text
is prepended to the target text and its speech tokens start the speech), prefilled into the KV cache in one
pass. Each loop step samples one token per row and feeds it back; rows have different prefix lengths, so the
decode step is vmapped over rows and each row writes its cache slot (= its own position) independently.

Sampling (CosyVoice 2): logits / temperature, nucleus sampling restricted to the top-k (keep tokens while the
probability mass before them is < top_p and their rank < top_k), then repetition-aware sampling: if the
sampled token occurs in the row's last `ras_window` generated tokens at least `ras_tau * ras_window` times
(CosyVoice's `rep_num >= win_size * tau_r`: with 10 and 0.1, any repeat), it is redrawn from the full
distribution. temperature <= 0 means greedy. eos is masked until min_ratio * (target text tokens) speech tokens
exist; a row stops at eos, at max_ratio * (target text tokens), or at max_new_tokens.

`generate(..., use_cache=False)` (= `generate_reference`) runs the identical loop but recomputes the full
forward pass for every token: the reference the cached path is tested against, and a benchmark baseline.
`params` may be the 'params' collection or the full variables dict {'params': ...}.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2etts_jax.models import layers

Array = jax.Array

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "ras_window", "ras_tau", "min_ratio", "max_ratio")


def sampling_params(config, overrides: Optional[Mapping[str, float]] = None) -> dict[str, float]:
  """config.llm's sampling values, with `overrides` (a subset of SAMPLING_KEYS) on top."""
  s = {k: float(config.llm[k]) for k in SAMPLING_KEYS}
  for k, v in dict(overrides or {}).items():
    if k not in s:
      raise ValueError(f"unknown sampling key {k!r}; choose from {SAMPLING_KEYS}")
    s[k] = float(v)
  return s


def pack_two(a: Array, a_mask: Array, b: Array, b_mask: Array) -> tuple[Array, Array]:
  """Per row, b's valid prefix directly after a's: [B, Ta] + [B, Tb] -> ([B, Ta + Tb], mask [B, Ta + Tb]).

  Masks are right-padded prefixes; entries past a row's total length are meaningless.
  """
  if a.shape[1] == 0 or b.shape[1] == 0:
    return (b, b_mask) if a.shape[1] == 0 else (a, a_mask)
  la = jnp.sum(a_mask, axis=1).astype(jnp.int32)[:, None]
  lb = jnp.sum(b_mask, axis=1).astype(jnp.int32)[:, None]
  p = jnp.broadcast_to(jnp.arange(a.shape[1] + b.shape[1])[None, :], (a.shape[0], a.shape[1] + b.shape[1]))
  ga = jnp.take_along_axis(a, jnp.clip(p, 0, a.shape[1] - 1), axis=1)
  gb = jnp.take_along_axis(b, jnp.clip(p - la, 0, b.shape[1] - 1), axis=1)
  return jnp.where(p < la, ga, gb), p < la + lb


def _variables(params: Any) -> dict:
  return params if "params" in params else {"params": params}


def sample_token(logits: Array, key: Array, history: Array, step: Array, min_len: Array,
                 sp: Mapping[str, Array]) -> Array:
  """One token per row.

  logits [B, S + 1] (last = eos); history [B, N] generated tokens (entries >= step are ignored); step: scalar
  index of the token being sampled; min_len [B]: eos is impossible while step < min_len. Returns [B] int32.
  """
  b, v = logits.shape
  eos = v - 1
  logits = logits.astype(jnp.float32)
  logits = jnp.where((jnp.arange(v) == eos)[None, :] & (step < min_len)[:, None], -jnp.inf, logits)
  greedy = jnp.argmax(logits, axis=-1)
  scaled = logits / jnp.maximum(sp["temperature"], 1e-6)
  probs = jax.nn.softmax(scaled, axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
  top_k = jnp.where(sp["top_k"] > 0, sp["top_k"], v)
  keep_sorted = (mass_before < sp["top_p"]) & (jnp.arange(v)[None, :] < top_k)
  keep_sorted = keep_sorted.at[:, 0].set(True)                                  # never an empty set
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)  # back to vocab order
  k_top, k_full = jax.random.split(key)
  top = jax.random.categorical(k_top, jnp.where(keep, scaled, -jnp.inf), axis=-1)
  full = jax.random.categorical(k_full, scaled, axis=-1)
  w, tau = sp["ras_window"], sp["ras_tau"]
  i = jnp.arange(history.shape[1])[None, :]
  window = (i >= step - w) & (i < step)
  repeats = jnp.sum((history == top[:, None]) & window, axis=-1)
  use_full = (w > 0) & (tau > 0) & (repeats >= w * tau)
  tok = jnp.where(use_full, full, top)
  return jnp.where(sp["temperature"] <= 0, greedy, tok).astype(jnp.int32)


def prefill(model, params, text_ids: Array, text_mask: Array, speech_indices: Optional[Array],
            speech_mask: Optional[Array], cache_len: int) -> tuple[Array, dict, Array]:
  """Runs [sos, text, task, speech] through the decoder into a fresh KV cache of `cache_len` slots.

  text_ids/text_mask [B, Tt]; speech_indices/speech_mask [B, Ts] or None. Returns (logits [B, S + 1] for the
  next speech token, cache, prefix_len [B] int32 = the next token's position and cache slot).
  """
  b = text_ids.shape[0]
  if speech_indices is None:
    speech_indices = jnp.zeros((b, 0), jnp.int32)
    speech_mask = jnp.zeros((b, 0), bool)
  codes = model.fsq.indices_to_codes(speech_indices)
  tcfg = layers.TransformerConfig.from_config(model.config.llm, model.config.model, causal=True)
  cache = layers.init_cache(tcfg, b, cache_len, tcfg.dtype)

  def fn(m):
    x, valid, lt = m.pack(text_ids, text_mask, codes, speech_mask)
    prefix_len = jnp.sum(valid, axis=1).astype(jnp.int32)
    kv_valid = jnp.arange(cache_len)[None, :] < prefix_len[:, None]
    h, new_cache = m.backbone(x, valid, cache=cache, cache_index=jnp.int32(0), kv_valid=kv_valid)
    last = jnp.take_along_axis(h, (prefix_len - 1)[:, None, None], axis=1)[:, 0]
    return m.logits(last), new_cache, prefix_len

  return nn.apply(fn, model)(_variables(params))


def decode_step(model, params, cache: dict, tokens: Array, positions: Array) -> tuple[Array, dict]:
  """Feeds one speech token per row at its own position (= cache slot).

  tokens [B] int (eos is fed as an arbitrary code: such rows are finished); positions [B] int32.
  Returns (logits [B, S + 1] for the following token, updated cache).
  """
  variables = _variables(params)
  fsq = model.fsq
  codes = fsq.indices_to_codes(jnp.minimum(tokens, fsq.codebook_size - 1))  # [B, D]
  cache_len = cache["k"].shape[2]

  def one_row(row_cache, code, pos):
    row_cache = jax.tree.map(lambda c: c[:, None], row_cache)                  # [layers, 1, L, kv, hd]

    def fn(m):
      x = m.embed_speech(code[None, None, :])
      h, new_cache = m.backbone(x, jnp.ones((1, 1), bool), positions=pos.reshape(1, 1), cache=row_cache,
                                cache_index=pos, kv_valid=(jnp.arange(cache_len) <= pos)[None, :])
      return m.logits(h[0, 0]), new_cache

    logits, new_cache = nn.apply(fn, model)(variables)
    return logits, jax.tree.map(lambda c: c[:, 0], new_cache)

  return jax.vmap(one_row, in_axes=(1, 0, 0), out_axes=(0, 1))(cache, codes, positions.astype(jnp.int32))


def _run(model, num_new: int, use_cache: bool, params, text_ids, text_mask, rng, prompt_text_ids,
         prompt_text_mask, prompt_indices, prompt_mask, sp):
  b = text_ids.shape[0]
  fsq = model.fsq
  eos = fsq.codebook_size
  target_len = jnp.sum(text_mask, axis=1).astype(jnp.int32)
  min_len = jnp.floor(sp["min_ratio"] * target_len).astype(jnp.int32)
  max_len = jnp.minimum(jnp.floor(sp["max_ratio"] * target_len).astype(jnp.int32), num_new)
  if prompt_text_ids is not None:
    text_ids, text_mask = pack_two(prompt_text_ids, prompt_text_mask, text_ids, text_mask)
  if prompt_indices is None:
    prompt_indices = jnp.zeros((b, 0), jnp.int32)
    prompt_mask = jnp.zeros((b, 0), bool)
  prompt_indices = jnp.where(prompt_mask, prompt_indices, 0).astype(jnp.int32)
  prompt_len = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)
  rows = jnp.arange(b)

  if use_cache:
    cache_len = text_ids.shape[1] + 2 + prompt_indices.shape[1] + num_new
    logits, cache, prefix_len = prefill(model, params, text_ids, text_mask, prompt_indices, prompt_mask,
                                        cache_len)

    advance = lambda cache, tok, n: decode_step(model, params, cache, tok, prefix_len + n)
    aux = cache
  else:
    # The speech so far, packed per row: prompt tokens then generated ones.
    buf = jnp.concatenate([prompt_indices, jnp.zeros((b, num_new), jnp.int32)], axis=1)

    def full_logits(buf, length):
      mask = jnp.arange(buf.shape[1])[None, :] < length[:, None]
      out = model.apply(_variables(params), text_ids, text_mask, fsq.indices_to_codes(buf), mask)
      return jnp.take_along_axis(out, length[:, None, None], axis=1)[:, 0]

    def advance(aux, tok, n):
      buf = aux.at[rows, prompt_len + n].set(jnp.minimum(tok, eos - 1))
      return full_logits(buf, prompt_len + n + 1), buf

    logits, aux = full_logits(buf, prompt_len), buf

  def cond(state):
    n, _, _, done, _, _ = state
    return (n < num_new) & ~jnp.all(done)

  def body(state):
    n, logits, out, done, lengths, aux = state
    tok = sample_token(logits, jax.random.fold_in(rng, n), out, n, min_len, sp)
    stop = ~done & ((tok == eos) | (n >= max_len))
    lengths = jnp.where(stop, n, lengths)
    out = out.at[:, n].set(jnp.where(done | stop, 0, tok))
    done = done | stop
    logits, aux = advance(aux, tok, n)
    return n + 1, logits, out, done, lengths, aux

  state = (jnp.int32(0), logits, jnp.zeros((b, num_new), jnp.int32), jnp.zeros((b,), bool), max_len, aux)
  _, _, out, _, lengths, _ = jax.lax.while_loop(cond, body, state)
  return out, lengths


# Compiled loops per (model, N, use_cache). Sampling values are traced arguments, so changing them does not
# recompile; a model's config must not be mutated after its first `generate` call.
_COMPILED: dict = {}


def generate(model, params, text_ids: Array, text_mask: Array, rng: Array, *,
             prompt_text_ids: Optional[Array] = None, prompt_text_mask: Optional[Array] = None,
             prompt_indices: Optional[Array] = None, prompt_mask: Optional[Array] = None,
             max_new_tokens: Optional[int] = None, sampling: Optional[Mapping[str, float]] = None,
             use_cache: bool = True) -> tuple[Array, Array]:
  """Samples speech tokens for a batch of texts.

  text_ids/text_mask [B, Tt] (right-padded); prompt_text_ids/mask [B, Tpt] and prompt_indices/mask [B, Tp]
  (optional, zero-shot continuation); rng: a PRNG key; sampling: overrides of SAMPLING_KEYS (config.llm
  otherwise). Returns (indices [B, N] int32, 0 after each row's end; lengths [B] int32) with N = max_new_tokens
  or, by default, min(ceil(max_ratio * Tt), llm.max_len - prefix width). The prompt's tokens are not included.
  """
  sp = sampling_params(model.config, sampling)
  b, tt = text_ids.shape
  if max_new_tokens is None:
    prefix = tt + 2 + (0 if prompt_text_ids is None else prompt_text_ids.shape[1]) + (
        0 if prompt_indices is None else prompt_indices.shape[1])
    max_new_tokens = max(1, min(math.ceil(sp["max_ratio"] * tt), int(model.config.llm.max_len) - prefix))
  key = (id(model), int(max_new_tokens), bool(use_cache))
  if key not in _COMPILED:
    fn = jax.jit(lambda *args: _run(model, int(max_new_tokens), bool(use_cache), *args))
    _COMPILED[key] = (model, fn)     # holding the model keeps its id from being reused
  _, fn = _COMPILED[key]
  if (prompt_text_ids is None) != (prompt_text_mask is None) or (prompt_indices is None) != (prompt_mask is None):
    raise ValueError("pass prompt ids together with their masks")
  sp_arrays = {k: jnp.asarray(v, jnp.float32) for k, v in sp.items()}
  return fn(params, text_ids, text_mask, rng, prompt_text_ids, prompt_text_mask, prompt_indices, prompt_mask,
            sp_arrays)


def generate_reference(model, params, text_ids: Array, text_mask: Array, rng: Array, **kw) -> tuple[Array, Array]:
  """`generate` without the KV cache: a full forward pass per token (for tests and benchmarks)."""
  return generate(model, params, text_ids, text_mask, rng, use_cache=False, **kw)
