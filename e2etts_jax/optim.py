"""One optax multi-transform over the four networks: AdamW (or Muon on the transformer blocks' matrices) +
warmup/cosine + clipping for the networks a stage trains, zero updates (and no optimizer state) for the frozen ones."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from optax import contrib as optax_contrib

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


def _dict_keys(path) -> list:
  # Parameters may arrive boxed (nn.Partitioned, whose value is an attribute in the path) or as plain arrays.
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def muon_dimensions(params):
  """The matrix view Muon orthogonalises, per parameter: optax's MuonDimensionNumbers for each transformer-block
  kernel, None for everything else (embeddings, input and output projections, norms, biases: AdamW's, as in
  Muon's recipe).

  Block kernels are stacked over layers ([layers, in, out], the attention's [layers, embed, heads, kv] and
  [layers, heads, kv, embed]): axis 0 is a batch axis, so each layer's matrix is orthogonalised on its own, and
  heads x kv count as one matrix dimension (`layers.Attention`'s projection 'out' contracts both).
  """
  def dims(path, x):
    keys = _dict_keys(path)
    if "layers" not in keys or keys[-1] != "kernel" or len(x.shape) < 3:
      return None
    fan_in = (1, 2) if keys[-2] == "out" else (1,)
    fan_out = tuple(a for a in range(1, len(x.shape)) if a not in fan_in)
    return optax_contrib.MuonDimensionNumbers(reduction_axis=fan_in, output_axis=fan_out)
  return jax.tree_util.tree_map_with_path(dims, params)


def _is_dims(x) -> bool:
  return x is None or isinstance(x, optax_contrib.MuonDimensionNumbers)


def scale_to_rms(rms: float) -> optax.GradientTransformation:
  """Scales each orthogonalised [.., fan_in, fan_out] update by rms * sqrt(max(fan_in, fan_out)): an update of
  RMS about `rms` per entry whatever the matrix's shape. At 0.2, AdamW's typical update RMS, Muon runs at AdamW's
  learning rates and weight decay (Liu et al. 2025, "Muon is scalable for LLM training")."""
  def update(updates, state, params=None):
    del params
    def scale(u, d):
      if d is None:
        return u
      fan_in = math.prod(u.shape[a] for a in d.reduction_axis)
      fan_out = math.prod(u.shape[a] for a in d.output_axis)
      return u * (rms * math.sqrt(max(fan_in, fan_out)))
    return jax.tree.map(scale, updates, muon_dimensions(updates)), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict, stage: str) -> optax.GradientTransformation:
  """The stage's optimizer. Its update takes the schedule's numbers as `schedule=` (see schedule_values)."""
  trainable = config_lib.parse_list(config.train[stage].trainable)
  t = config.train
  default = schedule_values(config, stage)

  def network_tx(name):
    if name not in trainable:
      return optax.set_to_zero()
    lr_scale = float(t.lr_scale[name]) * float(t[stage].lr_scale[name])
    # optax.adamw's own chain (hence its state tree and checkpoints), with the schedule's numbers as an argument.
    adamw = optax.chain(optax.scale_by_adam(b1=t.b1, b2=t.b2),
                        optax.add_decayed_weights(t.weight_decay, _decay_mask),
                        scale_by_scheduled_lr(lr_scale, default))
    tx = adamw
    if t.optimizer == "muon" and name in config_lib.parse_list(t.muon_networks):
      muon = optax.chain(optax_contrib.scale_by_muon(beta=t.muon_momentum, nesterov=True,
                                                     weight_dimension_numbers=muon_dimensions),
                         scale_to_rms(t.muon_rms),
                         optax.add_decayed_weights(t.weight_decay),
                         scale_by_scheduled_lr(lr_scale, default))
      tx = optax.multi_transform(
          {"muon": muon, "adamw": adamw},
          lambda params: jax.tree.map(lambda d: "adamw" if d is None else "muon", muon_dimensions(params),
                                      is_leaf=_is_dims))
    # Per-network clipping: one network's gradient spike must not shrink the others' updates.
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)

  return optax.multi_transform({n: network_tx(n) for n in NETWORKS},
                               lambda params: {n: jax.tree.map(lambda _: n, params[n]) for n in params})
