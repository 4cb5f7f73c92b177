"""Reward model: CTC loss against a hand-enumerated example, greedy decoding, padding invariance, unit speaker
embeddings, ignored auxiliary labels, soft-code gradients, overfitting, and the paper-size parameter count."""
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from e2etts_jax import config_lib, sharding
from e2etts_jax.models import reward

C, S, A = 6, 3, 2          # CTC classes (blank + 5), speakers, aux kinds
B, T = 3, 8


@pytest.fixture(scope="module")
def setup():
  """The tiny config's RM, initialised once for the module; a batch with padded rows."""
  config = config_lib.get_config("tiny")
  d = len(config.tokenizer.fsq_levels)
  r = np.random.default_rng(0)
  codes = jnp.asarray(r.integers(-1, 2, (B, T, d)), jnp.float32)
  mask = jnp.arange(T)[None] < jnp.array([[T], [T - 3], [T - 1]])
  model = reward.RewardModel(config, num_ctc_classes=C, num_speakers=S, num_aux=A)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), codes, mask))
  return config, model, params, codes, mask


def _path_probability(probs, label):
  """Sum over all frame paths that collapse (merge repeats, drop blanks) to `label`: brute force."""
  total = 0.0
  for path in itertools.product(range(probs.shape[1]), repeat=probs.shape[0]):
    collapsed = [k for i, k in enumerate(path) if k != 0 and (i == 0 or path[i - 1] != k)]
    if collapsed == list(label):
      total += math.prod(probs[t, k] for t, k in enumerate(path))
  return total


def test_ctc_loss_matches_enumeration():
  r = np.random.default_rng(1)
  logits = r.standard_normal((3, 4, 3)).astype(np.float32)   # 3 rows, 4 frames, {blank, a, b}
  ctc_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], bool)
  labels = np.array([[1, 2], [1, 1], [2, 0]], np.int32)       # "ab" in 3 frames, "aa" (needs a blank), "b"
  label_mask = np.array([[1, 1], [1, 1], [1, 0]], bool)
  out = {"ctc_logits": jnp.asarray(logits), "ctc_mask": jnp.asarray(ctc_mask),
         "spk_logits": jnp.zeros((3, S)), "aux_logits": jnp.zeros((3, A, 3))}
  terms = jax.jit(reward.rm_loss_terms)(out, jnp.asarray(labels), jnp.asarray(label_mask),
                                        jnp.zeros(3, jnp.int32), jnp.zeros((3, A), jnp.int32))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  nll = [-math.log(_path_probability(probs[b][ctc_mask[b]], labels[b][label_mask[b]])) for b in range(3)]
  # Per-label normalisation: summed negative log-likelihood over the number of labels (2 + 2 + 1).
  assert float(terms["asr"]) == pytest.approx(sum(nll) / 5, rel=1e-4)
  # Sanity of the brute force itself: "aa" in 4 frames has exactly five paths (a_aa, aa_a, a__a, _a_a, a_a_).
  onehot_paths = [p for p in itertools.product(range(3), repeat=4)
                  if [k for i, k in enumerate(p) if k and (i == 0 or p[i - 1] != k)] == [1, 1]]
  assert len(onehot_paths) == 5


def test_greedy_decode_inverts_alignment():
  alignment = [[0, 3, 3, 0, 3, 1, 1, 0, 2, 2, 5, 5], [4, 4, 4, 0, 0, 4, 2, 2, 0, 0, 0, 0]]
  mask = np.array([[True] * 12, [True] * 7 + [False] * 5])
  logits = np.eye(C)[np.array(alignment)] * 5.0
  logits[1, 7:] = np.eye(C)[1] * 5.0                         # junk past the mask must be ignored
  assert reward.ctc_greedy_decode(logits, mask) == [[3, 3, 1, 2, 5], [4, 4, 2]]
  assert reward.ctc_char_error_rate([[3, 3, 1, 2, 5], [4, 4, 2]], [[3, 1, 2, 5], [4, 4, 2]]) == pytest.approx(1 / 8)


def test_outputs_shapes_unit_embedding_and_padding_invariance(setup):
  config, model, params, codes, mask = setup
  run = jax.jit(lambda c: model.apply(params, c, mask))
  out = run(codes)
  up = config.rm.ctc_upsample
  assert out["ctc_logits"].shape == (B, T * up, C) and out["ctc_mask"].shape == (B, T * up)
  assert out["spk_logits"].shape == (B, S) and out["aux_logits"].shape == (B, A, config.rm.aux_classes)
  assert out["spk_embed"].shape == (B, config.rm.spk_embed_dim)
  np.testing.assert_allclose(np.linalg.norm(out["spk_embed"], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(out["ctc_mask"], np.repeat(np.asarray(mask), up, axis=1))
  junk = run(jnp.where(mask[..., None], codes, 9.0))
  cm = np.asarray(out["ctc_mask"])
  np.testing.assert_allclose(np.asarray(junk["ctc_logits"])[cm], np.asarray(out["ctc_logits"])[cm], atol=1e-5)
  for k in ("spk_embed", "spk_logits", "aux_logits"):
    np.testing.assert_allclose(junk[k], out[k], atol=1e-5)
  # Sensitivity: valid frames do matter.
  assert not np.allclose(run(codes.at[:, 0].multiply(-1))["spk_embed"], out["spk_embed"], atol=1e-4)


def test_aux_minus_one_is_ignored():
  terms_fn = jax.jit(reward.rm_loss_terms)
  r = np.random.default_rng(2)
  out = {"ctc_logits": jnp.zeros((2, 4, C)), "ctc_mask": jnp.ones((2, 4), bool),
         "spk_logits": jnp.asarray(r.standard_normal((2, S)), jnp.float32),
         "aux_logits": jnp.asarray(r.standard_normal((2, A, 3)), jnp.float32)}
  labels, label_mask = jnp.ones((2, 1), jnp.int32), jnp.ones((2, 1), bool)
  aux = jnp.array([[2, -1], [-1, 0]], jnp.int32)
  terms = terms_fn(out, labels, label_mask, jnp.array([0, 1]), aux)
  logp = jax.nn.log_softmax(out["aux_logits"], -1)
  expected = -(logp[0, 0, 2] + logp[1, 1, 0]) / 2
  assert float(terms["aux"]) == pytest.approx(float(expected), rel=1e-6)
  # Logits of the ignored entries cannot change the loss; an all-ignored batch gives 0, not NaN.
  bumped = dict(out, aux_logits=out["aux_logits"].at[0, 1].add(10.0).at[1, 0].add(-10.0))
  assert float(terms_fn(bumped, labels, label_mask, jnp.array([0, 1]), aux)["aux"]) == \
      pytest.approx(float(terms["aux"]), rel=1e-6)
  none = terms_fn(out, labels, label_mask, jnp.array([0, 1]), -jnp.ones_like(aux))
  assert float(none["aux"]) == 0.0 and np.isfinite(float(none["aux_acc"]))
  spk = -jax.nn.log_softmax(out["spk_logits"], -1)[jnp.arange(2), jnp.array([0, 1])].mean()
  assert float(terms["spk"]) == pytest.approx(float(spk), rel=1e-6)


def _labels():
  labels = np.array([[1, 2, 3, 3, 0], [4, 5, 0, 0, 0], [2, 1, 5, 4, 0]], np.int32)
  return jnp.asarray(labels), jnp.asarray(labels > 0)


def test_params_shard_on_a_mesh(setup):
  """Class-count axes (C, speakers, aux) are replicated, so any label set size shards on any mesh."""
  config, model, params, codes, mask = setup
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
  shardings = sharding.param_shardings(jax.eval_shape(model.init, jax.random.key(0), codes, mask), mesh)
  assert shardings["params"]["ctc_out"]["kernel"].spec == P("tensor", None)
  assert shardings["params"]["spk_out"]["kernel"].spec == P(None, None)
  placed = jax.device_put(params, shardings)
  assert placed["params"]["encoder"]["layers"]["attn"]["query"]["kernel"].sharding.spec == \
      P(None, "fsdp", "tensor", None)


def test_soft_codes_give_gradients(setup):
  """Stage 3 feeds Gumbel mixtures: the loss must be differentiable w.r.t. the code vectors."""
  config, model, params, codes, mask = setup
  labels, label_mask = _labels()

  def loss(c):
    out = model.apply(params, c, mask)
    return reward.rm_loss(out, labels, label_mask, jnp.array([0, 1, 2]), jnp.zeros((B, A), jnp.int32),
                          config.rm)[0]

  g = jax.jit(jax.grad(loss))(codes * 0.7)
  assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)[np.asarray(mask)]).sum() > 0
  np.testing.assert_array_equal(np.asarray(g)[~np.asarray(mask)], 0.0)


def test_reward_model_overfits_one_batch(setup):
  """Measured: the full weighted rm_loss (CTC per label + 0.1 speaker CE + 0.1 aux CE) on one fixed batch."""
  config, model, params, codes, mask = setup
  labels, label_mask = _labels()
  speaker, aux = jnp.array([0, 1, 2]), jnp.array([[0, 1], [2, -1], [1, 0]], jnp.int32)

  def loss(p):
    return reward.rm_loss(model.apply(p, codes, mask), labels, label_mask, speaker, aux, config.rm)

  opt = optax.adam(1e-2)

  @jax.jit
  def train(p):
    def step(carry, _):
      p, s = carry
      value, g = jax.value_and_grad(lambda p: loss(p)[0])(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), value
    (p, _), values = jax.lax.scan(step, (p, opt.init(p)), None, length=80)
    return p, values[0], loss(p)

  trained, before, (after, metrics) = train(params)
  assert float(after) < 0.1 * float(before), (float(before), float(after))
  assert float(metrics["rm_spk_acc"]) == 1.0 and float(metrics["rm_aux_acc"]) == 1.0
  out = jax.jit(model.apply)(trained, codes, mask)
  assert reward.ctc_greedy_decode(out["ctc_logits"], out["ctc_mask"]) == [[1, 2, 3, 3], [4, 5], [2, 1, 5, 4]]


def test_paper_size_parameter_count():
  config = config_lib.get_config("paper")
  d = len(config.tokenizer.fsq_levels)
  model = reward.RewardModel(config, num_ctc_classes=32, num_speakers=1000, num_aux=2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4, d)), jnp.ones((1, 4), bool)))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  # The method notes give the RM ~0.6B; the encoder dominates: 24 layers x (4 d^2 + 3 d * mlp) = 601M, plus heads.
  assert 0.54e9 < count < 0.66e9, count
