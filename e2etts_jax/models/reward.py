"""Token-based reward model: one transformer encoder over token code vectors with several recognition heads.

The RM reads token code vectors [B, T, D] (hard FSQ vectors, expected code vectors, or Gumbel-softmax mixtures,
so gradients can flow back into whatever produced them) and recognises, from the same encoder:
  * text, by CTC over characters/pieces at `config.rm.ctc_upsample` frames per token (a per-token two-layer MLP
    whose first layer emits the sub-frames, i.e. a transposed convolution with kernel = stride), because 25 Hz
    tokens alone are too few for fast speech with repeated letters (CTC needs a blank between repeats);
  * the speaker, from mean+std statistics pooling: an L2-normalised embedding `spk_embed` (the FM's speaker
    condition and the evaluation's similarity space) and a linear classifier on it;
  * auxiliary utterance classes (e.g. speaking-rate and pitch bins), from the same pooled vector.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from e2etts_jax.models import layers

Array = jax.Array
# Small axes with no rule in sharding.LOGICAL_RULES (so replicated): code dims, speaker dims, label sets.
_FEATURE = "feature"
_CLASSES = "classes"


class RewardModel(nn.Module):
  """Multi-recognition encoder over token code vectors (uses config.rm, config.model)."""
  config: ml_collections.ConfigDict
  num_ctc_classes: int        # including the CTC blank at index 0
  num_speakers: int
  num_aux: int                # auxiliary label kinds, each with config.rm.aux_classes classes

  @nn.compact
  def __call__(self, codes: Array, mask: Array) -> dict[str, Array]:
    """Recognition outputs.

    Args:
      codes: [B, T, D] float code vectors; mask: [B, T] bool.
    Returns:
      ctc_logits [B, T * up, C] float32 and ctc_mask [B, T * up] bool (up = config.rm.ctc_upsample);
      spk_embed [B, E] unit-norm; spk_logits [B, num_speakers]; aux_logits [B, num_aux, aux_classes].
    """
    rc = self.config.rm
    cfg = layers.TransformerConfig.from_config(rc, self.config.model, adaln=False, causal=False)
    d, dt, up = cfg.d_model, cfg.dtype, int(rc.ctc_upsample)
    b, t, _ = codes.shape

    h = layers.dense(d, (_FEATURE, "embed"), dt, "code_in", use_bias=True)(codes.astype(dt))
    h, _ = layers.Transformer(cfg, name="encoder")(h, mask)

    # CTC: [B, T, d] -> [B, T, up, d] -> [B, T * up, C].
    sub = layers.dense((up, d), ("embed", _FEATURE, "mlp"), dt, "ctc_up", use_bias=True)(h)
    sub = nn.gelu(sub.reshape(b, t * up, d))
    ctc_logits = layers.dense(self.num_ctc_classes, ("mlp", _CLASSES), dt, "ctc_out", use_bias=True)(sub)
    ctc_mask = jnp.repeat(mask, up, axis=1)

    # Utterance level: masked mean and standard deviation over valid tokens (float32 for the variance).
    hf = h.astype(jnp.float32)
    mean = layers.masked_mean(hf, mask[..., None], axis=1)
    var = layers.masked_mean(jnp.square(hf - mean[:, None]), mask[..., None], axis=1)
    pooled = jnp.concatenate([mean, jnp.sqrt(var + 1e-5)], axis=-1).astype(dt)
    u = nn.silu(layers.dense(d, ("mlp", "embed"), dt, "pool", use_bias=True)(pooled))

    e = layers.dense(rc.spk_embed_dim, ("embed", _FEATURE), dt, "spk_proj", use_bias=True)(u)
    e = e.astype(jnp.float32)
    spk_embed = e * jax.lax.rsqrt(jnp.sum(e * e, axis=-1, keepdims=True) + 1e-12)
    spk_logits = layers.dense(self.num_speakers, (_FEATURE, _CLASSES), jnp.float32, "spk_out",
                              use_bias=True)(spk_embed)
    aux = layers.dense(self.num_aux * rc.aux_classes, ("embed", _CLASSES), dt, "aux_out", use_bias=True)(u)
    return {
        "ctc_logits": ctc_logits.astype(jnp.float32),
        "ctc_mask": ctc_mask,
        "spk_embed": spk_embed,
        "spk_logits": spk_logits.astype(jnp.float32),
        "aux_logits": aux.astype(jnp.float32).reshape(b, self.num_aux, rc.aux_classes),
    }


def rm_loss_terms(out: dict[str, Array], ctc_labels: Array, ctc_label_mask: Array, speaker: Array,
                  aux: Array) -> dict[str, Array]:
  """The RM's individual losses and accuracies (scalars).

  Args:
    out: `RewardModel` outputs.
    ctc_labels: [B, L] int32 label ids (1..C-1), 0-padded on the right; ctc_label_mask: [B, L] bool.
    speaker: [B] int32 speaker ids; aux: [B, num_aux] int32 classes, -1 = unknown (ignored).
  Returns:
    asr: CTC negative log-likelihood (blank 0) summed over the batch and divided by the total number of labels
      (per-label, so long and short utterances weigh by their length and the value is length-independent);
    spk: mean softmax cross-entropy; aux: cross-entropy averaged over the labels != -1 (0 when none);
    spk_acc, aux_acc: top-1 accuracies (aux over the labels != -1).
  """
  logits = out["ctc_logits"].astype(jnp.float32)
  logit_pad = 1.0 - out["ctc_mask"].astype(jnp.float32)
  label_pad = 1.0 - ctc_label_mask.astype(jnp.float32)
  nll = optax.ctc_loss(logits, logit_pad, ctc_labels.astype(jnp.int32), label_pad, blank_id=0)
  asr = jnp.sum(nll) / jnp.maximum(jnp.sum(ctc_label_mask.astype(jnp.float32)), 1.0)

  spk, spk_acc = speaker_terms(out["spk_logits"], speaker)

  aux_logits = out["aux_logits"].astype(jnp.float32)
  known = aux >= 0
  aux_ce = optax.softmax_cross_entropy_with_integer_labels(aux_logits, jnp.maximum(aux, 0))
  aux_loss = layers.masked_mean(aux_ce, known)
  aux_acc = layers.masked_mean((jnp.argmax(aux_logits, -1) == aux).astype(jnp.float32), known)
  return {"asr": asr, "spk": spk, "aux": aux_loss, "spk_acc": spk_acc, "aux_acc": aux_acc}


def speaker_terms(spk_logits: Array, speaker: Array) -> tuple[Array, Array]:
  """Mean softmax cross-entropy and top-1 accuracy of spk_logits [B, num_speakers] against speaker ids [B]."""
  spk_logits = spk_logits.astype(jnp.float32)
  spk = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(spk_logits, speaker))
  return spk, jnp.mean((jnp.argmax(spk_logits, -1) == speaker).astype(jnp.float32))


def rm_loss(out: dict[str, Array], ctc_labels: Array, ctc_label_mask: Array, speaker: Array, aux: Array,
            rm_cfg: ml_collections.ConfigDict, spk_scale: float = 1.0,
            spk_out: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
  """asr_weight * asr + spk_scale * spk_weight * spk + aux_weight * aux (weights from config.rm; spk_scale from
  the stage, train.<stage>.rm_spk_scale); metrics add `rm_loss`.

  spk_out: outputs of another pass of the RM whose speaker logits give the speaker term (default `out`), e.g. over
  detached codes, so that the speaker term trains the RM without reaching what made the codes.
  """
  terms = rm_loss_terms(out, ctc_labels, ctc_label_mask, speaker, aux)
  if spk_out is not None:
    terms["spk"], terms["spk_acc"] = speaker_terms(spk_out["spk_logits"], speaker)
  loss = (rm_cfg.asr_weight * terms["asr"] + spk_scale * rm_cfg.spk_weight * terms["spk"]
          + rm_cfg.aux_weight * terms["aux"])
  return loss, {"rm_loss": loss, **{f"rm_{k}": v for k, v in terms.items()}}


def ctc_greedy_decode(logits, mask) -> list[list[int]]:
  """Best-path decoding: per-frame argmax over valid frames, collapse repeats, drop blanks (id 0).

  logits: [B, T, C] (or already-argmaxed [B, T] ids); mask: [B, T] bool. Returns one id list per row.
  """
  ids = np.asarray(logits)
  if ids.ndim == 3:
    ids = ids.argmax(-1)
  mask = np.asarray(mask, bool)
  out = []
  for row, valid in zip(ids, mask):
    row = row[valid]
    keep = np.ones(row.shape, bool)
    keep[1:] = row[1:] != row[:-1]
    out.append([int(i) for i in row[keep & (row != 0)]])
  return out


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
  """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
  prev = list(range(len(hyp) + 1))
  for i, r in enumerate(ref, 1):
    cur = [i] + [0] * len(hyp)
    for j, h in enumerate(hyp, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
    prev = cur
  return prev[-1]


def ctc_char_error_rate(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> float:
  """Corpus error rate over label units: total edit distance / total reference length."""
  if len(refs) != len(hyps):
    raise ValueError(f"ctc_char_error_rate: {len(refs)} references but {len(hyps)} hypotheses")
  errors = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
  return errors / max(sum(len(r) for r in refs), 1)
