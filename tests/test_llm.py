"""Speech LLM: packing, causality, KV-cached decoding, sampling rules, generation, overfitting, paper size."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from e2etts_jax import config_lib
from e2etts_jax.models import generation, layers
from e2etts_jax.models.fsq import FSQ
from e2etts_jax.models.llm import (SpeechLLM, alignment_loss, generate, generate_reference, last_layer_attention,
                                   llm_loss)

TEXT_VOCAB = 64
B, TT, TS = 3, 7, 9
TEXT_LEN = np.array([7, 3, 5])
SPEECH_LEN = np.array([9, 4, 6])


@pytest.fixture(scope="module")
def setup():
  c = config_lib.get_config("tiny")
  model = SpeechLLM(c, TEXT_VOCAB)
  r = np.random.default_rng(0)
  text = jnp.asarray(r.integers(0, TEXT_VOCAB, (B, TT)), jnp.int32)
  text_mask = layers.length_mask(jnp.asarray(TEXT_LEN), TT)
  idx = jnp.asarray(r.integers(0, model.num_speech_tokens, (B, TS)), jnp.int32)
  speech_mask = layers.length_mask(jnp.asarray(SPEECH_LEN), TS)
  codes = model.fsq.indices_to_codes(idx)
  params = jax.jit(model.init)(jax.random.key(0), text, text_mask, codes, speech_mask)
  apply = jax.jit(model.apply)
  return dict(model=model, params=params, apply=apply, text=text, text_mask=text_mask, idx=idx,
              speech_mask=speech_mask, codes=codes)


def test_logits_shape_and_vocabulary(setup):
  s = setup
  logits = s["apply"](s["params"], s["text"], s["text_mask"], s["codes"], s["speech_mask"])
  assert logits.shape == (B, TS + 1, 27 + 1) and logits.dtype == jnp.float32
  m = s["model"]
  assert (m.sos_id, m.task_id, m.eos_id) == (TEXT_VOCAB, TEXT_VOCAB + 1, 27)
  emb = s["params"]["params"]["text_embed"]["embedding"]
  assert nn.unbox(emb).shape == (TEXT_VOCAB + 2, 32)


def test_future_tokens_never_change_past_logits(setup):
  s = setup
  base = s["apply"](s["params"], s["text"], s["text_mask"], s["codes"], s["speech_mask"])
  k = 3
  idx2 = s["idx"].at[:, k:].set((s["idx"][:, k:] + 5) % 27)
  # Text padding is also "not seen": garbage there must not matter either.
  text2 = jnp.where(s["text_mask"], s["text"], 7)
  out = s["apply"](s["params"], text2, s["text_mask"], s["model"].fsq.indices_to_codes(idx2), s["speech_mask"])
  # logits[:, j] sees speech tokens < j: j <= k are unchanged, j = k + 1 must change.
  np.testing.assert_allclose(np.asarray(out[:, :k + 1]), np.asarray(base[:, :k + 1]), atol=1e-6)
  assert np.abs(np.asarray(out[:, k + 1] - base[:, k + 1])).max() > 1e-3


def test_right_padded_text_matches_each_row_alone(setup):
  s = setup
  batch = s["apply"](s["params"], s["text"], s["text_mask"], s["codes"], s["speech_mask"])
  for b in (1, 2):  # the rows with text padding (row 0 fills the batch's width)
    lt, ls = TEXT_LEN[b], SPEECH_LEN[b]
    alone = s["apply"](s["params"], s["text"][b:b + 1, :lt], jnp.ones((1, lt), bool),
                             s["codes"][b:b + 1, :ls], jnp.ones((1, ls), bool))
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(batch[b, :ls + 1]), atol=1e-5)


def test_embedding_from_quantized_vectors_equals_indices(setup):
  s = setup
  fsq = s["model"].fsq
  z = 2.0 * jax.random.normal(jax.random.key(4), (B, TS, fsq.dim))
  st_codes, indices = fsq.quantize(z)

  def f(z):
    codes, _ = fsq.quantize(z)
    return s["model"].apply(s["params"], s["text"], s["text_mask"], codes, s["speech_mask"])

  valid_out = layers.length_mask(jnp.asarray(SPEECH_LEN) + 1, TS + 1)[..., None]

  @jax.jit
  def logits_and_grad(z):
    logits, vjp = jax.vjp(f, z)
    return logits, vjp(jnp.where(valid_out, 1.0, 0.0) * jnp.ones_like(logits))[0]   # grad of sum(valid logits)

  from_codes, g = logits_and_grad(z)
  from_indices = s["apply"](s["params"], s["text"], s["text_mask"], fsq.indices_to_codes(indices),
                            s["speech_mask"])
  np.testing.assert_array_equal(np.asarray(from_codes), np.asarray(from_indices))
  # Gradients of the valid logits reach every valid code (through the straight-through rounding), none
  # reach padding.
  g = np.asarray(g)
  assert np.all(np.abs(g[np.asarray(s["speech_mask"])]).sum(-1) > 0)
  assert np.all(g[~np.asarray(s["speech_mask"])] == 0)


@pytest.mark.parametrize("prompt_len", [0, 3])
def test_kv_cached_decoding_matches_full_forward(setup, prompt_len):
  s = setup
  m, params = s["model"], s["params"]
  full = s["apply"](params, s["text"], s["text_mask"], s["codes"], s["speech_mask"])
  pre_idx = s["idx"][:, :prompt_len]
  pre_mask = s["speech_mask"][:, :prompt_len]
  prefill = jax.jit(lambda p, t, tm, i, im: generation.prefill(m, p, t, tm, i, im, cache_len=TT + TS + 2))
  step = jax.jit(lambda p, c, tok, pos: generation.decode_step(m, p, c, tok, pos))
  logits, cache, prefix_len = prefill(params, s["text"], s["text_mask"], pre_idx, pre_mask)
  np.testing.assert_array_equal(np.asarray(prefix_len), TEXT_LEN + 2 + np.minimum(SPEECH_LEN, prompt_len))
  diffs = [np.abs(np.asarray(logits - full[:, prompt_len])).max()]
  for j in range(prompt_len, TS):
    logits, cache = step(params, cache, s["idx"][:, j], prefix_len + j - prompt_len)
    d = np.abs(np.asarray(logits - full[:, j + 1])).max(-1)
    diffs.append(np.where(j < SPEECH_LEN, d, 0.0).max())   # rows past their length are not compared
  assert max(diffs) < 1e-4, diffs


def test_llm_loss_targets_and_metrics():
  # Two rows, S = 3 speech tokens + eos (index 3); row 0 has 2 tokens, row 1 has 1.
  logits = np.full((2, 3, 4), -5.0, np.float32)
  targets = np.array([[2, 0], [1, 1]])
  mask = np.array([[True, True], [True, False]])
  logits[0, 0, 2] = logits[0, 1, 0] = logits[0, 2, 3] = 5.0       # row 0: all right (incl. eos at j = 2)
  logits[1, 0, 1] = 5.0                                           # row 1: token right
  logits[1, 1, 0] = 5.0                                           # row 1: eos at j = 1 wrong
  logits[1, 2, :] = 100.0                                         # row 1, j = 2 is past eos: ignored
  loss, metrics = llm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  lse = np.log(np.exp(5.0) + 3 * np.exp(-5.0))
  expected = (4 * (lse - 5.0) + (lse + 5.0)) / 5
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["acc"]), 4 / 5)
  np.testing.assert_allclose(float(metrics["eos_acc"]), 1 / 2)


def _alignment_loss_loop(probs, text_len, speech_len, sigma):
  """alignment_loss written out query by query and key by key, from its docstring."""
  total, count = 0.0, 0
  for b in range(probs.shape[0]):
    n, m = int(text_len[b]), int(speech_len[b])
    for h in range(probs.shape[1]):
      for j in range(m + 1):
        q = n + 1 + j                                             # task, then speech_1..speech_m
        cost = 0.0
        for k in range(probs.shape[-1]):
          if 1 <= k <= n:
            d = (k - 1 + 0.5) / n - (j + 0.5) / (m + 1)
            cost += probs[b, h, q, k] * (1.0 - np.exp(-d * d / (2 * sigma ** 2)))
          else:
            cost += probs[b, h, q, k]
        total, count = total + cost, count + 1
  return total / count


def test_alignment_loss_matches_loop_and_its_extremes():
  r = np.random.default_rng(3)
  b, h, t = 3, 2, TT + TS + 2
  valid = np.arange(t)[None] < (TEXT_LEN + SPEECH_LEN + 2)[:, None]
  mask = np.asarray(layers.attention_mask(jnp.asarray(valid), jnp.asarray(valid), True))    # [b, 1, t, t]
  probs = np.where(mask, np.exp(r.normal(size=(b, h, t, t)) * 3), 0.0)
  probs = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-30)      # padding queries: all zero
  got = alignment_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(TEXT_LEN), jnp.asarray(SPEECH_LEN), 0.2)
  np.testing.assert_allclose(float(got), _alignment_loss_loop(probs, TEXT_LEN, SPEECH_LEN, 0.2), rtol=1e-5)
  # All weight on the task position (never text): cost 1. All weight on the diagonal piece: near 0.
  on_task = np.zeros_like(probs)
  diagonal = np.zeros_like(probs)
  for i in range(b):
    n, m = TEXT_LEN[i], SPEECH_LEN[i]
    for j in range(m + 1):
      on_task[i, :, n + 1 + j, n + 1] = 1.0
      diagonal[i, :, n + 1 + j, 1 + min(int((j + 0.5) / (m + 1) * n), n - 1)] = 1.0
  lens = (jnp.asarray(TEXT_LEN), jnp.asarray(SPEECH_LEN))
  assert float(alignment_loss(jnp.asarray(on_task), *lens, 0.2)) == pytest.approx(1.0, abs=1e-6)
  near = float(alignment_loss(jnp.asarray(diagonal), *lens, 0.2))
  np.testing.assert_allclose(near, _alignment_loss_loop(diagonal, TEXT_LEN, SPEECH_LEN, 0.2), rtol=1e-5)
  assert near < 0.2


def test_sown_attention_weights_leave_logits_unchanged(setup):
  s = setup
  plain = s["apply"](s["params"], s["text"], s["text_mask"], s["codes"], s["speech_mask"])
  logits, state = s["model"].apply(s["params"], s["text"], s["text_mask"], s["codes"], s["speech_mask"],
                                   mutable=["intermediates"])
  # The same arithmetic up to float32 rounding: returning the weights as well lets XLA fuse the softmax
  # differently (bit-identical with jax 0.10.2; up to 4.8e-7 apart with 0.11.2), while a sown copy that fed back
  # into the model would move logits by orders of magnitude more.
  np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=1e-5, atol=1e-6)
  probs = np.asarray(last_layer_attention(state["intermediates"]))
  t = TT + TS + 2
  assert probs.shape == (B, 2, t, t)
  valid = np.arange(t)[None] < (TEXT_LEN + SPEECH_LEN + 2)[:, None]
  rows = np.broadcast_to(valid[:, None], probs.shape[:3])
  np.testing.assert_allclose(probs.sum(-1)[rows], 1.0, atol=1e-5)
  future = np.triu(np.ones((t, t), bool), 1)                   # key after query: causal weight 0
  assert np.all(probs[np.broadcast_to(rows[..., None] & future, probs.shape)] == 0)


def test_alignment_loss_trains_a_diagonal_head(setup):
  """Gradient steps on next-token + alignment loss make head 0 of the last layer read the text in order."""
  model = setup["model"]
  params = nn.unbox(setup["params"]["params"])
  lens = (jnp.sum(setup["text_mask"], 1), jnp.sum(setup["speech_mask"], 1))
  opt = optax.adam(1e-2)

  def loss_fn(p):
    logits, state = model.apply({"params": p}, setup["text"], setup["text_mask"], setup["codes"],
                                setup["speech_mask"], mutable=["intermediates"])
    probs = last_layer_attention(state["intermediates"])[:, :1]
    align = alignment_loss(probs, *lens, 0.2)
    return llm_loss(logits, setup["idx"], setup["speech_mask"])[0] + align, (align, probs)

  @jax.jit
  def step(p, st):
    (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    u, st = opt.update(g, st, p)
    return optax.apply_updates(p, u), st, aux

  st = opt.init(params)
  aligns = []
  for _ in range(100):
    params, st, (align, probs) = step(params, st)
    aligns.append(float(align))
  print(f"alignment loss {aligns[0]:.3f} -> {aligns[-1]:.3f}")
  assert aligns[-1] < 0.5 * aligns[0]
  # Row 0 (7 text pieces, 9 speech tokens + eos): the text piece head 0 weighs most follows the diagonal to
  # within one piece, and most of its weight is on text.
  probs = np.asarray(probs)
  j = np.arange(TS + 1)
  read = np.argmax(probs[0, 0, TT + 1:TT + TS + 2, 1:TT + 1], -1)
  np.testing.assert_array_less(np.abs(read - np.floor((j + 0.5) / (TS + 1) * TT)), 1.5)
  assert probs[0, 0, TT + 1:TT + TS + 2, 1:TT + 1].sum(-1).min() > 0.5


def _sp(**kw):
  base = dict(temperature=1.0, top_k=0, top_p=1.0, ras_window=0, ras_tau=0.0, min_ratio=0, max_ratio=20)
  base.update(kw)
  return {k: jnp.float32(v) for k, v in base.items()}


def _draw(logits, sp, history=None, step=0, min_len=0, n=2000):
  logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  history = jnp.full((n, 10), -1, jnp.int32) if history is None else jnp.broadcast_to(history, (n, 10))
  return np.asarray(jax.jit(generation.sample_token)(logits, jax.random.key(0), history, jnp.int32(step),
                                                     jnp.full((n,), min_len, jnp.int32), sp))


def test_sampling_top_k_top_p_eos_mask_and_greedy():
  logits = np.log(np.array([0.1, 0.4, 0.3, 0.15, 0.05]))   # last entry = eos
  assert set(_draw(logits, _sp(top_k=2))) == {1, 2}
  # top_p 0.75: keep while the mass before a token is < 0.75: 0.4, 0.3 (0.4 before), 0.15 (0.7 before).
  assert set(_draw(logits, _sp(top_p=0.75))) == {1, 2, 3}
  full = _draw(logits, _sp())
  assert set(full) == {0, 1, 2, 3, 4}
  assert 4 not in set(_draw(logits, _sp(), step=3, min_len=4))            # eos masked before min_len
  assert 4 in set(_draw(logits, _sp(), step=4, min_len=4))
  assert set(_draw(logits, _sp(temperature=0.0))) == {1}                  # greedy
  assert set(_draw(np.log([0.2, 0.05, 0.05, 0.05, 0.65]), _sp(temperature=0.0), step=0, min_len=1)) == {0}


def test_repetition_aware_sampling():
  logits = np.log(np.array([0.6, 0.1, 0.1, 0.1, 0.1]))
  sp = _sp(top_k=1, ras_window=10, ras_tau=0.1)
  # Token 0 is the only top-k candidate; with it absent from the window it is always chosen ...
  no_repeat = _draw(logits, sp, history=jnp.arange(10, 20, dtype=jnp.int32), step=10)
  assert set(no_repeat) == {0}
  # ... but once it occurs in the last 10 tokens it is redrawn from the full distribution (~40% other tokens).
  history = jnp.array([3, 3, 3, 3, 3, 3, 3, 3, 3, 0], jnp.int32)
  repeat = _draw(logits, sp, history=history, step=10)
  assert 0.3 < np.mean(repeat != 0) < 0.5
  # Occurrences outside the window do not count.
  assert set(_draw(logits, _sp(top_k=1, ras_window=3, ras_tau=0.1), history=history[::-1], step=10)) == {0}


def test_generation_cached_equals_reference_deterministic_and_bounded(setup):
  s = setup
  m, params = s["model"], s["params"]
  kw = dict(prompt_text_ids=s["text"][:, :4], prompt_text_mask=layers.length_mask(jnp.array([4, 2, 0]), 4),
            prompt_indices=s["idx"][:, :5], prompt_mask=layers.length_mask(jnp.array([5, 3, 0]), 5),
            max_new_tokens=40, sampling=dict(min_ratio=2.0, max_ratio=6.0))
  out, lengths = generate(m, params, s["text"], s["text_mask"], jax.random.key(7), **kw)
  again, lengths_again = generate(m, params, s["text"], s["text_mask"], jax.random.key(7), **kw)
  ref, ref_lengths = generate_reference(m, params, s["text"], s["text_mask"], jax.random.key(7), **kw)
  other, _ = generate(m, params, s["text"], s["text_mask"], jax.random.key(8), **kw)
  out, lengths = np.asarray(out), np.asarray(lengths)
  np.testing.assert_array_equal(out, np.asarray(again))
  np.testing.assert_array_equal(lengths, np.asarray(lengths_again))
  np.testing.assert_array_equal(out, np.asarray(ref))
  np.testing.assert_array_equal(lengths, np.asarray(ref_lengths))
  assert not np.array_equal(out, np.asarray(other))
  assert out.shape == (B, 40) and out.dtype == np.int32
  # Bounds count target-text tokens only (the prompt text is excluded), as CosyVoice does.
  assert np.all(lengths >= 2 * TEXT_LEN) and np.all(lengths <= np.minimum(6 * TEXT_LEN, 40))
  for b in range(B):
    assert np.all(out[b, lengths[b]:] == 0) and np.all(out[b, :lengths[b]] < m.num_speech_tokens)
  # Zero-shot continuation, checked by hand for row 1: greedy tokens are the argmax of the plain forward pass
  # over [sos, prompt text + text, task, prompt speech + generated so far].
  greedy, _ = generate(m, params, s["text"], s["text_mask"], jax.random.key(0),
                       **{**kw, "sampling": dict(temperature=0.0, min_ratio=2.0, max_ratio=6.0)})
  text_row = jnp.concatenate([s["text"][1, :2], s["text"][1, :TEXT_LEN[1]]])[None]
  speech_row = jnp.concatenate([s["idx"][1, :3], greedy[1, :3]])[None]
  logits = s["apply"](params, text_row, jnp.ones(text_row.shape, bool), m.fsq.indices_to_codes(speech_row),
                      jnp.ones(speech_row.shape, bool))
  np.testing.assert_array_equal(np.argmax(np.asarray(logits[0, 3:6, :-1]), -1), np.asarray(greedy[1, :3]))


@pytest.fixture(scope="module")
def overfit(setup):
  """The LLM trained on 4 fixed random token sequences (one batch) until it memorises them."""
  model = setup["model"]
  r = np.random.default_rng(1)
  text_len, speech_len = np.array([6, 4, 5, 3]), np.array([12, 9, 14, 7])
  text = jnp.asarray(r.integers(0, TEXT_VOCAB, (4, 6)), jnp.int32)
  text_mask = layers.length_mask(jnp.asarray(text_len), 6)
  idx = jnp.asarray(r.integers(0, model.num_speech_tokens, (4, 14)), jnp.int32)
  speech_mask = layers.length_mask(jnp.asarray(speech_len), 14)
  codes = model.fsq.indices_to_codes(idx)
  params = nn.unbox(setup["params"]["params"])   # a fresh initialisation (parameter shapes are batch-free)
  opt = optax.adam(1e-2)

  def loss_fn(p):
    return llm_loss(model.apply({"params": p}, text, text_mask, codes, speech_mask), idx, speech_mask)

  @jax.jit
  def step(p, st):
    (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    u, st = opt.update(g, st, p)
    return optax.apply_updates(p, u), st, loss, metrics

  st = opt.init(params)
  losses = []
  for _ in range(150):
    params, st, loss, metrics = step(params, st)
    losses.append(float(loss))
  return dict(model=model, params=params, text=text, text_mask=text_mask, idx=np.asarray(idx),
              text_len=text_len, speech_len=speech_len, losses=losses, metrics=metrics)


def test_llm_overfits_one_batch(overfit):
  losses = overfit["losses"]
  print(f"LLM next-token loss {losses[0]:.3f} -> {losses[-1]:.4f}")
  assert losses[-1] <= 0.1 * losses[0]
  assert float(overfit["metrics"]["acc"]) == 1.0 and float(overfit["metrics"]["eos_acc"]) == 1.0


def test_generation_stops_at_eos_and_respects_min_and_max(overfit):
  o = overfit
  greedy = dict(temperature=0.0)
  run = lambda **sp: [np.asarray(a) for a in generate(o["model"], o["params"], o["text"], o["text_mask"],
                                                       jax.random.key(0), max_new_tokens=16,
                                                       sampling={**greedy, **sp})]
  # Memorised sequences come back exactly, each ending where the model emits eos.
  out, lengths = run()
  np.testing.assert_array_equal(lengths, o["speech_len"])
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(out[b, :n], o["idx"][b, :n])
  # min_ratio 3: eos is masked below 3 * text length, so every row runs on at least that far (or to N = 16).
  out, lengths = run(min_ratio=3.0)
  assert np.all(lengths >= np.minimum(3 * o["text_len"], 16))
  for b, n in enumerate(o["speech_len"]):
    np.testing.assert_array_equal(out[b, :n], o["idx"][b, :n])
  # max_ratio 1.5: cut at floor(1.5 * text length) tokens, before the learned eos.
  out, lengths = run(max_ratio=1.5)
  np.testing.assert_array_equal(lengths, np.floor(1.5 * o["text_len"]).astype(int))
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(out[b, :n], o["idx"][b, :n])
    assert np.all(out[b, n:] == 0)


def test_paper_parameter_counts():
  c = config_lib.get_config("paper")
  from e2etts_jax.models.tokenizer import SpeechTokenizer
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree)))
  n_mels = c.audio.n_mels
  tok = jax.eval_shape(lambda: SpeechTokenizer(c).init(jax.random.key(0), jnp.zeros((1, 8, n_mels)),
                                                       jnp.ones((1, 8), bool)))
  model = SpeechLLM(c, c.text.vocab_size)
  fsq = FSQ(c.tokenizer.fsq_levels)
  llm = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool),
                                          jnp.zeros((1, 4, fsq.dim)), jnp.ones((1, 4), bool)))
  n_tok, n_llm = count(tok), count(llm)
  print(f"paper: tokenizer {n_tok / 1e6:.1f}M parameters, LLM {n_llm / 1e6:.1f}M parameters")
  assert abs(n_llm - 0.6e9) <= 0.06e9
