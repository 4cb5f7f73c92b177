"""Analytic FLOP counts of the networks and of each stage's joint step (for MFU = FLOPs / time / peak).

Counts matrix multiplies (2 FLOPs per multiply-add): projections, MLPs, AdaLN, attention scores and mixing, and
the output heads; and the MLPs' depthwise convolutions where configured (a multiply-add per tap and channel). A
network that trains costs 3x its forward (forward + grads w.r.t. inputs and weights); a frozen network that
gradients pass through costs 2x; a forward-only one 1x.
"""
from __future__ import annotations

import ml_collections

from e2etts_jax import config_lib, objectives
from e2etts_jax.system import DataInfo


def transformer_flops(net_cfg, batch: int, length: int, adaln: bool = False, causal: bool = False) -> float:
  d, h, kv, mlp = net_cfg.d_model, net_cfg.num_heads, net_cfg.num_kv_heads, net_cfg.mlp_dim
  hd = d // h
  per_token = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * mlp + net_cfg.get("conv_kernel", 0) * mlp
  attn = 2 * length * length * h * hd * (0.5 if causal else 1.0)   # QK^T and AV per sequence
  per_seq = 6 * d * d if adaln else 0   # AdaLN modulation: one [d] condition per sequence, not per token
  return float(net_cfg.num_layers * batch * (2 * per_token * length + 2 * attn + 2 * per_seq))


def network_forward_flops(config: ml_collections.ConfigDict, info: DataInfo, batch: int, frames: int) -> dict:
  c = config
  tokens = frames // c.tokenizer.downsample
  codebook = 1
  for l in c.tokenizer.fsq_levels:
    codebook *= int(l)
  llm_len = c.text.max_text_tokens + tokens + 3
  tok = transformer_flops(c.tokenizer, batch, tokens) + 2 * batch * tokens * (
      c.tokenizer.downsample * c.audio.n_mels * c.tokenizer.d_model)
  llm = transformer_flops(c.llm, batch, llm_len, causal=True) + 2 * batch * tokens * c.llm.d_model * (codebook + 1)
  # DiT over frames; token encoder over tokens; mel_in (2 mels -> d), mel_out and the prior head (d -> a mel each).
  fm_enc = ml_collections.ConfigDict({**c.fm.to_dict(), "num_layers": c.fm.encoder_layers})
  fm = (transformer_flops(c.fm, batch, frames, adaln=True) + transformer_flops(fm_enc, batch, tokens)
        + 2 * batch * frames * c.fm.d_model * 4 * c.audio.n_mels)
  up = c.rm.ctc_upsample
  rm = transformer_flops(c.rm, batch, tokens) + 2 * batch * tokens * up * c.rm.d_model * info.num_ctc_classes
  return {"tokenizer": tok, "llm": llm, "fm": fm, "rm": rm}


def step_flops(config: ml_collections.ConfigDict, info: DataInfo, batch: int, frames: int, stage: str) -> float:
  """Analytic FLOPs of one joint step of `stage`, mirroring which networks `objectives.loss_fn` runs."""
  fwd = network_forward_flops(config, info, batch, frames)
  trainable, w = objectives.stage_spec(config, stage)
  e2e = any(w[t] for t in objectives.E2E_TERMS)
  mult = lambda net, through: 3.0 if net in trainable else (2.0 if through else 1.0)
  tok_through = "tokenizer" in trainable
  total = fwd["tokenizer"] * (3.0 if tok_through else 1.0)
  if w["rm"] or w["fm"] or w["e2e_fm"]:
    total += fwd["rm"] * mult("rm", tok_through and w["rm"] > 0)
  if objectives.speaker_pass(config, stage):
    # The speaker term's own pass: the encoder and the pooled heads (the unused CTC head is dead code to XLA).
    encoder = transformer_flops(config.rm, batch, frames // config.tokenizer.downsample)
    total += encoder * mult("rm", "rm_spk" in config_lib.parse_list(config.train[stage].token_grads))
  if w["fm"]:
    total += fwd["fm"] * mult("fm", tok_through)
  if w["llm"] or w["llm_align"] or e2e:
    total += fwd["llm"] * mult("llm", tok_through)
  # The E2E terms' FM and RM are detached judges whatever the stage trains: gradients pass through, none to weights.
  if w["e2e_fm"]:
    total += fwd["fm"] * 2.0
  if w["e2e_asr"] or w["e2e_spk"]:
    total += fwd["rm"] * 2.0
  return total


def train_flops(config: ml_collections.ConfigDict, info: DataInfo | None = None) -> float:
  """Analytic FLOPs of a whole training run: each stage's steps x its joint step at the padded batch shape
  [stage batch (`config_lib.stage_batch_size`), data.max_frames] (what equal-compute comparisons match; with
  `data.dynamic_batch` that shape is the frame budget every batch stays within, so an upper bound).
  info: the config's own sizes (`DataInfo.for_config`) unless given."""
  info = info or DataInfo.for_config(config)
  frames = int(config.data.max_frames)
  return sum(int(config.train[s].steps) * step_flops(config, info, config_lib.stage_batch_size(config, s), frames, s)
             for s in config_lib.STAGES if int(config.train[s].steps) > 0)
