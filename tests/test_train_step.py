"""The sharded joint step: mesh invariance, stage 3 gradient paths, frozen networks, non-finite skipping."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from e2etts_jax import config_lib, objectives, optim, sharding, train_step
from e2etts_jax.system import DataInfo, System

INFO = DataInfo(text_vocab_size=64, num_ctc_classes=29, num_speakers=4, num_aux=2)


@pytest.fixture
def system(tiny_config):
  return System(tiny_config, INFO)


def _run(system, stage, mesh_shape, batch, steps=2, tx=None):
  c = system.config
  c.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(c.mesh, devices)
  tx = tx or optim.make_optimizer(c, stage)
  state, sh = train_step.create_train_state(system, tx, mesh, jax.random.key(0))
  step = train_step.make_train_step(system, tx, stage, mesh, sh, batch)
  losses = []
  for _ in range(steps):
    state, m = step(state, batch, jax.random.key(1))
    losses.append(float(m["loss/total"]))
  return losses, jax.device_get(state.params), jax.device_get(m)


# Every mesh axis is exercised by one of the two tests below, and all three together by both; each mesh costs a
# state-init and a step compile (~1 min on 2 cores), so neither test repeats the other's single-axis-heavy mesh.
LOSS_MESHES = [(8, 1, 1), (2, 2, 2)]      # pure data parallelism (one example per device), then all three axes
PARAM_MESHES = [(2, 4, 1), (2, 2, 2)]     # parameters sharded 4 ways (fsdp), then all three axes


def test_sharded_step_matches_single_device_losses(system):
  """The real optimizer (AdamW): the loss trajectory over 3 steps is the same on every mesh."""
  system.config.train.stage1.warmup_steps = 1
  batch = system.random_batch(8, 100, seed=0)
  ref, _, _ = _run(system, "stage1", (1, 1, 1), batch, steps=3)
  # The speech share is the global batch's: the same on every mesh, where each device holds a slice of the rows.
  share = float(np.mean(np.asarray(batch["mel_mask"], np.float32)))
  assert 0.5 < share < 1.0   # random_batch's rows are ragged
  for shape in LOSS_MESHES:
    losses, _, metrics = _run(system, "stage1", shape, batch, steps=3)
    np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=str(shape))
    assert float(metrics["data/speech_share"]) == pytest.approx(share, rel=1e-6), shape


def test_sharded_step_matches_single_device_params(system):
  """Updated parameters agree to float32 rounding. Plain SGD through the same step function: AdamW divides by
  sqrt(v), which turns reduction-order noise in a near-cancelling gradient element into a visible difference
  in that element's update, a property of the optimizer rather than of the sharding.

  Tolerance 1e-4 of each tensor's update, not 1e-5: the RM's CTC loss (a log-space forward-backward over every
  frame) amplifies the rounding differences that a different per-device batch shape brings to ~5e-5 relative in the
  gradients (measured; the FM and LLM paths agree to ~1e-6). A sharding bug gives differences of order 1."""
  batch = system.random_batch(8, 100, seed=0)
  sgd = optax.sgd(0.05)
  ref_losses, ref, _ = _run(system, "stage1", (1, 1, 1), batch, tx=sgd)
  init = jax.device_get(train_step.create_train_state(system, sgd, sharding.make_mesh(
      system.config.mesh, jax.devices()[:1]), jax.random.key(0))[0].params)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(init)))
  assert moved > 1e-3   # the steps really changed the parameters
  for shape in PARAM_MESHES:
    losses, params, _ = _run(system, "stage1", shape, batch, tx=sgd)
    # Step 1's loss is computed before any update (exact up to reduction order); step 2's follows the
    # parameters, which may differ by the tolerance below, so it gets the same 1e-4 (measured 2.2e-5 on (2,2,2)).
    np.testing.assert_allclose(losses[0], ref_losses[0], rtol=1e-5, err_msg=str(shape))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, err_msg=str(shape))
    for a, b, p0 in zip(jax.tree.leaves(params), jax.tree.leaves(ref), jax.tree.leaves(init)):
      # Each tensor's update agrees to 1e-4 of that tensor's largest update, plus one float32 spacing of each
      # parameter: p0 + update is rounded to float32, so where the update is tiny against the parameter two
      # nearly equal updates can still land one ulp apart (seen with jax 0.11.2: 1.9e-9 on a tensor whose
      # largest update was 2.6e-6).
      a, b = np.asarray(a), np.asarray(b)
      update = b - np.asarray(p0)
      assert np.all(np.abs(a - b) <= 1e-4 * np.max(np.abs(update)) + np.spacing(np.abs(b))), shape


def test_muon_step_runs_sharded_and_matches_single_device(system):
  """train.optimizer='muon' through the real step: its state (momenta, Newton-Schulz coefficients) is built and
  sharded with the parameters, and the orthogonalised updates of sharded matrices give the single device's loss
  trajectory (an all-three-axes mesh, so fsdp and tensor shard the block kernels Newton-Schulz multiplies)."""
  system.config.train.stage1.warmup_steps = 1
  system.config.train.optimizer = "muon"
  batch = system.random_batch(8, 100, seed=0)
  ref, params, _ = _run(system, "stage1", (1, 1, 1), batch, steps=3)
  assert ref[2] != ref[1] != ref[0]
  losses, _, _ = _run(system, "stage1", (2, 2, 2), batch, steps=3)
  np.testing.assert_allclose(losses, ref, rtol=1e-4)


def test_the_step_program_does_not_depend_on_the_schedule(system):
  """Learning rate, warm-up and stage length are arguments of the compiled step, not constants in it: runs and
  tests that differ only in them share one program (and its persistent-cache entry)."""
  c = system.config
  # An LLM-only stage: the smallest program to lower.
  c.train.stage2.update(trainable="llm", weights={**c.train.stage2.weights, "fm": 0.0, "rm": 0.0})
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  batch = system.random_batch(4, 100, seed=0)

  def program(lr, warmup, steps):
    c.train.stage2.update(learning_rate=lr, warmup_steps=warmup, steps=steps)
    tx = optim.make_optimizer(c, "stage2")
    abstract, sh = train_step.state_shardings(system, tx, mesh)
    return train_step.make_train_step(system, tx, "stage2", mesh, sh, batch).lower(
        abstract, batch, jax.random.key(0)).as_text()

  reference = program(1e-3, 10, 100)
  assert program(3e-4, 2, 7) == reference
  c.train.weight_decay = 0.5      # the rest of the optimizer still shapes the program
  assert program(1e-3, 10, 100) != reference


def _trained_like_params(system, rng):
  @jax.jit   # eager init and per-leaf noise dispatch op by op: ~50 s on 2 cores, against ~5 s compiled
  def make(rng):
    params = flax.linen.unbox(system.init(rng))
    # A freshly initialised FM is zero at its output (AdaLN-Zero / zero output projection), so its velocity does
    # not depend on the tokens yet; move FM and RM off their init point as training would.
    for net in ("fm", "rm"):
      leaves, tree = jax.tree.flatten(params[net])
      keys = jax.random.split(jax.random.key(5), len(leaves))
      params[net] = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                              for x, k in zip(leaves, keys)])
    return params
  return make(rng)


def _jacobian_norms(system, stage, terms, params, batch):
  """{term: {network: sum |d term / d params[network]|}}, a term being a metric name (X alone for 'loss/X'): one
  jitted Jacobian, a row per term (one compile, no op-by-op dispatch)."""
  def losses(p):
    metrics = objectives.loss_fn(p, batch, jax.random.key(2), system=system, stage=stage)[1]
    return jnp.stack([metrics[k if "/" in k else f"loss/{k}"] for k in terms])
  jac = jax.device_get(jax.jit(jax.jacrev(losses))(params))
  return {t: {n: float(sum(np.sum(np.abs(x[i])) for x in jax.tree.leaves(jac[n]))) for n in jac}
          for i, t in enumerate(terms)}


@pytest.mark.parametrize("trainable", ["llm", "llm,fm,rm"])
def test_stage3_llm_gets_gradient_through_fm_and_rm_paths(system, trainable):
  """The E2E terms train the LLM alone, also where stage 3 trains the FM and RM on their own losses: then those
  terms' gradients reach the FM and RM, and the E2E terms' do not."""
  c = system.config
  params = _trained_like_params(system, jax.random.key(0))
  batch = system.random_batch(4, 100, seed=1)
  c.train.stage3.trainable = trainable
  c.train.stage3.weights.update({k: 0.0 for k in c.train.stage3.weights})
  c.train.stage3.weights.update({k: 1.0 for k in objectives.E2E_TERMS})
  own = ()
  if trainable != "llm":
    c.train.stage3.weights.update(fm=1.0, rm=1.0)
    own = ("fm", "rm")
  norms = _jacobian_norms(system, "stage3", objectives.E2E_TERMS + own, params, batch)
  for path in objectives.E2E_TERMS:
    g = norms[path]
    assert g["llm"] > 0, path
    for frozen in ("tokenizer", "fm", "rm"):
      assert g[frozen] == 0, (path, frozen)
  for net in own:
    assert norms[net][net] > 0, net
    assert norms[net]["llm"] == norms[net]["tokenizer"] == 0, net


def test_llm_alignment_term_trains_the_llm_alone(system):
  """The guided-attention term (weight llm_align) is reported and its gradient reaches only the LLM."""
  system.config.train.stage2.weights.llm_align = 1.0
  params = _trained_like_params(system, jax.random.key(0))
  batch = system.random_batch(4, 100, seed=1)
  norms = _jacobian_norms(system, "stage2", ("llm_align",), params, batch)["llm_align"]
  assert norms["llm"] > 0
  assert norms["tokenizer"] == norms["fm"] == norms["rm"] == 0


def test_held_out_text_gain_compares_own_and_next_rows_text(system):
  """llm/text_gain (held-out only) is the next-token loss with the next row's text minus with its own: exactly 0
  when every row has the same text, and not 0 otherwise."""
  params = _trained_like_params(system, jax.random.key(0))
  batch = system.random_batch(4, 100, seed=1)
  fn = jax.jit(lambda b, train: objectives.loss_fn(params, b, jax.random.key(2), system=system, stage="stage2",
                                                    train=train)[1], static_argnums=1)
  assert "llm/text_gain" not in fn(batch, True)
  assert float(fn(batch, False)["llm/text_gain"]) != 0.0
  same = {**batch, "text_ids": jnp.broadcast_to(batch["text_ids"][:1], batch["text_ids"].shape),
          "text_mask": jnp.broadcast_to(batch["text_mask"][:1], batch["text_mask"].shape)}
  assert float(fn(same, False)["llm/text_gain"]) == 0.0


def test_stage_rm_spk_scale_weights_only_the_speaker_term(system):
  """train.<stage>.rm_spk_scale multiplies rm.spk_weight in that stage's RM loss and nothing else."""
  c = system.config
  params = _trained_like_params(system, jax.random.key(0))
  batch = system.random_batch(4, 100, seed=1)

  def metrics(scale):
    c.train.stage2.rm_spk_scale = scale
    return jax.device_get(jax.jit(lambda p: objectives.loss_fn(p, batch, jax.random.key(2), system=system,
                                                               stage="stage2")[1])(params))

  base, scaled = metrics(1.0), metrics(4.0)
  for k in ("rm/rm_asr", "rm/rm_spk", "rm/rm_aux", "loss/fm", "loss/llm"):
    assert scaled[k] == base[k], k
  rm = c.rm
  expect = (rm.asr_weight * base["rm/rm_asr"] + 4.0 * rm.spk_weight * base["rm/rm_spk"]
            + rm.aux_weight * base["rm/rm_aux"])
  assert float(scaled["loss/rm"]) == pytest.approx(float(expect), rel=1e-6)
  extra = 3.0 * rm.spk_weight * base["rm/rm_spk"] * c.train.stage2.weights.rm
  assert float(scaled["loss/total"] - base["loss/total"]) == pytest.approx(float(extra), rel=1e-5)
  assert extra > 0


def test_usage_dependence_adds_the_channels_mutual_information_to_the_usage_term(system):
  """tokenizer.usage_dependence weights fsq.FSQ.dependence inside stage 1's code-usage term, and nothing else."""
  c = system.config
  params = _trained_like_params(system, jax.random.key(0))
  batch = system.random_batch(4, 100, seed=1)

  def metrics(weight):
    c.tokenizer.usage_dependence = weight
    return jax.device_get(jax.jit(lambda p: objectives.loss_fn(p, batch, jax.random.key(2), system=system,
                                                               stage="stage1")[1])(params))

  base, weighted = metrics(0.0), metrics(2.5)
  dep = float(base["codes/dependence"])
  assert 0.0 < dep < 1.0 and float(weighted["codes/dependence"]) == dep
  per_channel = (len(c.tokenizer.fsq_levels) - 1) / 2      # the weight is per channel (fsq.FSQ.usage_loss)
  assert float(weighted["loss/usage"] - base["loss/usage"]) == pytest.approx(2.5 * per_channel * dep, rel=1e-5)
  extra = 2.5 * per_channel * dep * c.train.stage1.weights.usage
  assert float(weighted["loss/total"] - base["loss/total"]) == pytest.approx(extra, rel=1e-4)


# Each stage-1 term that can shape the codes, the metric that is that term alone, and the network it trains.
SHAPING_TERMS = {"llm": ("loss/llm", "llm"), "rm": ("rm/rm_asr", "rm"), "rm_spk": ("rm/rm_spk", "rm"),
                 "fm": ("loss/fm", "fm")}


@pytest.mark.parametrize("token_grads", ["llm,rm,rm_spk,fm", "rm,rm_spk", "llm,rm,fm"])
def test_stage1_token_grads_name_the_terms_that_shape_the_tokenizer(system, token_grads):
  """Every stage-1 term trains its own network either way; only the named ones also reach the tokenizer, and
  detaching some changes no loss value."""
  c = system.config
  params = _trained_like_params(system, jax.random.key(0))
  batch = system.random_batch(4, 100, seed=1)
  forward = lambda: jax.device_get(jax.jit(lambda p: objectives.loss_fn(p, batch, jax.random.key(2), system=system,
                                                                          stage="stage1")[1])(params))
  joint = forward()
  c.train.stage1.token_grads = token_grads
  np.testing.assert_allclose(forward()["loss/total"], joint["loss/total"], rtol=1e-6)
  norms = _jacobian_norms(system, "stage1", tuple(m for m, _ in SHAPING_TERMS.values()), params, batch)
  for term, (metric, network) in SHAPING_TERMS.items():
    g = norms[metric]
    assert g[network] > 0, term
    assert (g["tokenizer"] > 0) == (term in token_grads.split(",")), (term, g["tokenizer"])


def test_stage3_frozen_networks_bit_identical_after_step(system):
  batch = system.random_batch(4, 100, seed=2)
  c = system.config
  c.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  tx = optim.make_optimizer(c, "stage3")
  state, sh = train_step.create_train_state(system, tx, mesh, jax.random.key(0))
  before = jax.device_get(state.params)
  step = train_step.make_train_step(system, tx, "stage3", mesh, sh, batch)
  for _ in range(2):   # the warm-up schedule starts at LR 0: the second step is the first real update
    state, _ = step(state, batch, jax.random.key(1))
  after = jax.device_get(state.params)
  for frozen in ("tokenizer", "fm", "rm"):
    jax.tree.map(np.testing.assert_array_equal, after[frozen], before[frozen])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after["llm"], before["llm"]))
  assert all(changed)


def test_non_finite_loss_skips_update_and_counts(system):
  batch = system.random_batch(4, 100, seed=3)
  batch["mel"] = batch["mel"].at[0, 0, 0].set(jnp.nan)
  c = system.config
  c.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  tx = optim.make_optimizer(c, "stage2")
  state, sh = train_step.create_train_state(system, tx, mesh, jax.random.key(0))
  before = jax.device_get(state.params)
  step = train_step.make_train_step(system, tx, "stage2", mesh, sh, batch)
  for i in range(2):
    state, m = step(state, batch, jax.random.key(1))
    assert float(m["skipped"]) == 1.0
  assert int(state.bad_steps) == 2 and int(state.total_bad_steps) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


def test_weight_average_is_the_bias_corrected_ema_of_the_trained_networks(system):
  """train.ema_decay keeps, for train.ema_networks, sum_i w_i p_i over the parameters after each update with
  weights proportional to decay^(n - i) (summing to 1); a network the stage freezes keeps its average untouched,
  and the raw weights train exactly as without an average."""
  c = system.config
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.train.stage2.update(trainable="llm,rm", warmup_steps=1)   # the FM is averaged but frozen here
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  batch = system.random_batch(4, 100, seed=4)

  def run(decay):
    c.train.update(ema_decay=decay, ema_networks="llm,fm")
    tx = optim.make_optimizer(c, "stage2")
    state, sh = train_step.create_train_state(system, tx, mesh, jax.random.key(0))
    step = train_step.make_train_step(system, tx, "stage2", mesh, sh, batch)
    trail = []
    for _ in range(3):
      state, _ = step(state, batch, jax.random.key(1))
      trail.append(jax.device_get(state.params))
    return jax.device_get(state), trail

  decay = 0.8
  state, trail = run(decay)
  plain, _ = run(0.0)
  assert plain.ema is None and set(state.ema["params"]) == {"llm", "fm"}
  jax.tree.map(np.testing.assert_array_equal, state.params, plain.params)
  assert int(state.ema["count"]["llm"]) == 3 and int(state.ema["count"]["fm"]) == 0
  weights = np.array([decay ** (3 - i) for i in (1, 2, 3)])
  weights /= weights.sum()
  want = jax.tree.map(lambda *ps: sum(w * p for w, p in zip(weights, ps)), *[p["llm"] for p in trail])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state.ema["params"]["llm"],
               want)
  assert any(float(np.max(np.abs(a - b))) > 1e-4
             for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(trail[-1]["llm"])))   # not the last params
  # Frozen: the FM's average is the zeros it starts as (its first update would make it the params exactly), and
  # ema_params then keeps the FM's own weights.
  assert all(not np.any(x) for x in jax.tree.leaves(state.ema["params"]["fm"]))
  merged = train_step.ema_params(state.params, state.ema)
  assert merged["fm"] is state.params["fm"] and merged["llm"] is state.ema["params"]["llm"]
  untrained = {**state.ema, "count": {n: np.int32(0) for n in state.ema["count"]}}
  assert train_step.ema_params(state.params, untrained) is state.params   # load_trained then says 'raw'


def test_dropout_acts_in_training_and_only_on_trainable_networks():
  """Dropout 0.5 in every network, a stage training only the LLM beside the frozen networks' own losses."""
  def metrics(dropout, train):
    c = config_lib.get_config("tiny")   # fresh: each System reads its own config
    for net in config_lib.NETWORKS:
      c[net].dropout = dropout
    c.train.stage2.trainable = "llm"
    system = System(c, INFO)
    params = nn.unbox(system.init(jax.random.key(0)))
    batch = system.random_batch(4, 100, seed=4)
    fn = jax.jit(lambda p, b: objectives.loss_fn(p, b, jax.random.key(3), system=system, stage="stage2",
                                                 train=train)[1])
    return jax.device_get(fn(params, batch))
  ref = metrics(0.0, train=True)
  # Held-out losses are deterministic, and no dropout in training is the identity with the same draws. (Held-out
  # evaluation also reports the LLM's text gain, which training does not compute.)
  held = metrics(0.5, train=False)
  assert set(held) - set(ref) == {"llm/text_gain"} and set(ref) <= set(held)
  for k, v in ref.items():
    np.testing.assert_array_equal(held[k], v, err_msg=k)
  trained = metrics(0.5, train=True)
  assert abs(trained["loss/llm"] - ref["loss/llm"]) > 1e-3
  # The frozen networks run deterministically: their losses and the tokenizer's codes are unchanged.
  for k in ("loss/fm", "loss/rm", "codes/perplexity"):
    np.testing.assert_array_equal(trained[k], ref[k], err_msg=k)
