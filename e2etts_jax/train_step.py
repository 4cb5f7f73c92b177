"""Train state, its shardings from logical annotations, and the one jit-compiled joint update step.

The state is built MaxText-style: `jax.eval_shape` of the boxed init gives the abstract state, its logical
annotations give NamedShardings through the single rule table, and a jit with those out_shardings materialises
it already sharded. The step is `jax.jit` with explicit in/out shardings and the state donated.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from e2etts_jax import config_lib, objectives, optim, sharding
from e2etts_jax.system import System


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array            # steps taken in the current stage (the LR follows the optimizer's count of updates)
  params: Any                # {'tokenizer', 'llm', 'fm', 'rm'}
  opt_state: Any
  bad_steps: jax.Array       # consecutive non-finite steps (skipped updates)
  total_bad_steps: jax.Array
  # The weight average (train.ema_decay > 0, else None): {'params': {network: tree}, 'count': {network: updates
  # averaged}} for the networks of train.ema_networks. It spans stages: a network's average goes on while it
  # trains and is kept while a stage freezes it.
  ema: Any = None


def ema_networks(config) -> tuple[str, ...]:
  """The networks whose weight average the state keeps (none when train.ema_decay is 0)."""
  return tuple(config_lib.parse_list(config.train.ema_networks)) if config.train.ema_decay > 0 else ()


def _boxed_state(system: System, tx: optax.GradientTransformation, rng: jax.Array, params=None,
                 ema=None) -> TrainState:
  params = system.init(rng) if params is None else params
  zero = jnp.zeros((), jnp.int32)
  nets = ema_networks(system.config)
  if ema is None and nets:
    # Zeros, not a copy of the params: the first update's bias-corrected weight is exactly 1, so the average
    # starts as the params themselves, and its buffers stay distinct from theirs (the state is donated).
    ema = {"params": {n: jax.tree.map(jnp.zeros_like, params[n]) for n in nets},
           "count": {n: zero for n in nets}}
  return TrainState(step=zero, params=params, opt_state=tx.init(params), bad_steps=zero, total_bad_steps=zero,
                    ema=ema)


def update_ema(ema: dict, params: dict, trainable, decay: float) -> dict:
  """The weight average after one more update of the `trainable` networks' `params`.

  Bias-corrected (Adam's correction, folded into the stored value): after n updates the average is
  sum_i w_i p_i with weights proportional to decay^(n - i) summing to 1, so the zero start never shows.
  """
  out = {"params": dict(ema["params"]), "count": dict(ema["count"])}
  for net in ema["params"]:
    if net not in trainable:
      continue
    count = ema["count"][net] + 1
    weight = (1.0 - decay) / (1.0 - jnp.power(jnp.float32(decay), count.astype(jnp.float32)))
    out["params"][net] = jax.tree.map(lambda e, p: e + weight.astype(e.dtype) * (p - e), ema["params"][net],
                                      params[net])
    out["count"][net] = count
  return out


def ema_params(params: dict, ema: dict | None) -> dict:
  """`params` with each averaged network's weights replaced by its average (networks never trained keep theirs);
  `params` itself when no network has an average."""
  trained = {} if ema is None else {n: t for n, t in ema["params"].items() if int(ema["count"][n]) > 0}
  return {**params, **trained} if trained else params


def state_shardings(system: System, tx: optax.GradientTransformation, mesh: Mesh) -> tuple[TrainState, TrainState]:
  """(abstract state with shardings attached, NamedSharding tree) — no parameter is allocated."""
  boxed = jax.eval_shape(functools.partial(_boxed_state, system, tx), jax.random.key(0))
  shard_tree = sharding.param_shardings(boxed, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
                          shard_tree)
  return abstract, shard_tree


def create_train_state(system: System, tx: optax.GradientTransformation, mesh: Mesh, rng: jax.Array,
                       params: Any = None, ema: Any = None) -> tuple[TrainState, TrainState]:
  """A fresh sharded state (new params from `rng`, or the given `params` with a fresh optimizer; `ema`, the
  previous stage's weight average, carries on where given and starts anew otherwise)."""
  _, shard_tree = state_shardings(system, tx, mesh)
  if params is None:
    init = jax.jit(lambda r: nn.unbox(_boxed_state(system, tx, r)), out_shardings=shard_tree)
    return init(rng), shard_tree
  # Carry params into a new stage: one jit re-places them and builds the new stage's optimizer state, so every
  # leaf is a fresh buffer (donation later needs distinct buffers).
  fresh = jax.jit(lambda p, e: nn.unbox(_boxed_state(system, tx, None, params=p, ema=e)),
                  out_shardings=shard_tree, donate_argnums=(0, 1))
  return fresh(params, ema), shard_tree


def global_norm_per_network(grads: dict) -> dict:
  return {n: optax.tree.norm(g) for n, g in grads.items()}


def make_train_step(system: System, tx: optax.GradientTransformation, stage: str, mesh: Mesh,
                    shard_tree: TrainState, batch_example: dict) -> "TrainStep":
  """jit(step)(state, batch, rng) -> (state, metrics). Non-finite loss/grads skip the update and are counted."""
  loss = functools.partial(objectives.loss_fn, system=system, stage=stage)
  trainable = objectives.stage_spec(system.config, stage)[0]
  ema_decay = float(system.config.train.ema_decay)
  tx = optax.with_extra_args_support(tx)   # a plain optax transform (tests) ignores `schedule`

  def step(state: TrainState, batch: dict, rng: jax.Array, schedule: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    (total, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, batch, rng)
    norms = global_norm_per_network(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, schedule=schedule)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(total) & jnp.all(jnp.stack([jnp.isfinite(v) for v in norms.values()]))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    ema = None if state.ema is None else keep(update_ema(state.ema, params, trainable, ema_decay), state.ema)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        ema=ema,
        bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
        total_bad_steps=state.total_bad_steps + (~ok).astype(jnp.int32))
    metrics.update({f"grad_norm/{n}": norms[n] for n in trainable})
    metrics["skipped"] = (~ok).astype(jnp.float32)
    # The share of the batch's padded mel frames that hold speech: what padding (buckets, joined rows) costs.
    metrics["data/speech_share"] = jnp.mean(batch["mel_mask"].astype(jnp.float32))
    metrics["bad_steps"] = new_state.bad_steps   # a separate output: the state itself is donated next step
    return new_state, metrics

  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch_example.items()}
  rep = sharding.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(shard_tree, batch_sh, rep, rep), out_shardings=(shard_tree, rep),
                   donate_argnums=(0,))
  # The schedule's numbers are an argument, not constants of the program: a run or test with another learning
  # rate or stage length compiles nothing new (the persistent compilation cache keys on the program).
  values = optim.schedule_values(system.config, stage)
  # One global replicated array, made once from each process's own copy: a host array passed at every call would
  # be transferred (across processes) at every step.
  schedule = jax.make_array_from_callback(values.shape, rep, lambda index: values[index])
  return TrainStep(jitted, schedule)


class TrainStep:
  """step(state, batch, rng) -> (state, metrics): the jitted step(state, batch, rng, schedule) with this stage's
  schedule numbers (optim.schedule_values). `lower(state, batch, rng)` lowers it; the compiled program takes
  the schedule as its fourth argument: `compiled(state, batch, rng, step.schedule)`."""

  def __init__(self, jitted: Callable, schedule):
    self.jitted, self.schedule = jitted, schedule

  def __call__(self, state: TrainState, batch: dict, rng: jax.Array):
    return self.jitted(state, batch, rng, self.schedule)

  def lower(self, state, batch, rng):
    return self.jitted.lower(state, batch, rng, self.schedule)


def make_eval_step(system: System, stage: str, mesh: Mesh, params_shardings: Any, batch_example: dict) -> Callable:
  """jit(eval)(params, batch, rngs) -> metrics of the stage's loss function, no update, under each of the keys
  rngs [sets]: each metric is [sets]. One call over 4 sets of draws ran 1.3-1.5 x faster on a CPU core than one
  call per set (the batch's matmuls grow with the sets)."""
  def evaluate(params, batch, rngs):
    one = lambda rng: objectives.loss_fn(params, batch, rng, system=system, stage=stage, train=False)[1]
    return jax.vmap(one)(rngs)
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch_example.items()}
  rep = sharding.replicated(mesh)
  return jax.jit(evaluate, in_shardings=(params_shardings, batch_sh, rep), out_shardings=rep)
