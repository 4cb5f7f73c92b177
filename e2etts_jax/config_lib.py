"""The one configuration schema, the model sizes, and `validate`.

Every config file in `configs/` starts from `base_config()` and calls `set_size(config, name)`; command lines
then override single fields (`--config.train.stage1.steps=500`). The config is locked, so a typo fails and
ml-collections names the closest existing key. `validate` runs after parsing and names the bad field.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import ml_collections

from e2etts_jax import text as text_lib
from e2etts_jax.models import flow_matching

NETWORKS = ("tokenizer", "llm", "fm", "rm")
STAGES = ("stage1", "stage2", "stage3")
LOSS_TERMS = ("llm", "llm_align", "rm", "fm", "usage", "e2e_fm", "e2e_asr", "e2e_spk")
# The stage-1 terms that can shape the token space (train.<stage>.token_grads): 'rm' is the RM's recognition of
# text and auxiliary labels, 'rm_spk' its speaker term.
TOKEN_GRAD_TERMS = ("llm", "rm", "rm_spk", "fm")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MODES = ("e2e", "cascaded")
OPTIMIZERS = ("adamw", "muon")
FM_DECODERS = ("flow", "prior")


class ConfigError(ValueError):
  """A config field has a bad value; the message names the field and why."""


def _stage(steps: int, trainable: str, lr: float, **weights: float) -> ml_collections.ConfigDict:
  w = {k: 0.0 for k in LOSS_TERMS}
  w.update(weights)
  return ml_collections.ConfigDict({
      "steps": steps,
      # Global batch of this stage's training steps; 0 = data.batch_size. A stage whose batch differs from the stage
      # before it reads a fresh pass of the data at its own batch (the trainer); held-out losses stay at
      # data.batch_size (and data.max_frames), so stages stay comparable row for row.
      "batch_size": 0,
      # Length buckets of this stage's training batches; () = data.bucket_boundaries. Every (bucket, stage) pair
      # is a compile (30-60 s on 2 CPU cores), so a stage of a few hundred steps may pad to fewer shapes than the
      # long stage before it; like a changed batch, other buckets start a fresh pass of the data (the trainer).
      "bucket_boundaries": (),
      # Comma-separated subset of NETWORKS; the others get zero updates and no gradient.
      "trainable": trainable,
      "learning_rate": lr,
      "warmup_steps": max(1, steps // 10),
      "weights": w,
      # Loss terms (of TOKEN_GRAD_TERMS) whose gradient reaches the tokenizer through its codes while it trains;
      # the others train their network on detached codes. 'rm,rm_spk' keeps every network's training of the joint
      # stage 1 but shapes the token space by recognition alone (the ablation of what FM and LLM gradients do to
      # it); 'llm,rm,fm' lets the RM learn speakers without pulling the codes toward them (a second RM pass).
      "token_grads": "llm,rm,rm_spk,fm",
      # Multiplier of rm.spk_weight in this stage's RM loss, e.g. a higher speaker weight in stage 2 alone, where
      # it cannot move the frozen codes (measured on the main job: that lifts no held-out speaker ranking, since the
      # speaker reaches the codes only through stage 1's speaker gradient; docs/diagnosis.md).
      "rm_spk_scale": 1.0,
      # Per-network multipliers of this stage's learning rate, on top of train.lr_scale (which scales every stage):
      # e.g. a network already at its held-out optimum when a late stage begins can keep training there more slowly.
      "lr_scale": {n: 1.0 for n in NETWORKS},
  })


def base_config() -> ml_collections.ConfigDict:
  """All keys with the `small` values; sizes only change numbers, never the schema."""
  c = ml_collections.ConfigDict()
  c.name = "small"
  c.seed = 0

  # Audio. The embedded corpus is 16 kHz (flite); hop 320 -> 50 Hz mel, tokens at 25 Hz as in CosyVoice.
  c.audio = ml_collections.ConfigDict({
      "sample_rate": 16000,
      "n_fft": 1280,
      "win_length": 1280,
      "hop_length": 320,
      "n_mels": 80,
      "fmin": 0.0,
      "fmax": 8000.0,
      "center": False,
      "log_floor": 1e-5,          # log(max(mel, floor)): the floor bounds silence at log(1e-5) = -11.5
      "griffin_lim_iters": 32,
  })

  # Text: sentencepiece for the LLM (over the normalised text or its phones); CTC units for the RM's ASR head.
  c.text = ml_collections.ConfigDict({
      "frontend": "text",         # 'text' (normalised text) or 'phones' (flite's t2p phones, with model_type 'word')
      "vocab_size": 512,
      "model_type": "unigram",
      "ctc_units": "char",        # 'char' (a-z, apostrophe, space) or 'sentencepiece'
      "max_text_tokens": 128,     # sentencepiece ids per utterance (fixed padded length)
      "max_ctc_len": 256,         # CTC label units per utterance (fixed padded length)
  })

  c.data = ml_collections.ConfigDict({
      "manifest": "",             # JSONL/LJSpeech/LibriTTS/meta.lst, for e2etts-prepare
      "shards": "",               # directory of ArrayRecord shards written by e2etts-prepare
      "split": "train",
      "batch_size": 16,           # global batch, across all processes
      "min_seconds": 0.4,
      "max_seconds": 12.0,
      "max_frames": 640,          # mel frames a batch pads to at most (12.8 s at 50 Hz)
      "bucket_boundaries": (100, 150, 200, 280, 400, 640),  # mel frames; bounds padding waste
      # Chance that a training row is two utterances of one speaker joined (with a token of silence between)
      # where both fit data.max_frames and the text limits: fewer padded frames per step and new sentence
      # pairs for the LLM. 0 = every row is one utterance.
      "join_prob": 0.0,
      # Dynamic batching (CosyVoice's max_frames_in_batch, per length bucket): a training batch of bucket F holds
      # data.batch_size * data.max_frames / F rows, rounded down to a multiple of data.batch_multiple, so every
      # batch pads to at most data.batch_size * data.max_frames frames and short utterances fill more rows
      # instead of padding. Each (bucket, stage) pair compiles once. Training split only: held-out batches keep
      # data.batch_size rows.
      "dynamic_batch": False,
      "batch_multiple": 1,        # rows of a dynamic batch divide by this (the mesh's batch shards must divide it)
      "num_workers": 0,           # grain worker processes (0 = in-process)
      "prefetch": 2,
      "shuffle_seed": 0,
      "num_shards": 8,
      "test_fraction": 0.05,      # held out (deterministically, by id hash) where the corpus has no split
  })

  c.model = ml_collections.ConfigDict({
      "dtype": "float32",         # compute dtype; parameters stay float32
      "remat": "none",
      "scan_unroll": 0,           # layers per iteration of each network's layer loop; 0 = all (no loop)
      "rope_base": 10000.0,
      # Synthesis decodes with the EMA weights of train.ema_networks where the run kept them (False: the raw
      # weights). An inference setting (synthesis.INFERENCE_KEYS).
      "use_ema": True,
  })

  c.tokenizer = ml_collections.ConfigDict({
      "d_model": 192, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 512,
      "dropout": 0.0,
      "downsample": 2,            # mel frames per token (50 Hz -> 25 Hz)
      "token_rate": 25.0,
      "fsq_levels": (8, 5, 5, 5),
      "usage_temperature": 1.0,   # softness of the code-usage term's level assignment (in squared level units)
      # Weight, inside the code-usage term, of the channels' mutual information (fsq.FSQ.dependence), per channel:
      # the loss adds weight * (channels - 1) / 2 * the mean over pairs, so a copied pair costs weight / channels
      # whatever the channel count. Without it 3^8's channels copy each other and the main job's codes collapse
      # onto 19-84 (perplexity); at 2/7, 8/7 and 1 they stay spread (270-383); at 8/7 resynthesis reads better
      # than with 2560 codes, and 1 reads as 8/7 does over 3 paired runs. On tiny's 3·3·3, 1 raised the code
      # perplexity 6.2 -> 10.0 where 4 lowered it to 4.8 (docs/diagnosis.md).
      "usage_dependence": 1.0,
      "conv_kernel": 0,           # taps of each block's depthwise convolution over tokens (0 = none; layers.MLP)
  })

  c.llm = ml_collections.ConfigDict({
      "d_model": 192, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 512,
      "dropout": 0.0,             # residual dropout while the network trains (CosyVoice LLM: 0.1); all four have one
      "max_len": 512,             # text + speech positions the KV cache holds
      "min_ratio": 2.0,           # speech tokens >= min_ratio * text tokens (eos masked before); the embedded corpus
                                  # has 2.3-9 tokens per word piece, 1.1-2.6 per phone: 1.0 for text.frontend='phones'
      "max_ratio": 20.0,
      "temperature": 1.0,
      "top_k": 25,
      "top_p": 0.8,
      "ras_window": 10,
      "ras_tau": 0.1,
      # The stage weight `llm_align` (default 0: off) adds guided attention (llm.alignment_loss) to the first
      # align_heads heads of the last layer: a diagonal text-alignment prior of width align_sigma.
      "align_heads": 1,
      "align_sigma": 0.2,
  })

  c.fm = ml_collections.ConfigDict({
      "d_model": 192, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 512,
      "dropout": 0.0,
      "sigma_min": 1e-6,
      "t_schedule": "uniform",     # training flow times: 'uniform' U(0, 1), or 'cosine' 1 - cos(u pi / 2) (CosyVoice)
      "cfg_drop": 0.2,
      "prompt_prob": 0.5,
      "prompt_max_frac": 0.3,
      "ode_steps": 10,
      "guidance": 0.7,
      "temperature": 1.0,         # initial-noise scale of sampling (flow_matching.sample)
      "start_t": 0.0,             # flow time the sampler starts at from the noised prior mel (0 = from noise)
      # What synthesis decodes tokens with: 'flow' (the guided ODE solve) or 'prior' (the prior head's direct
      # regression of the mel; no noise, no prompt mel). An inference setting (synthesis.INFERENCE_KEYS).
      "decoder": "flow",
      "encoder_layers": 2,        # transformer layers over the tokens before the frame-rate DiT (CosyVoice's encoder)
      "prior_weight": 1.0,        # weight of the prior-mel MSE inside the FM loss (flow_matching.fm_loss)
      "prior_start": False,       # flow from N(prior, I) instead of N(0, I) (PriorGrad; FlowMatchingDecoder)
      "conv_kernel": 0,           # taps of each block's depthwise convolution over frames/tokens (0 = none)
  })

  c.rm = ml_collections.ConfigDict({
      "d_model": 192, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 512,
      "dropout": 0.0,
      "num_speakers": 16,         # set from the prepared data's speaker table
      "spk_embed_dim": 128,
      "aux_tasks": "rate,pitch",  # manifest metadata classes recognised beside ASR and speaker
      "aux_classes": 3,
      "asr_weight": 1.0,
      "spk_weight": 0.1,
      "aux_weight": 0.1,
      "ctc_upsample": 2,          # CTC frames per token: 25 Hz alone is too tight for fast speech + repeats
      "conv_kernel": 0,           # taps of each block's depthwise convolution over tokens (0 = none)
  })

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  c.train = ml_collections.ConfigDict({
      "mode": "e2e",              # 'e2e' (stages 1-3) or 'cascaded' (recognition tokenizer, separate training)
      # usage: the FSQ code-usage term (fsq.FSQ.usage_loss). Without it the tokenizer's tanh saturates within
      # ~10 steps at LR 1e-3 and the codes collapse onto a few corners (small: perplexity 78 -> 1.2).
      "stage1": _stage(600, "tokenizer,llm,fm,rm", 1e-3, llm=0.1, rm=1.0, fm=1.0, usage=1.0),
      "stage2": _stage(300, "llm,fm,rm", 3e-4, llm=1.0, rm=1.0, fm=1.0),
      "stage3": _stage(300, "llm", 1e-4, llm=1.0, e2e_fm=1.0, e2e_asr=1.0, e2e_spk=0.1),
      # Per-network multipliers of every stage's learning rate.
      "lr_scale": {n: 1.0 for n in NETWORKS},
      "gumbel_tau": 1.0,
      # 'adamw', or 'muon': the transformer blocks' matrices take orthogonalised momentum updates (optax.contrib's
      # Newton-Schulz, momentum muon_momentum, Nesterov) scaled to an RMS of muon_rms per entry, so the stage
      # learning rates and weight decay stay AdamW's; everything else keeps AdamW (optim.muon_dimensions).
      "optimizer": "adamw",
      "muon_networks": "tokenizer,llm,fm,rm",   # the networks Muon trains (the others keep AdamW throughout)
      "muon_momentum": 0.95,
      "muon_rms": 0.2,
      "weight_decay": 0.01,
      "grad_clip": 5.0,
      "b1": 0.9,
      "b2": 0.98,
      "log_every": 20,
      "eval_every": 200,          # held-out losses every this many steps of a stage (and at its start and end)
      "eval_batches": 4,          # test-split batches they are computed on (0 = none, -1 = every full batch)
      # Sets of random draws (flow times, noise, CFG drops, Gumbel samples) each held-out value averages over: the
      # draw-taking terms move between sets by more than a short stage moves them. Set 0 is the same at any count.
      "eval_draws": 1,
      "checkpoint_every": 200,
      "keep_checkpoints": 3,
      "max_bad_steps": 5,         # consecutive NaN/Inf losses before aborting
      # Exponential moving average of the weights of `ema_networks` while they train (0 = none kept): the average
      # over the last ~1 / (1 - ema_decay) updates, bias-corrected so it never holds the initialisation. Synthesis
      # decodes with it (`model.use_ema`). Not the tokenizer: later stages train the others on its raw codes. Off:
      # at 0.995 the main job reads no better with it at 800 or 2000 stage-1 steps (docs/diagnosis.md).
      "ema_decay": 0.0,
      "ema_networks": "llm,fm",
      # Warm start: a training workdir whose latest checkpoint's parameters seed the networks named in
      # init_networks (the others start fresh), e.g. several LLMs trained on one trained tokenizer + FM. Read only
      # when this run's workdir has no checkpoint yet: a resumed run continues from its own.
      "init_from": "",
      "init_networks": "tokenizer,llm,fm,rm",
  })
  return c


_SIZES = {
    # name: (audio overrides, {network: (d_model, layers, heads, kv_heads, mlp)}, extras)
    "tiny": dict(
        audio={"n_mels": 20},
        nets={n: (32, 2, 2, 1 if n == "llm" else 2, 64) for n in NETWORKS},
        tokenizer={"fsq_levels": (3, 3, 3)},
        llm={"max_len": 160},
        text={"vocab_size": 64, "max_text_tokens": 48, "max_ctc_len": 160},
        rm={"spk_embed_dim": 16},
        data={"batch_size": 4, "max_frames": 200, "max_seconds": 4.0, "bucket_boundaries": (50, 100, 200)},
        train={"steps": (60, 30, 30)},
    ),
    "small": dict(),
    # small's audio, text and data with quarter-size networks: the size of multi-seed ablation studies on a
    # 2-core CPU (launch/ablate.sh), where `small` costs ~25 min per run.
    "mini": dict(
        nets={n: (96, 2, 4, 2 if n == "llm" else 4, 256) for n in NETWORKS},
        data={"batch_size": 8, "max_seconds": 5.0, "max_frames": 250, "bucket_boundaries": (250,)},
        train={"steps": (400, 200, 200)},
    ),
    "base": dict(
        nets={"tokenizer": (512, 8, 8, 8, 1536), "llm": (512, 12, 8, 4, 1536),
              "fm": (512, 8, 8, 8, 1536), "rm": (512, 6, 8, 8, 1536)},
        llm={"max_len": 1024},
        data={"batch_size": 64},
        model={"dtype": "bfloat16"},
        train={"steps": (20000, 10000, 10000)},
    ),
    "paper": dict(
        audio={"sample_rate": 24000, "n_fft": 1920, "win_length": 1920, "hop_length": 480},
        nets={"tokenizer": (1024, 24, 16, 16, 6784), "llm": (1024, 28, 16, 8, 5888),
              "fm": (1024, 22, 16, 16, 4096), "rm": (1024, 24, 16, 16, 6784)},
        tokenizer={"fsq_levels": (3,) * 8},
        text={"vocab_size": 4096},
        llm={"max_len": 2048},
        rm={"spk_embed_dim": 192},
        data={"batch_size": 256, "max_frames": 1500, "max_seconds": 30.0,
              "bucket_boundaries": (250, 500, 750, 1000, 1500)},
        model={"dtype": "bfloat16", "remat": "dots_no_batch", "scan_unroll": 1},   # 22-28 layers: compile time
        train={"steps": (100000, 50000, 50000)},
    ),
}
SIZES = tuple(_SIZES)


def set_size(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Applies the named model/data size to `c` in place and returns it."""
  if name not in _SIZES:
    raise ConfigError(f"unknown size {name!r}; choose one of {', '.join(SIZES)}")
  spec = _SIZES[name]
  c.name = name
  for net, (d, layers, heads, kv, mlp) in spec.get("nets", {}).items():
    c[net].update(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=kv, mlp_dim=mlp)
  for section in ("audio", "tokenizer", "llm", "text", "rm", "data", "model", "fm"):
    if section in spec:
      c[section].update(spec[section])
  if "train" in spec:
    for stage, steps in zip(STAGES, spec["train"]["steps"]):
      c.train[stage].steps = steps
      c.train[stage].warmup_steps = max(1, steps // 10)
  return c


def get_config(size: str = "small", mode: str = "e2e") -> ml_collections.ConfigDict:
  c = set_size(base_config(), size)
  c.train.mode = mode
  if mode == "cascaded":
    make_cascaded(c)
  return c


def make_cascaded(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The cascaded baseline on the same networks, data and step budget.

  Stage 1 trains the tokenizer on recognition only (like supervised semantic tokens: RM loss alone), stage 2
  trains LLM, FM and RM independently on the frozen tokens, and the steps E2E spends in stage 3 go to more
  stage-2 training instead, so both systems see the same number of updates.
  """
  c.train.mode = "cascaded"
  c_usage = c.train.stage1.weights.usage
  c.train.stage1.trainable = "tokenizer,rm"
  c.train.stage1.weights.update({k: 0.0 for k in LOSS_TERMS})
  c.train.stage1.weights.rm = 1.0
  c.train.stage1.weights.usage = c_usage  # the same anti-collapse term: a fair tokenizer comparison
  return cascade_stage3_steps(c)


def stage_batch_size(c: ml_collections.ConfigDict, stage: str) -> int:
  """The global batch of `stage`'s training steps: train.<stage>.batch_size, or data.batch_size where that is 0."""
  return int(c.train[stage].batch_size) or int(c.data.batch_size)


def stage_buckets(c: ml_collections.ConfigDict, stage: str) -> tuple[int, ...]:
  """The length buckets of `stage`'s training batches: train.<stage>.bucket_boundaries, or data.bucket_boundaries
  where that is empty."""
  return tuple(int(b) for b in (c.train[stage].bucket_boundaries or c.data.bucket_boundaries))


def stage_data(c: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """A copy of `c` whose `data` section is `stage`'s training batches (its batch size and length buckets), which
  the input pipeline reads; `c` itself if the stage keeps data's."""
  batch, bounds = stage_batch_size(c, stage), stage_buckets(c, stage)
  if (batch, bounds) == (int(c.data.batch_size), tuple(c.data.bucket_boundaries)):
    return c
  c = copy.deepcopy(c)
  c.data.batch_size, c.data.bucket_boundaries = batch, bounds
  return c


def stages_label(steps: Mapping[str, int], batch_sizes: Optional[Mapping[str, int]] = None) -> str:
  """Steps per stage, '950/75/75', then each stage's batch where given: ' x 8' when they agree, ' x 4/4/8' when not."""
  label = "/".join(str(steps[s]) for s in STAGES if s in steps)
  if batch_sizes:
    batches = [str(batch_sizes[s]) for s in STAGES if s in batch_sizes]
    label += " x " + (batches[0] if len(set(batches)) == 1 else "/".join(batches))
  return label


def cascade_stage3_steps(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The cascade's step budget: the rows E2E trains on in stage 3 go to stage 2 (make_cascaded, and budget defaults
  set on a cascaded config afterwards): its steps, rescaled where the two stages' batches differ."""
  rows = int(c.train.stage3.steps) * stage_batch_size(c, "stage3")
  c.train.stage2.steps = int(c.train.stage2.steps) + round(rows / stage_batch_size(c, "stage2"))
  c.train.stage3.steps = 0
  return c


def parse_list(value: str) -> tuple[str, ...]:
  return tuple(v.strip() for v in value.split(",") if v.strip())


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with the single -1 resolved to what is left of `num_devices`."""
  dims = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
  names = ("data", "fsdp", "tensor")
  if sum(d == -1 for d in dims) > 1:
    raise ConfigError("mesh: at most one of mesh.data/mesh.fsdp/mesh.tensor may be -1")
  for n, d in zip(names, dims):
    if d == 0 or d < -1:
      raise ConfigError(f"mesh.{n}={d}: must be a positive size or -1")
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if num_devices % known:
      raise ConfigError(f"mesh: {num_devices} devices cannot be split into fixed axes of size {known} "
                        f"(mesh.data={dims[0]}, mesh.fsdp={dims[1]}, mesh.tensor={dims[2]})")
    dims[dims.index(-1)] = num_devices // known
  elif known != num_devices:
    raise ConfigError(f"mesh: mesh.data*mesh.fsdp*mesh.tensor = {known} but there are {num_devices} devices")
  return tuple(dims)


def _check_networks(field: str, value: str) -> None:
  for net in parse_list(value):
    if net not in NETWORKS:
      close = difflib.get_close_matches(net, NETWORKS, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"{field} names unknown network {net!r}{hint}; choose from {NETWORKS}")


def _check_buckets(c: ml_collections.ConfigDict, key: str, bounds: tuple) -> None:
  if list(bounds) != sorted(set(bounds)) or not bounds:
    raise ConfigError(f"{key}={bounds} must be strictly increasing")
  if bounds[-1] != c.data.max_frames:
    raise ConfigError(f"{key} must end at data.max_frames={c.data.max_frames}, got {bounds[-1]}")
  for b in bounds:
    if b % c.tokenizer.downsample:
      raise ConfigError(f"{key} entry {b} is not a multiple of tokenizer.downsample "
                        f"= {c.tokenizer.downsample} (frames must split evenly into tokens)")


def _check_lr_scales(key: str, scales: ml_collections.ConfigDict) -> None:
  for net in NETWORKS:
    if scales[net] < 0:
      raise ConfigError(f"{key}.{net}={scales[net]} must be >= 0 (a multiplier of the learning rate)")


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Checks cross-field rules; raises ConfigError naming the field. Returns `c` for chaining."""
  a = c.audio
  if a.win_length > a.n_fft:
    raise ConfigError(f"audio.win_length={a.win_length} exceeds audio.n_fft={a.n_fft}")
  if a.fmax > a.sample_rate / 2:
    raise ConfigError(f"audio.fmax={a.fmax} is above Nyquist ({a.sample_rate / 2} Hz for "
                      f"audio.sample_rate={a.sample_rate})")
  mel_rate = a.sample_rate / a.hop_length
  token_rate = mel_rate / c.tokenizer.downsample
  if not math.isclose(token_rate, c.tokenizer.token_rate, rel_tol=1e-6):
    raise ConfigError(
        f"tokenizer.token_rate={c.tokenizer.token_rate} does not match the mel rate: audio.sample_rate / "
        f"audio.hop_length / tokenizer.downsample = {a.sample_rate}/{a.hop_length}/{c.tokenizer.downsample} "
        f"= {token_rate:g} Hz")
  levels = tuple(c.tokenizer.fsq_levels)
  if not levels or any(int(l) < 2 for l in levels):
    raise ConfigError(f"tokenizer.fsq_levels={levels}: need at least one dimension, each with >= 2 levels")
  if c.tokenizer.usage_dependence < 0:
    raise ConfigError(f"tokenizer.usage_dependence={c.tokenizer.usage_dependence} must be >= 0 (a weight)")
  for net in NETWORKS:
    n = c[net]
    if n.d_model % n.num_heads:
      raise ConfigError(f"{net}.d_model={n.d_model} is not divisible by {net}.num_heads={n.num_heads}")
    if n.num_heads % n.num_kv_heads:
      raise ConfigError(f"{net}.num_heads={n.num_heads} is not divisible by {net}.num_kv_heads={n.num_kv_heads}")
    if (n.d_model // n.num_heads) % 2:
      raise ConfigError(f"{net}: head dim d_model/num_heads = {n.d_model // n.num_heads} must be even for RoPE")
    if "conv_kernel" in n and (n.conv_kernel < 0 or (n.conv_kernel and n.conv_kernel % 2 == 0)):
      raise ConfigError(f"{net}.conv_kernel={n.conv_kernel}: must be 0 (none) or an odd number of taps "
                        f"(a centred window)")
    if not 0.0 <= n.get("dropout", 0.0) < 1.0:
      raise ConfigError(f"{net}.dropout={n.dropout}: must be in [0, 1) (the fraction of units dropped)")
  if c.train.optimizer not in OPTIMIZERS:
    raise ConfigError(f"train.optimizer={c.train.optimizer!r}: choose one of {OPTIMIZERS}")
  _check_networks("train.muon_networks", c.train.muon_networks)
  if not 0.0 <= c.train.muon_momentum < 1.0:
    raise ConfigError(f"train.muon_momentum={c.train.muon_momentum}: must be in [0, 1)")
  if c.train.muon_rms <= 0:
    raise ConfigError(f"train.muon_rms={c.train.muon_rms}: must be > 0 (the RMS of Muon's update per entry)")
  if c.model.dtype not in DTYPES:
    raise ConfigError(f"model.dtype={c.model.dtype!r}: choose one of {DTYPES}")
  if c.model.remat not in REMAT_POLICIES:
    raise ConfigError(f"model.remat={c.model.remat!r}: choose one of {REMAT_POLICIES}")
  if c.model.scan_unroll < 0:
    raise ConfigError(f"model.scan_unroll={c.model.scan_unroll}: must be >= 0 (0 = all layers)")
  if c.fm.t_schedule not in flow_matching.T_SCHEDULES:
    raise ConfigError(f"fm.t_schedule={c.fm.t_schedule!r}: choose one of {flow_matching.T_SCHEDULES}")
  if not 0.0 <= c.fm.start_t < 1.0:
    raise ConfigError(f"fm.start_t={c.fm.start_t}: must be in [0, 1) (0 = the solve starts from noise)")
  if c.fm.decoder not in FM_DECODERS:
    raise ConfigError(f"fm.decoder={c.fm.decoder!r}: choose one of {FM_DECODERS}")
  if c.text.frontend not in text_lib.FRONTENDS:
    raise ConfigError(f"text.frontend={c.text.frontend!r}: choose one of {text_lib.FRONTENDS}")
  if c.text.frontend == "phones" and c.text.model_type != "word":
    # Other sentencepiece models split a stressed vowel ('aa1') into pieces; a word model keeps one per phone.
    raise ConfigError(f"text.frontend='phones' needs text.model_type='word' (one piece per phone), got "
                      f"{c.text.model_type!r}")
  if c.text.frontend == "phones" and c.text.ctc_units == "sentencepiece":
    # The RM's CTC labels are the normalised text; a sentencepiece model of phones cannot spell it.
    raise ConfigError("text.frontend='phones' needs text.ctc_units='char' (the sentencepiece model then holds "
                      "phones, not the text the RM's ASR head spells)")
  if c.text.ctc_units not in ("char", "sentencepiece"):
    raise ConfigError(f"text.ctc_units={c.text.ctc_units!r}: choose 'char' or 'sentencepiece'")
  d = c.data
  _check_buckets(c, "data.bucket_boundaries", tuple(d.bucket_boundaries))
  if d.max_seconds * mel_rate > d.max_frames + 1e-6:
    raise ConfigError(f"data.max_seconds={d.max_seconds} gives {d.max_seconds * mel_rate:g} frames, more than "
                      f"data.max_frames={d.max_frames}")
  if not 0.0 <= d.join_prob <= 1.0:
    raise ConfigError(f"data.join_prob={d.join_prob} must be in [0, 1]")
  if d.batch_multiple < 1 or (d.dynamic_batch and d.batch_size % d.batch_multiple):
    raise ConfigError(f"data.batch_multiple={d.batch_multiple} must be >= 1 and, with data.dynamic_batch, divide "
                      f"data.batch_size={d.batch_size}")
  if d.dynamic_batch and d.join_prob > 0:
    # A joined row's length is drawn each epoch, so the rows per bucket (and the batches per epoch, which the
    # resumable plan needs fixed) would change from epoch to epoch.
    raise ConfigError(f"data.dynamic_batch=True cannot be combined with data.join_prob={d.join_prob}: set one "
                      f"of them off")
  if d.min_seconds >= d.max_seconds:
    raise ConfigError(f"data.min_seconds={d.min_seconds} must be below data.max_seconds={d.max_seconds}")
  max_tokens = d.max_frames // c.tokenizer.downsample
  if c.text.max_text_tokens + max_tokens + 3 > c.llm.max_len:
    raise ConfigError(f"llm.max_len={c.llm.max_len} cannot hold text.max_text_tokens={c.text.max_text_tokens} "
                      f"+ {max_tokens} speech tokens (data.max_frames / tokenizer.downsample) + 3 specials")
  if c.train.mode not in MODES:
    raise ConfigError(f"train.mode={c.train.mode!r}: choose one of {MODES}")
  _check_networks("train.init_networks", c.train.init_networks)
  _check_networks("train.ema_networks", c.train.ema_networks)
  if not 0.0 <= c.train.ema_decay < 1.0:
    raise ConfigError(f"train.ema_decay={c.train.ema_decay}: must be in [0, 1) (0 = no weight average kept)")
  _check_lr_scales("train.lr_scale", c.train.lr_scale)
  for stage in STAGES:
    s = c.train[stage]
    _check_networks(f"train.{stage}.trainable", s.trainable)
    bad = [t for t in parse_list(s.token_grads) if t not in TOKEN_GRAD_TERMS]
    if bad:
      raise ConfigError(f"train.{stage}.token_grads names {', '.join(map(repr, bad))}; choose from "
                        f"{', '.join(TOKEN_GRAD_TERMS)}")
    if s.steps < 0:
      raise ConfigError(f"train.{stage}.steps={s.steps} must be >= 0")
    if s.batch_size < 0:
      raise ConfigError(f"train.{stage}.batch_size={s.batch_size} must be >= 0 (0 = data.batch_size)")
    if s.bucket_boundaries:
      _check_buckets(c, f"train.{stage}.bucket_boundaries", tuple(s.bucket_boundaries))
    if s.rm_spk_scale < 0:
      raise ConfigError(f"train.{stage}.rm_spk_scale={s.rm_spk_scale} must be >= 0")
    _check_lr_scales(f"train.{stage}.lr_scale", s.lr_scale)
    if s.steps and s.warmup_steps > s.steps:
      raise ConfigError(f"train.{stage}.warmup_steps={s.warmup_steps} exceeds train.{stage}.steps={s.steps}")
    if s.steps and not any(s.weights[k] for k in LOSS_TERMS):
      raise ConfigError(f"train.{stage}.weights are all zero: the stage would train nothing")
    if s.steps and s.weights.usage and "tokenizer" not in parse_list(s.trainable):
      raise ConfigError(f"train.{stage}.weights.usage={s.weights.usage} regularises the tokenizer, which "
                        f"train.{stage}.trainable does not train: set it to 0")
  if not 1 <= c.llm.align_heads <= c.llm.num_heads:
    raise ConfigError(f"llm.align_heads={c.llm.align_heads} must be between 1 and llm.num_heads={c.llm.num_heads}")
  if c.llm.align_sigma <= 0:
    raise ConfigError(f"llm.align_sigma={c.llm.align_sigma} must be > 0")
  if c.train.eval_every < 0:
    raise ConfigError(f"train.eval_every={c.train.eval_every} must be >= 0 (0 reads held-out losses only at each "
                      f"stage's start and end; train.eval_batches=0 turns them off)")
  if c.train.eval_draws < 1:
    raise ConfigError(f"train.eval_draws={c.train.eval_draws} must be >= 1 (sets of held-out random draws)")
  if c.train.eval_batches < -1:
    raise ConfigError(f"train.eval_batches={c.train.eval_batches} must be >= -1 (0 turns held-out losses off, "
                      f"-1 reads every full batch of the test split)")
  if c.train.stage3.steps and "tokenizer" in parse_list(c.train.stage3.trainable):
    raise ConfigError("train.stage3.trainable must not include 'tokenizer': stage 3 optimises the LLM on "
                      "frozen tokens")
  if num_devices is not None:
    data, fsdp, _ = resolve_mesh_shape(c.mesh, num_devices)
    for key, batch in [("data.batch_size", d.batch_size)] + [
        (f"train.{s}.batch_size", c.train[s].batch_size) for s in STAGES if c.train[s].batch_size]:
      if batch % (data * fsdp):
        raise ConfigError(f"{key}={batch} is not divisible by the data-parallel size "
                          f"mesh.data*mesh.fsdp = {data}*{fsdp} = {data * fsdp}")
  return c


def get_path(c, key: str):
  """The field at dotted `key` of config `c`, e.g. get_path(c, "train.stage1.steps"); `c` itself for ""."""
  for part in key.split(".") if key else ():
    c = c[part]
  return c


def apply_overrides(c: ml_collections.ConfigDict, overrides: Iterable[str] | dict) -> ml_collections.ConfigDict:
  """`a.b=v` overrides for notebooks and scripts (the CLIs use absl's `--config.a.b=v`).

  Values are parsed like the command line: ints, floats, bools, tuples. Unknown keys raise ConfigError
  listing the closest valid keys.
  """
  if isinstance(overrides, dict):
    items = list(overrides.items())
  else:
    items = []
    for o in overrides:
      if "=" not in o:
        raise ConfigError(f"override {o!r} has no value: write {o}=VALUE")
      items.append(tuple(o.split("=", 1)))
  for key, value in items:
    node, parts = c, key.split(".")
    for i, p in enumerate(parts):
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if p not in keys:
        close = difflib.get_close_matches(p, keys, n=3)
        where = ".".join(parts[:i]) or "<root>"
        raise ConfigError(f"unknown config key {key!r}: {where!r} has no field {p!r}"
                          + (f"; did you mean {', '.join(repr(k) for k in close)}?" if close else
                             f"; fields are {', '.join(keys)}"))
      if i < len(parts) - 1:
        node = node[p]
    old = node[parts[-1]]
    node[parts[-1]] = _parse_like(value, old, key) if isinstance(value, str) else value
  return c


def _parse_like(text: str, old, key: str):
  import ast
  if isinstance(old, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if isinstance(old, bool) and text.lower() in ("true", "false"):
      return text.lower() == "true"
    raise ConfigError(f"config key {key!r}: cannot parse {text!r} as {type(old).__name__}")
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  if isinstance(old, tuple) and isinstance(value, (list, tuple)):
    value = tuple(value)
  return value


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """Rebuilds a config saved as JSON (a workdir's config.json) on top of the schema, restoring tuples."""
  c = base_config()

  def assign(node, vals, where):
    for k, v in vals.items():
      if k not in node:
        raise ConfigError(f"saved config has unknown key {where}{k!r} (written by another version?)")
      if isinstance(node[k], ml_collections.ConfigDict):
        assign(node[k], v, f"{where}{k}.")
      else:
        node[k] = tuple(v) if isinstance(node[k], tuple) else v
  assign(c, values, "")
  return c


def flatten(values: dict, prefix: str = "") -> dict:
  """{'a.b.c': leaf} of a nested dict (e.g. a config's JSON), in the keys `--config.a.b.c=` overrides use."""
  out = {}
  for k, v in values.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(old, new) -> list[tuple[str, Any, Any]]:
  """[(key, old value, new value)] for every flattened key where two configs differ, in key order; a key one of
  them lacks reads '(absent)'. Either may be a ConfigDict or a config's JSON dict (tuples compare as lists)."""
  def flat(c):
    return flatten(json.loads(c.to_json_best_effort()) if isinstance(c, ml_collections.ConfigDict) else c)
  a, b = flat(old), flat(new)
  absent = "(absent)"
  return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(a.keys() | b.keys())
          if k not in a or k not in b or a[k] != b[k]]


def describe_differences(diffs: list[tuple[str, Any, Any]]) -> str:
  """'key: old -> new; ...' of `differences`."""
  return "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)


def fsq_codebook_size(levels: Sequence[int]) -> int:
  return int(math.prod(int(l) for l in levels))
