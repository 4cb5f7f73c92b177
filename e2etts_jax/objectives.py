"""The training objectives of each stage, as one pure loss function of (params, batch, rng).

Stage 1 (joint): the tokenizer's straight-through codes feed the LLM (next-token), RM (multi-recognition) and FM
  (reconstruction): L = w_llm * L_LLM + w_rm * L_RM + w_fm * L_FM, each sending gradient into the tokenizer
  (those named by train.<stage>.token_grads, where the RM's speaker term is 'rm_spk'; the others train their
  network on detached codes).
Stage 2 (refine): same terms over frozen tokens; networks are disjoint, so the sum trains each on its own loss.
Stage 3 (E2E): the LLM's teacher-forced speech logits -> Gumbel-softmax (straight-through) -> token one-hots ->
  code vectors that feed the FM (reconstruct the target mel) and the RM (CTC on the input text, speaker), beside
  next-token loss. Frozen networks see `stop_gradient` params, so no gradient reaches them; the E2E terms see the FM
  and RM detached even where the stage trains them on their own losses (`train.stage3.trainable=llm,fm`).
The cascaded baseline is the same function with other weights/trainable sets (see config_lib.make_cascaded).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from e2etts_jax import config_lib
from e2etts_jax.models import flow_matching, fsq as fsq_lib, layers, llm as llm_lib, reward
from e2etts_jax.system import System

E2E_TERMS = ("e2e_fm", "e2e_asr", "e2e_spk")


def gumbel_softmax_st(rng: jax.Array, logits: jax.Array, tau: float) -> jax.Array:
  """Straight-through Gumbel-softmax: one-hot samples forward, softmax((logits + g) / tau) gradient backward.

  logits: [..., K] -> [..., K] float32 (exact one-hots in the forward pass).
  """
  g = jax.random.gumbel(rng, logits.shape, jnp.float32)
  soft = jax.nn.softmax((logits.astype(jnp.float32) + g) / tau, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
  return hard + soft - jax.lax.stop_gradient(soft)


def stage_spec(config: ml_collections.ConfigDict, stage: str) -> tuple[frozenset, dict]:
  s = config.train[stage]
  return frozenset(config_lib.parse_list(s.trainable)), {k: float(s.weights[k]) for k in config_lib.LOSS_TERMS}


def speaker_pass(config: ml_collections.ConfigDict, stage: str) -> bool:
  """Whether `stage` runs the RM a second time for its speaker term: the tokenizer trains and exactly one of the
  RM's recognition ('rm') and speaker ('rm_spk') terms may shape its codes (train.<stage>.token_grads)."""
  trainable, w = stage_spec(config, stage)
  shaping = config_lib.parse_list(config.train[stage].token_grads)
  return bool(w["rm"]) and "tokenizer" in trainable and ("rm" in shaping) != ("rm_spk" in shaping)


def dropout_rngs(rng: jax.Array, trainable: frozenset) -> dict[str, dict]:
  """Per-network `rngs` for apply: a 'dropout' key for each trainable network, none for the others.

  Frozen networks run deterministically: they are fixed targets (stage 3's FM and RM score the LLM's tokens), not
  something to regularise. Each network gets its own key (their layers share names, hence would share masks).
  The key is folded from `rng` rather than split from it, so the other draws are the same with or without dropout.
  """
  base = jax.random.fold_in(rng, 0x0D)
  return {n: {"dropout": jax.random.fold_in(base, i)} if n in trainable else {}
          for i, n in enumerate(config_lib.NETWORKS)}


def loss_fn(params: dict, batch: dict, rng: jax.Array, *, system: System, stage: str,
            train: bool = True) -> tuple[jax.Array, dict]:
  """Total weighted loss of `stage` and its metrics (every term, code usage, accuracies).

  params: {'tokenizer', 'llm', 'fm', 'rm'} (unboxed); batch: the input pipeline's dict (see input_pipeline).
  Terms with weight 0 are not computed at all (their networks are not even run unless another term needs them).
  train: the trainable networks apply their dropout (`<network>.dropout`); held-out losses pass False.
  """
  config = system.config
  trainable, w = stage_spec(config, stage)
  p = {n: params[n] if n in trainable else jax.lax.stop_gradient(params[n]) for n in params}
  rng_fm, rng_gumbel, rng_e2e_fm = jax.random.split(rng, 3)
  rngs = dropout_rngs(rng, trainable if train else frozenset())
  metrics: dict[str, jax.Array] = {}
  total = jnp.zeros((), jnp.float32)

  tok = system.tokenizer.apply({"params": p["tokenizer"]}, batch["mel"], batch["mel_mask"], rngs=rngs["tokenizer"])
  codes, indices, tmask = tok["codes"], tok["indices"], tok["mask"]
  if "tokenizer" not in trainable:
    codes = jax.lax.stop_gradient(codes)
  shaping = config_lib.parse_list(config.train[stage].token_grads)
  # The codes each term sees: detached for terms that must not shape the token space.
  codes_for = {t: codes if t in shaping else jax.lax.stop_gradient(codes) for t in config_lib.TOKEN_GRAD_TERMS}
  usage = fsq_lib.code_usage(indices, tmask, system.fsq.codebook_size)
  metrics.update({f"codes/{k}": v for k, v in usage.items()})
  metrics["codes/gradient_gain"] = layers.masked_mean(
      jnp.mean(system.fsq.gradient_gain(system.fsq.bound(tok["latent"])), -1), tmask)
  if w["usage"] and "tokenizer" in trainable:
    usage_total, usage_metrics = system.fsq.usage_loss(tok["latent"], tmask, config.tokenizer.usage_temperature,
                                                       dependence_weight=config.tokenizer.usage_dependence)
    total += w["usage"] * usage_total
    metrics["loss/usage"] = usage_total
    metrics.update({f"codes/{k}": v for k, v in usage_metrics.items()})

  rm_apply = lambda c, m: system.rm.apply({"params": p["rm"]}, c, m, rngs=rngs["rm"])
  labels = (batch["ctc_ids"], batch["ctc_mask"], batch["speaker"], batch["aux"])

  rm_out = None
  if w["rm"] or w["fm"] or w["e2e_fm"]:
    rm_out = rm_apply(codes_for["rm"], tmask)
  if w["rm"]:
    # A second pass only when the speaker term must see codes with other gradients than recognition does.
    spk_out = rm_apply(codes_for["rm_spk"], tmask) if speaker_pass(config, stage) else None
    rm_total, rm_metrics = reward.rm_loss(rm_out, *labels, config.rm, config.train[stage].rm_spk_scale, spk_out)
    total += w["rm"] * rm_total
    metrics["loss/rm"] = rm_total
    metrics.update({f"rm/{k}": v for k, v in rm_metrics.items()})

  # The FM's speaker condition is the RM's embedding of the ground-truth tokens; it is a condition, not a target,
  # so it is detached (the RM learns speakers from its own loss).
  spk = None if rm_out is None else jax.lax.stop_gradient(rm_out["spk_embed"])
  fm_apply = lambda *a: system.fm.apply({"params": p["fm"]}, *a, rngs=rngs["fm"])
  if w["fm"]:
    fm_total, fm_metrics = flow_matching.fm_loss(fm_apply, rng_fm, batch["mel"], batch["mel_mask"],
                                                 codes_for["fm"], tmask, spk, config.fm)
    total += w["fm"] * fm_total
    metrics["loss/fm"] = fm_total
    metrics.update({f"fm/{k}": v for k, v in fm_metrics.items()})

  if w["llm"] or w["llm_align"] or any(w[t] for t in E2E_TERMS):
    logits = system.llm.apply({"params": p["llm"]}, batch["text_ids"], batch["text_mask"], codes_for["llm"], tmask,
                              rngs=rngs["llm"], mutable=["intermediates"] if w["llm_align"] else False)
    if w["llm_align"]:
      logits, state = logits
      probs = llm_lib.last_layer_attention(state["intermediates"])[:, :config.llm.align_heads]
      align = llm_lib.alignment_loss(probs, jnp.sum(batch["text_mask"], axis=1), jnp.sum(tmask, axis=1),
                                     config.llm.align_sigma)
      metrics["loss/llm_align"] = align
      total += w["llm_align"] * align
    llm_total, llm_metrics = llm_lib.llm_loss(logits, indices, tmask)
    metrics["loss/llm"] = llm_total
    metrics.update({f"llm/{k}": v for k, v in llm_metrics.items()})
    total += w["llm"] * llm_total
    if not train:
      # How much the LLM reads its text: its loss with the next row's text instead of its own, minus its loss
      # (nats per token; ~0 means it predicts speech from the speech alone, and TTS cannot say the words).
      other = system.llm.apply({"params": p["llm"]}, jnp.roll(batch["text_ids"], 1, axis=0),
                               jnp.roll(batch["text_mask"], 1, axis=0), codes_for["llm"], tmask)
      metrics["llm/text_gain"] = llm_lib.llm_loss(other, indices, tmask)[0] - llm_total

    if any(w[t] for t in E2E_TERMS):
      # Teacher-forced distribution over speech tokens at each speech position (eos column and eos position
      # dropped), sampled differentiably into code vectors: onehot @ codebook.
      num_tokens = codes.shape[1]
      speech_logits = logits[:, :num_tokens, :system.fsq.codebook_size]
      onehots = gumbel_softmax_st(rng_gumbel, speech_logits, config.train.gumbel_tau)
      e2e_codes = onehots @ system.fsq.codebook().astype(onehots.dtype)
      e2e_codes = e2e_codes * tmask[..., None]
      agree = (jnp.argmax(onehots, -1) == indices) & tmask
      metrics["e2e/token_agreement"] = jnp.sum(agree) / jnp.maximum(jnp.sum(tmask), 1)
      # The FM and RM judge the LLM's tokens: detached, and without dropout, even in a stage that trains them on
      # their own losses. A judge that learned from the LLM's samples would teach itself to accept them.
      judge = {n: jax.lax.stop_gradient(p[n]) for n in ("fm", "rm")}
      if w["e2e_fm"]:
        # No CFG dropout here: a dropped row would carry no gradient to the LLM.
        e2e_fm_cfg = ml_collections.ConfigDict(config.fm.to_dict())
        e2e_fm_cfg.cfg_drop = 0.0
        fm_judge = lambda *a: system.fm.apply({"params": judge["fm"]}, *a)
        e2e_fm, _ = flow_matching.fm_loss(fm_judge, rng_e2e_fm, batch["mel"], batch["mel_mask"], e2e_codes, tmask,
                                          spk, e2e_fm_cfg)
        total += w["e2e_fm"] * e2e_fm
        metrics["loss/e2e_fm"] = e2e_fm
      if w["e2e_asr"] or w["e2e_spk"]:
        terms = reward.rm_loss_terms(system.rm.apply({"params": judge["rm"]}, e2e_codes, tmask), *labels)
        total += w["e2e_asr"] * terms["asr"] + w["e2e_spk"] * terms["spk"]
        metrics["loss/e2e_asr"], metrics["loss/e2e_spk"] = terms["asr"], terms["spk"]

  metrics["loss/total"] = total
  return total, metrics
