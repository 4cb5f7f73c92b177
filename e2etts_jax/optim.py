"""One optax multi-transform over the four networks: AdamW + warmup/cosine + clipping for the networks a stage
trains, zero updates (and no optimizer state) for the frozen ones."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from e2etts_jax import config_lib

NETWORKS = config_lib.NETWORKS


def schedule_values(config: ml_collections.ConfigDict, stage: str) -> np.ndarray:
  """The stage's schedule as numbers, float32 [3]: peak LR, warm-up steps, step of the decay's end.

  The train step takes them as an argument rather than as constants, so one compiled step program serves every
  learning rate and stage length (an override of either reuses the persistent compilation cache).
  """
  s = config.train[stage]
  return np.array([s.learning_rate, s.warmup_steps, max(s.steps, s.warmup_steps + 1)], np.float32)


def learning_rate(count: jax.Array, values: jax.Array) -> jax.Array:
  """Linear warm-up from 0 to the peak, then cosine decay to 10% of it at the end step (optax's
  warmup_cosine_decay_schedule, written over traced `values` = schedule_values)."""
  peak, warmup, end = values[0], values[1], values[2]
  t = jnp.asarray(count).astype(jnp.float32)
  warm = peak * t / jnp.maximum(warmup, 1.0)
  frac = jnp.clip((t - warmup) / jnp.maximum(end - warmup, 1.0), 0.0, 1.0)
  decay = peak * (0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
  return jnp.where(t < warmup, warm, decay)


def schedule(config: ml_collections.ConfigDict, stage: str) -> optax.Schedule:
  """The stage's learning rate as a function of its step (for logs and tests; the step uses `learning_rate`)."""
  values = jnp.asarray(schedule_values(config, stage))
  return lambda count: learning_rate(count, values)


def scale_by_scheduled_lr(scale: float, default: np.ndarray) -> optax.GradientTransformationExtraArgs:
  """updates * -(scale * learning_rate(count, schedule)): optax's scale_by_learning_rate with a schedule (the same
  state, a step count), but the schedule's numbers come from `update(..., schedule=values)`; `default` otherwise."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, schedule=None, **extra_args):
    del params, extra_args
    step_size = -scale * learning_rate(state.count, default if schedule is None else schedule)
    updates = jax.tree.map(lambda g: step_size.astype(g.dtype) * g, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def _decay_mask(params):
  # Decay matrices and embeddings only; norms, biases and AdaLN shifts keep their scale.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) in ("kernel", "embedding") for k in path), params)


def make_optimizer(config: ml_collections.ConfigDict, stage: str) -> optax.GradientTransformation:
  """The stage's optimizer. Its update takes the schedule's numbers as `schedule=` (see schedule_values)."""
  trainable = config_lib.parse_list(config.train[stage].trainable)
  t = config.train
  default = schedule_values(config, stage)

  def network_tx(name):
    if name not in trainable:
      return optax.set_to_zero()
    # optax.adamw's own chain (hence its state tree and checkpoints), with the schedule's numbers as an argument.
    adamw = optax.chain(optax.scale_by_adam(b1=t.b1, b2=t.b2),
                        optax.add_decayed_weights(t.weight_decay, _decay_mask),
                        scale_by_scheduled_lr(float(t.lr_scale[name]), default))
    # Per-network clipping: one network's gradient spike must not shrink the others' updates.
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)

  return optax.multi_transform({n: network_tx(n) for n in NETWORKS},
                               lambda params: {n: jax.tree.map(lambda _: n, params[n]) for n in params})
