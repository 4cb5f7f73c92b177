"""One optax multi-transform over the four networks: AdamW + warmup/cosine + clipping for the networks a stage
trains, zero updates (and no optimizer state) for the frozen ones."""
from __future__ import annotations

import jax
import ml_collections
import optax

from e2etts_jax import config_lib

NETWORKS = config_lib.NETWORKS


def schedule(config: ml_collections.ConfigDict, stage: str) -> optax.Schedule:
  """Linear warm-up to the stage's peak LR, then cosine decay to 10% of it at the stage's last step."""
  s = config.train[stage]
  return optax.warmup_cosine_decay_schedule(0.0, s.learning_rate, s.warmup_steps, max(s.steps, s.warmup_steps + 1),
                                            end_value=0.1 * s.learning_rate)


def _decay_mask(params):
  # Decay matrices and embeddings only; norms, biases and AdaLN shifts keep their scale.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) in ("kernel", "embedding") for k in path), params)


def make_optimizer(config: ml_collections.ConfigDict, stage: str) -> optax.GradientTransformation:
  trainable = config_lib.parse_list(config.train[stage].trainable)
  t = config.train
  lr = schedule(config, stage)

  def network_tx(name):
    if name not in trainable:
      return optax.set_to_zero()
    scale = float(t.lr_scale[name])
    net_lr = lr if scale == 1.0 else (lambda step: scale * lr(step))
    # Per-network clipping: one network's gradient spike must not shrink the others' updates.
    return optax.chain(optax.clip_by_global_norm(t.grad_clip),
                       optax.adamw(net_lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=_decay_mask))

  return optax.multi_transform({n: network_tx(n) for n in NETWORKS},
                               lambda params: {n: jax.tree.map(lambda _: n, params[n]) for n in params})
