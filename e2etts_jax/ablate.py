"""The ablation runner: variants x seeds of the main job on one corpus, one results.json per run, and the results
table (docs/results.md) rendered from every saved results.json, never typed by hand.

  e2etts-ablate --config configs/small.py --variants e2e,cascaded,recognition_tokenizer --seeds 0,1,2 \
      --out runs/ablate [--config.train.stage1.steps=...]
  e2etts-ablate --report_only --out runs/ablate --md docs/results.md

Each run is `main_job.run` (train -> TTS / resynthesis / ceiling judged by pocketsphinx) in <out>/<variant>/seed<k>
with the corpus and shards shared, model seed = data-order seed = eval seed = k, so for a given seed every variant is
scored on the same sentences with the same prompts (paired). A finished run (its results.json exists) is skipped,
so an interrupted study resumes where it stopped.

Variants (same config, data and eval items; the same total step budget unless named otherwise):
  e2e                    stages 1 -> 2 -> 3: the method
  cascaded               config_lib.make_cascaded: recognition-only tokenizer, networks trained separately
  cascaded_equal_flops   cascaded with stage 2 lengthened until its analytic training FLOPs equal e2e's: the same
                         compute rather than the same steps (a joint stage-1 step runs all four networks, a
                         cascade's only tokenizer + RM, so at equal steps e2e spends ~2x the compute)
  recognition_tokenizer  stage 1 trains only tokenizer + RM, on recognition; then stages 2 -> 3 exactly as e2e:
                         isolates what the joint stage-1 objective does to the token space
  detached_tokens        stage 1 trains all four networks exactly as e2e, but only the RM's loss reaches the
                         tokenizer (train.stage1.token_grads='rm,rm_spk'): the token-space question with every network
                         trained for the same steps (recognition_tokenizer's FM and LLM miss stage 1)
  recognition_tokenizer_equal_flops
                         recognition_tokenizer with stage 2 lengthened to e2e's analytic training FLOPs: the
                         tokenizer question at equal compute (its FM and LLM get the stage-1 FLOPs back as steps)
  no_usage               e2e without the tokenizer's code-usage term (what the anti-collapse term buys)
  no_prior               e2e with neither the FM's token encoder nor its prior-mel loss (what they buy)
"""
from __future__ import annotations

import csv
import datetime
import glob
import json
import math
import os
import subprocess
from typing import Callable, Iterable, Mapping, Optional, Sequence

import ml_collections

from e2etts_jax import config_lib, provenance


def _recognition_tokenizer(c: ml_collections.ConfigDict) -> None:
  c.train.stage1.trainable = "tokenizer,rm"
  usage = c.train.stage1.weights.usage
  c.train.stage1.weights.update({k: 0.0 for k in config_lib.LOSS_TERMS})
  c.train.stage1.weights.update(rm=1.0, usage=usage)


def _equal_flops(make: Callable[[ml_collections.ConfigDict], None]) -> Callable[[ml_collections.ConfigDict], None]:
  """The variant `make`, its stage 2 set to the steps that bring its analytic training FLOPs to the study (e2e)
  config's: the same compute rather than the same steps (stage 2 is where both cheaper variants train LLM + FM)."""
  def apply(c: ml_collections.ConfigDict) -> None:
    from e2etts_jax import flops
    from e2etts_jax.system import DataInfo
    info = DataInfo.for_config(c)
    target = flops.train_flops(c, info)   # c is the study's (e2e) config
    make(c)
    c.train.stage2.steps = 0
    rest = target - flops.train_flops(c, info)
    batch, frames = config_lib.stage_batch_size(c, "stage2"), int(c.data.max_frames)
    c.train.stage2.steps = max(1, round(rest / flops.step_flops(c, info, batch, frames, "stage2")))
  return apply


VARIANTS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "e2e": lambda c: None,
    "cascaded": config_lib.make_cascaded,
    "cascaded_equal_flops": _equal_flops(config_lib.make_cascaded),
    "recognition_tokenizer": _recognition_tokenizer,
    "recognition_tokenizer_equal_flops": _equal_flops(_recognition_tokenizer),
    "detached_tokens": lambda c: setattr(c.train.stage1, "token_grads", "rm,rm_spk"),
    "no_usage": lambda c: setattr(c.train.stage1.weights, "usage", 0.0),
    "no_prior": lambda c: c.fm.update(encoder_layers=0, prior_weight=0.0),
}

# The paper's claims as paired comparisons: (system a, system b, metric); the claim is that a's metric is lower.
# Resynthesis runs tokenizer -> FM only, so e2e vs cascaded on it compares the joint stage-1 tokenizer with the
# recognition-only one, each with an FM trained on its own tokens; recognition_tokenizer isolates the same question
# with identical later stages; detached_tokens asks it with every network trained for the same steps.
CLAIMS = (
    ("e2e", "cascaded", "tts"),
    ("e2e", "cascaded", "resynthesis"),
    ("e2e", "recognition_tokenizer", "resynthesis"),
    ("e2e", "recognition_tokenizer", "tts"),
    ("e2e", "recognition_tokenizer", "mel_mse"),
    ("e2e", "recognition_tokenizer", "speaker_miss"),
    ("e2e", "recognition_tokenizer_equal_flops", "resynthesis"),
    ("e2e", "recognition_tokenizer_equal_flops", "tts"),
    ("e2e", "recognition_tokenizer_equal_flops", "mel_mse"),
    ("e2e", "recognition_tokenizer_equal_flops", "speaker_miss"),
    ("e2e", "detached_tokens", "resynthesis"),
    ("e2e", "detached_tokens", "tts"),
    ("e2e", "detached_tokens", "mel_mse"),
    ("e2e", "cascaded", "mel_mse"),
    ("e2e", "cascaded", "speaker_miss"),
    ("e2e", "cascaded_equal_flops", "tts"),
    ("e2e", "cascaded_equal_flops", "resynthesis"),
    ("e2e", "cascaded_equal_flops", "mel_mse"),
    ("e2e", "cascaded_equal_flops", "speaker_miss"),
    ("e2e", "detached_tokens", "speaker_miss"),
    ("e2e", "no_usage", "resynthesis"),
    ("e2e", "no_prior", "resynthesis"),
    ("e2e", "no_prior", "mel_mse"),
    ("e2e", "cascaded", "resynthesis_missed"),
    ("e2e", "cascaded_equal_flops", "resynthesis_missed"),
    ("e2e", "recognition_tokenizer", "resynthesis_missed"),
    ("e2e", "recognition_tokenizer_equal_flops", "resynthesis_missed"),
    ("e2e", "cascaded", "tts_missed"),
    ("e2e", "cascaded_equal_flops", "tts_missed"),
    ("e2e", "recognition_tokenizer", "tts_missed"),
    ("e2e", "recognition_tokenizer_equal_flops", "tts_missed"),
)
SYSTEMS = ("tts", "resynthesis", "ceiling")
# A claim's metric: a system's WER ratio to the ceiling, or `mel_mse`, the resynthesis mel error (main job), or
# `speaker_miss`, the share of TTS outputs whose RM speaker embedding does not rank the prompt's speaker first, or
# `<system>_missed`, the judge's substitutions + deletions on a system in % of reference words: its WER without the
# insertions, which keeps telling systems apart below the WER floor (an output that gets a few words right among
# many inserted ones reads ~100% WER, like one that gets none).
MEL_MSE = "mel_mse"
SPEAKER_MISS = "speaker_miss"
MISSED = "_missed"


def _metric(system: str) -> Callable[[Mapping], Optional[float]]:
  if system == MEL_MSE:
    return lambda r: r.get(MEL_MSE)
  if system == SPEAKER_MISS:
    def miss(r):
      top1 = (r.get("speaker_first") or {}).get("tts")
      return None if top1 is None else 1.0 - top1
    return miss
  if system.endswith(MISSED):
    def missed(r, name=system[:-len(MISSED)]):
      c = (r.get("wer_components") or {}).get(name)
      return None if c is None else c["substitutions"] + c["deletions"]
    return missed
  return lambda r: r["ratio"].get(system)


def _per_utterance(r: Mapping, system: str) -> dict[str, float]:
  """{utt: figure} that a claim's utterance bootstrap pairs: the WER in % for a system, the resynthesis mel error
  for MEL_MSE, the words missed in % for '<system>_missed' (runs saved before either field have none), nothing for
  SPEAKER_MISS (a hit or miss per output)."""
  if system == MEL_MSE:
    return dict(r.get("per_utterance_mel_mse") or {})
  if system == SPEAKER_MISS:
    return {}
  if system.endswith(MISSED):
    return dict((r.get("per_utterance_missed") or {}).get(system[:-len(MISSED)]) or {})
  # per-utterance WERs are fractions; the table speaks in WER %
  return {u: 100.0 * w for u, w in r["per_utterance_wer"].get(system, {}).items()}


def variant_config(config: ml_collections.ConfigDict, variant: str, seed: int) -> ml_collections.ConfigDict:
  """A copy of `config` turned into `variant` with every seed set to `seed`."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
  c = ml_collections.ConfigDict(config.to_dict())
  VARIANTS[variant](c)
  c.seed = seed
  c.data.shuffle_seed = seed
  return c


def _commit() -> Optional[str]:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def run_results(summary: Mapping, workdir: str, *, variant: str, seed: int, overrides: Sequence[str],
                commit: Optional[str] = None, study_steps: Optional[int] = None,
                train_flops: Optional[float] = None) -> dict:
  """The results.json content of one run, from main_job's summary and the per-utterance eval results.

  study_steps: the study config's total steps (runs pair up by it, whatever steps their variant moved or added);
  train_flops: the run's analytic training FLOPs (`flops.train_flops` of its config).
  """
  ev = summary["eval"]
  ceiling = (ev.get("ceiling") or {}).get("wer")
  scored = _eval_results(workdir)
  per_utt = {system: {u["utt"]: u["wer"] for u in r["utterances"]} for system, r in scored.items()}
  components = {system: r["summary"].get("wer_components") for system, r in scored.items()}
  stage1 = summary["final_losses"].get("stage1", {})
  return {
      "variant": variant, "seed": seed, "config": summary["config_name"], "mode": summary["mode"],
      "steps": summary["steps"], "study_steps": study_steps, "train_flops": train_flops,
      "overrides": list(overrides),
      "batch_size": summary.get("batch_size"), "stage_batch_sizes": summary.get("stage_batch_sizes"),
      "machine": provenance.machine(), "versions": provenance.versions(),
      "commit": commit,
      "date": datetime.date.today().isoformat(),
      # The run's training over all its resumes; summaries older than that field have only this call's phase.
      "train_seconds": summary.get("train_seconds", summary["phases"].get("train")),
      "total_seconds": summary["total_seconds"],
      "wer": {s: (ev.get(s) or {}).get("wer") for s in SYSTEMS},
      "ratio": {s: (ev[s]["wer"] / ceiling if ev.get(s) and ev[s].get("wer") is not None and ceiling else None)
                for s in ("tts", "resynthesis")},
      "sim": (ev.get("tts") or {}).get("sim"), MEL_MSE: summary.get("resynthesis_mel_mse"),
      "per_utterance_mel_mse": dict(summary.get("resynthesis_mel_mse_per_utterance") or {}),
      "code_perplexity": stage1.get("codes/perplexity"), "speaker_first": speaker_first(summary),
      "final_losses": summary["final_losses"],
      "eval_items": summary["eval_items"], "per_utterance_wer": per_utt, "wer_components": components,
      "per_utterance_missed": _utterance_missed(workdir),
  }


def _eval_results(run_dir: str) -> dict[str, dict]:
  """{system: the eval harness's results.json} of the systems a run's eval folder holds."""
  out = {}
  for system in SYSTEMS:
    path = os.path.join(run_dir, "eval", system, "results.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        out[system] = json.load(f)
  return out


def _utterance_missed(run_dir: str) -> dict[str, dict[str, float]]:
  """{system: {utt: the judge's substitutions + deletions in % of the reference's words}} of the scored sentences
  in a run's eval folders (their details.csv: the harness's results.json keeps only each sentence's WER). Their
  mean over a system's sentences is its wer_components' substitutions + deletions (the harness averages the same
  way)."""
  out = {}
  for system in SYSTEMS:
    path = os.path.join(run_dir, "eval", system, "details.csv")
    if not os.path.exists(path):
      continue
    with open(path, encoding="utf-8", newline="") as f:
      rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    out[system] = {r["utt"]: 100.0 * (float(r["substitutions"]) + float(r["deletions"])) / float(r["ref_len"])
                   for r in rows}
  return out


def speaker_first(summary: Mapping) -> dict:
  """{system: fraction of its outputs whose RM speaker embedding ranks the prompt's speaker first} of a main-job
  summary (the issue's speaker target is on 'tts')."""
  ranking = summary.get("speaker_ranking") or {}
  return {s: v["top1"] for s, v in ranking.items() if isinstance(v, Mapping) and v.get("top1") is not None}


def run_study(config: ml_collections.ConfigDict, out: str, variants: Sequence[str], seeds: Sequence[int], *,
              corpus_dir: str, num_utterances: int, eval_items: int,
              overrides: Optional[Mapping[str, object]] = None, progress: bool = True) -> list[str]:
  """Trains and scores every (variant, seed) not done yet; returns the results.json paths of all of them.

  overrides: the {key: value} config overrides the study was given (already applied to `config`): recorded in each
  run's summary (main_job) and, as sorted 'key=value' strings, in its results.json.
  """
  from e2etts_jax import flops, main_job, trainer
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
  out = os.path.abspath(out)
  commit = _commit()   # the code this process loaded, not whatever the checkout holds when a run ends
  if not config.data.shards:
    config.data.shards = os.path.join(out, "shards")
  study_steps = sum(int(config.train[s].steps) for s in config_lib.STAGES)
  paths, refused = [], []
  for seed in seeds:
    for v in variants:
      workdir = os.path.join(out, v, f"seed{seed}")
      path = os.path.join(workdir, "results.json")
      paths.append(path)
      if os.path.exists(path):
        print(f"[ablate] {v} seed {seed}: done before ({path})", flush=True)
        continue
      print(f"[ablate] {v} seed {seed} -> {workdir}", flush=True)
      c = variant_config(config, v, seed)
      try:
        summary = main_job.run(c, workdir, corpus_dir=corpus_dir, num_utterances=num_utterances,
                               eval_items=eval_items, eval_seed=seed, progress=progress, overrides=overrides)
      except trainer.ResumeError as e:   # a run begun under another study config: the others go on
        print(f"[ablate] {v} seed {seed}: refused: {e}", flush=True)
        refused.append(workdir)
        continue
      res = run_results(summary, workdir, variant=v, seed=seed, commit=commit,
                        overrides=[f"{k}={val}" for k, val in sorted((overrides or {}).items())],
                        study_steps=study_steps, train_flops=flops.train_flops(c))
      _write_json(path, res)
  if refused:
    raise trainer.ResumeError(
        f"{len(refused)} of {len(paths)} runs refused, each begun under another config (see above; the others are "
        f"done): {', '.join(refused)}. Finish them under the config they began with, or move them away")
  return paths


def load_results(roots: Iterable[str]) -> list[dict]:
  """Every <root>/**/results.json written by `run_study` (eval folders' own results.json are skipped), each with
  'study': the name of its study folder (<study>/<variant>/seed<k>/results.json). Claims pair runs of one study
  only: two studies at the same budget may be of different code."""
  rows = []
  for root in roots:
    for path in sorted(glob.glob(os.path.join(root, "**", "results.json"), recursive=True)):
      with open(path, encoding="utf-8") as f:
        r = json.load(f)
      if "variant" in r and "ratio" in r:
        if "speaker_first" not in r:   # results.json written before the field: the run's summary.json has it
          summary = os.path.join(os.path.dirname(path), "summary.json")
          if os.path.exists(summary):
            with open(summary, encoding="utf-8") as f:
              r["speaker_first"] = speaker_first(json.load(f))
        if r.get("train_flops") is None:   # saved before the field: the run's config.json says what it trained
          r["train_flops"] = _config_train_flops(os.path.dirname(path))
        r["path"] = path
        r["study"] = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path)))))
        rows.append(r)
  return rows


def _config_train_flops(run_dir: str) -> Optional[float]:
  """flops.train_flops of the config.json in `run_dir` (None without one)."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    return None
  from e2etts_jax import flops
  with open(path, encoding="utf-8") as f:
    return flops.train_flops(config_lib.from_dict(json.load(f)))


def add_mel_errors(path: str, *, rtol: float = 1e-4) -> Optional[float]:
  """Adds `per_utterance_mel_mse` to a run's results.json saved before the field, from the run's latest
  checkpoint: its scored sentences re-resynthesised with its eval seed, as `main_job.run` does. The mean of those
  errors must give the saved mel_mse back to `rtol`, else the checkpoint or the code is not what made the saved
  figure and nothing is written (ValueError). Returns the relative difference of the two means, or None when the
  file has the field already."""
  import numpy as np
  from e2etts_jax import main_job, synthesis
  with open(path, encoding="utf-8") as f:
    r = json.load(f)
  if r.get("per_utterance_mel_mse"):
    return None
  run_dir = os.path.dirname(os.path.abspath(path))
  items_path = os.path.join(run_dir, "eval", "manifest.jsonl")
  if not os.path.exists(items_path):
    raise FileNotFoundError(f"{path}: no eval manifest at {items_path} to find the run's scored sentences")
  if r.get(MEL_MSE) is None:
    raise ValueError(f"{path}: no saved mel_mse to check the recomputed errors against")
  # main_job.run scores min(eval_items, available) sentences; picking that many again picks the same ones.
  items = main_job.eval_items_of(items_path, int(r["seed"]), int(r["eval_items"]))
  synth = synthesis.Synthesizer.from_workdir(run_dir, seed=int(r["seed"]))
  errors = main_job.resynthesis_mel_errors(synth, items, int(r["seed"]))
  if not errors:
    raise ValueError(f"{path}: none of the run's {len(items)} scored sentences has ground-truth audio")
  mean = float(np.mean(list(errors.values())))   # as main_job.run averages them
  rel = abs(mean - r[MEL_MSE]) / max(abs(r[MEL_MSE]), 1e-12)
  if rel > rtol:
    raise ValueError(f"{path}: recomputed resynthesis mel errors average {mean:.6f}, the saved mel_mse is "
                     f"{r[MEL_MSE]:.6f} (relative difference {rel:.1e} > {rtol:g}): not the run that was scored")
  r["per_utterance_mel_mse"] = errors
  _write_json(path, r)
  return rel


def add_wer_components(path: str, *, rtol: float = 1e-6) -> bool:
  """Adds what a run's results.json was saved without of `wer_components` ({system: the judge's substitutions /
  deletions / insertions in %}) and `per_utterance_missed` ({system: {utt: substitutions + deletions in %}}), from
  the run's eval folders; True if it wrote. The per-utterance figures must average to the saved components'
  substitutions + deletions (to `rtol`), else the eval folder is not the one that was scored and nothing is written
  (ValueError). FileNotFoundError when the run has no eval folder to read them from."""
  with open(path, encoding="utf-8") as f:
    r = json.load(f)
  if r.get("wer_components") and r.get("per_utterance_missed"):
    return False
  run_dir = os.path.dirname(os.path.abspath(path))
  scored = _eval_results(run_dir)
  if not scored:
    raise FileNotFoundError(f"{path}: no eval/<system>/results.json beside it to read the WER components from")
  wrote = False
  if not r.get("wer_components"):
    r["wer_components"] = {system: ev["summary"].get("wer_components") for system, ev in scored.items()}
    wrote = True
  missed = _utterance_missed(run_dir)
  for system, per_utt in missed.items():
    c = r["wer_components"].get(system)
    if c is None or not per_utt:
      continue
    mean, saved = sum(per_utt.values()) / len(per_utt), c["substitutions"] + c["deletions"]
    if abs(mean - saved) > rtol * max(abs(saved), 1e-12):
      raise ValueError(f"{path}: the {system} sentences in eval/{system}/details.csv miss {mean:.4f}% of words on "
                       f"average, the saved WER components {saved:.4f}%: not the eval that was scored")
  if missed and not r.get("per_utterance_missed"):
    r["per_utterance_missed"] = missed
    wrote = True
  if wrote:
    _write_json(path, r)
  return wrote


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, default=float)
  os.replace(tmp, path)   # a results.json is either whole or absent


def _budget(r: Mapping) -> str:
  """The budget runs are paired at: the study config's total steps x batch (cascaded moves stage 3's steps to
  stage 2; cascaded_equal_flops adds steps; older records without study_steps: their own total)."""
  return f"{r.get('study_steps') or sum(r['steps'].values())} x {r.get('batch_size') or '?'}"


def _stages(r: Mapping) -> str:
  """Steps per stage, '950/75/75', and the batch of each where a stage has its own (`train.<stage>.batch_size`):
  '1900/150/75 x 4/4/8'."""
  b = r.get("stage_batch_sizes") or {}
  batches = {k: b.get(k, r.get("batch_size")) for k in config_lib.STAGES}
  # The table's budget column holds the batch already, so it is named here only where stages differ.
  return config_lib.stages_label(r["steps"], batches if len(set(batches.values())) > 1 else None)


def _num(x, fmt="{:.2f}") -> str:
  return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def compare(rows: Sequence[Mapping], a: str, b: str, system: str) -> Optional[dict]:
  """Paired comparison of variant a against b on `system`'s WER ratio (or, for `system` = MEL_MSE, the resynthesis
  mel error; for SPEAKER_MISS, the TTS speaker-miss share; for '<system>_missed', that system's substitutions +
  deletions), over the seeds both have (same config and budget): per-variant mean/std over seeds, paired t-test over
  seeds, and a paired bootstrap over utterances pooled across those seeds (WER in %, the mel error, or the words
  missed in %; none for SPEAKER_MISS). A run saved before its metric's per-utterance field leaves its seed out of
  the bootstrap only; `utt_seeds` counts the seeds the bootstrap pooled."""
  from e2etts_jax.evaluation import stats
  key = lambda r: (r["config"], _budget(r), r.get("study"), r["seed"])
  value = _metric(system)
  ra = {key(r): r for r in rows if r["variant"] == a and value(r) is not None}
  rb = {key(r): r for r in rows if r["variant"] == b and value(r) is not None}
  common = sorted(set(ra) & set(rb))
  if not common:
    return None
  ua, ub, utt_seeds = [], [], 0
  for k in common:
    pa, pb = _per_utterance(ra[k], system), _per_utterance(rb[k], system)
    paired = sorted(set(pa) & set(pb))
    utt_seeds += bool(paired)
    for utt in paired:
      ua.append(pa[utt])
      ub.append(pb[utt])
  c = stats.paired_over_seeds([value(ra[k]) for k in common], [value(rb[k]) for k in common], ua, ub)
  return {"a": a, "b": b, "system": system, "configs": sorted({k[:2] for k in common}), "utt_seeds": utt_seeds, **c}


def _verdict(c: Mapping) -> str:
  p = c["t_test_p"]
  if c["n_seeds"] < 3:
    return f"too few seeds ({c['n_seeds']} < 3)"
  lower = c["mean_a"] < c["mean_b"]
  if p is not None and p < 0.05:
    return f"{c['a'] if lower else c['b']} lower (p = {p:.3f})"
  return "no significant difference" + (f" (p = {p:.2f})" if p is not None else "")


def results_markdown(rows: Sequence[Mapping]) -> str:
  """The results page: every run, then each claim's paired comparison."""
  rows = sorted(rows, key=lambda r: (r["config"], _budget(r), r.get("study") or "", r["variant"], r["seed"]))
  lines = ["# Results", "",
           "Produced by `e2etts-ablate --report_only` from the runs' results.json files; do not edit by hand.",
           "WER is pocketsphinx's (Seed-TTS-Eval normalisation) on held-out sentences with same-speaker prompts; "
           "a ratio is the system's WER over the ceiling's (ground-truth mel -> Griffin-Lim) on the same sentences.",
           "Budget: the study config's total training steps x batch size (runs pair up by it); stages: the steps "
           "each run took in stage 1/2/3; train TFLOP: analytic training FLOPs (`flops.train_flops`, at the padded "
           "batch shape), what `cascaded_equal_flops` matches to e2e's; train min: the run's training wall time, "
           "compiles and held-out evals included, summed over its resumes (runs saved before that sum: their last "
           "call's). TTS speaker first: the share of TTS "
           "outputs whose RM speaker embedding ranks the prompt's speaker first among the corpus speakers.", "",
           "## Runs", "",
           "| study | config | budget | stages | variant | seed | machine | TTS / ceiling | resynthesis / ceiling | "
           "ceiling WER % | resynthesis mel MSE | code perplexity | TTS speaker first % | train TFLOP | train min | "
           "date | commit |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ceil = r["wer"].get("ceiling")
    spk = (r.get("speaker_first") or {}).get("tts")
    lines.append(
        f"| {r.get('study') or '-'} | {r['config']} | {_budget(r)} | {_stages(r)} | {r['variant']} | {r['seed']} | "
        f"{r['machine']} | "
        f"{_num(r['ratio'].get('tts'))} | {_num(r['ratio'].get('resynthesis'))} | {_num(ceil, '{:.1f}')} | "
        f"{_num(r.get(MEL_MSE), '{:.3f}')} | {_num(r.get('code_perplexity'), '{:.1f}')} | "
        f"{_num(None if spk is None else 100 * spk, '{:.0f}')} | "
        f"{_num(None if r.get('train_flops') is None else r['train_flops'] / 1e12, '{:.1f}')} | "
        f"{_num(None if r.get('train_seconds') is None else r['train_seconds'] / 60, '{:.1f}')} | "
        f"{r.get('date', '-')} | {r.get('commit') or '-'} |")
  lines += ["", "## Claims (paired: same seeds, sentences and prompts)", "",
            "Lower is better. t-test: paired over seeds on the ratio (on the resynthesis mel error for `mel_mse`: "
            "ground truth -> tokenizer -> FM against the ground-truth log-mel, no vocoder, on the scored sentences; "
            "on the share of TTS outputs whose prompt speaker the RM does not rank first for `speaker_miss`; on "
            "the judge's substitutions + deletions in % of reference words, its WER without the insertions, for "
            "`resynthesis_missed` and `tts_missed`); "
            "utterance bootstrap: paired over every scored sentence of those seeds (mean WER difference a - b, "
            "in WER %; for `mel_mse`, the mean mel error difference; for `*_missed`, in % of words; "
            "'k of n seeds' where runs saved before the per-utterance figures leave seeds out of it).", "",
            "| claim: a beats b on | config, budget (study) | seeds | a: mean ± std | b: mean ± std | t-test p | "
            "utt. diff (p) | verdict |", "|---|---|---|---|---|---|---|---|"]
  studies = sorted({(r["config"], _budget(r), r.get("study") or "") for r in rows})
  for cfg, budget, study in studies:
    subset = [r for r in rows if (r["config"], _budget(r), r.get("study") or "") == (cfg, budget, study)]
    for a, b, system in CLAIMS:
      c = compare(subset, a, b, system)
      if c is None:
        continue
      diff = "{:+.2f}" if system == MEL_MSE else "{:+.1f}"
      utt = f"{diff.format(c['utt_diff'])} ({c['utt_p']:.3f})" if c["utt_diff"] is not None else "-"
      if c["utt_diff"] is not None and c["utt_seeds"] < c["n_seeds"]:   # runs saved before the per-utterance field
        utt += f", {c['utt_seeds']} of {c['n_seeds']} seeds"
      lines.append(f"| {a} vs {b}: {system} | {cfg}, {budget} ({study}) | {c['n_seeds']} | {c['mean_a']:.2f} ± "
                   f"{c['std_a']:.2f} | {c['mean_b']:.2f} ± {c['std_b']:.2f} | {_num(c['t_test_p'], '{:.3f}')} | "
                   f"{utt} | {_verdict(c)} |")
  return "\n".join(lines) + "\n"


def write_report(roots: Iterable[str], md_path: str) -> str:
  rows = load_results(roots)
  if not rows:
    raise FileNotFoundError(f"no ablation results.json under {', '.join(roots)}")
  text = results_markdown(rows)
  os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(text)
  return text
