"""Where intelligibility is lost between the ground truth and resynthesis: the judge's WER on mel variants.

Every variant is a log-mel made from the same ground-truth sentence and vocoded the same way (the shipped
vocoder), so their differences in WER belong to the mel alone:

  ground_truth  the mel itself: the ceiling.
  envelope      its spectral envelope (`audio.spectral_envelope`: pitch harmonics removed): how much of the ceiling
                survives without pitch information, the most an over-smoothed decoder could keep.
  prior         tokenizer -> the FM's prior head (`Synthesizer.prior_mel`): what the codes alone say, no flow.
  resynthesis   tokenizer -> FM sampler (`Synthesizer.resynthesize_mel`).

On training sentences (`split='train'`) the networks have seen every target: a resynthesis far from the ceiling
there is a failure to fit (capacity, budget, what the tokens keep), not to generalise.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import jax
import numpy as np

from e2etts_jax import audio, config_lib, synthesis

VARIANTS = ("ground_truth", "envelope", "prior", "resynthesis")


def variant_mel(synth, mel: np.ndarray, variant: str, rng: jax.Array, envelope_coeffs: int = 20) -> np.ndarray:
  """The `variant` of a ground-truth log-mel [frames, n_mels], cut to whole tokens: [frames', n_mels]."""
  mel = np.asarray(mel, np.float32)[: (mel.shape[0] // synth.ds) * synth.ds]
  if variant == "ground_truth":
    return mel
  if variant == "envelope":
    return audio.spectral_envelope(mel, envelope_coeffs)
  if variant == "prior":
    return synth.prior_mel(synth.tokenize_mel(mel))
  if variant == "resynthesis":
    return synth.resynthesize_mel(mel, rng)
  raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def diagnose(synth, items: Sequence, out_dir: str, *, asr, variants: Sequence[str] = VARIANTS,
             envelope_coeffs: int = 20, seed: int = 0, n_resamples: int = 1000, progress: bool = True,
             meta: dict | None = None) -> dict:
  """Scores each variant of every item's ground truth with the judge; writes OUT/<variant>/ (the harness's
  reports), OUT/diagnosis.json (with `meta`, e.g. the split, beside what the synthesizer says of the model) and
  OUT/diagnosis.md.

  Returns {variant: {wer, ci_low, ci_high, wer_over_ceiling, mel_mse, scored}}: mel_mse is the mean over items of
  the mean squared log-mel error against the ground truth; wer_over_ceiling needs 'ground_truth' among variants.
  """
  from e2etts_jax import evaluation   # the judges pull in pocketsphinx: only when diagnosing
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    raise ValueError(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
  # The ceiling first, so that every other variant reports its ratio to it.
  variants = sorted(dict.fromkeys(variants), key=VARIANTS.index)
  key = jax.random.key(seed)
  rows, ceiling = {}, None
  for variant in variants:
    errors: list[float] = []

    def roundtrip(wav, sr, variant=variant, errors=errors):
      mel = synth.mel_of(wav, sr)
      out = variant_mel(synth, mel, variant, jax.random.fold_in(key, len(errors)), envelope_coeffs)
      errors.append(float(np.mean(np.square(out - mel[: out.shape[0]]))))
      return np.asarray(synth.vocoder(out), np.float32), synth.sample_rate

    res = evaluation.evaluate(items, os.path.join(out_dir, variant), ceiling=True, roundtrip=roundtrip, asr=asr,
                              ceiling_results=ceiling, seed=seed, n_resamples=n_resamples, progress=progress,
                              meta={"system": f"diagnosis: {variant}"})
    if variant == "ground_truth":
      ceiling = res
    wer = res["summary"]["wer"] or {}
    rows[variant] = {"wer": wer.get("mean"), "ci_low": wer.get("ci_low"), "ci_high": wer.get("ci_high"),
                     "wer_over_ceiling": res.get("wer_over_ceiling"),
                     "mel_mse": float(np.mean(errors)) if errors else None,
                     "scored": res["summary"]["counts"]["scored"]}
  c = synth.config
  meta = {"envelope_coeffs": int(envelope_coeffs), "items": len(items), "seed": int(seed),
          "workdir": getattr(synth, "workdir", None), "config": c.name, "step": synth.meta.get("global_step"),
          "recipe": recipe(c), "token_rate": float(c.tokenizer.token_rate),
          "inference": synthesis.inference_settings(c),
          **(meta or {})}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "diagnosis.json"), "w") as f:
    json.dump({"variants": rows, "meta": meta}, f, indent=1)
  with open(os.path.join(out_dir, "diagnosis.md"), "w") as f:
    f.write(markdown(rows, meta))
  return rows


# Keys whose non-default values `recipe` names (the studies of docs/diagnosis.md vary these); the FM's own
# are named without their 'fm.' prefix.
RECIPE_KEYS = ("fm.encoder_layers", "fm.t_schedule", "fm.prior_start", "fm.prior_weight", "fm.conv_kernel",
               "tokenizer.conv_kernel", "rm.conv_kernel", "train.stage1.learning_rate")


def recipe(c) -> str:
  """The FM's size and the non-default RECIPE_KEYS, e.g. 'd192 x 4 layers, t_schedule=cosine, rm.conv_kernel=7'."""
  default = config_lib.base_config()
  get = lambda node, key: functools.reduce(lambda n, k: n[k], key.split("."), node)
  return ", ".join([f"d{c.fm.d_model} x {c.fm.num_layers} layers"]
                   + [f"{k.removeprefix('fm.')}={get(c, k)}" for k in RECIPE_KEYS if get(c, k) != get(default, k)])


def markdown(rows: dict, meta: dict) -> str:
  """The diagnosis table: one row per variant (WER with its bootstrap 95% interval, ratio, mel error)."""
  fmt = lambda x, spec: "-" if x is None else format(x, spec)
  lines = [f"Diagnosis of `{meta.get('workdir')}` on {meta['items']} sentences (envelope: "
           f"{meta['envelope_coeffs']} DCT coefficients over mel bins).", "",
           "| variant | WER % | 95% CI | WER / ceiling | mel MSE (log-mel^2) | scored |", "|---|---|---|---|---|---|"]
  for v, r in rows.items():
    ci = "-" if r["ci_low"] is None else f"[{r['ci_low']:.1f}, {r['ci_high']:.1f}]"
    lines.append(f"| {v} | {fmt(r['wer'], '.1f')} | {ci} | {fmt(r['wer_over_ceiling'], '.2f')} | "
                 f"{fmt(r['mel_mse'], '.3f')} | {r['scored']} |")
  return "\n".join(lines) + "\n"


def collect(root: str, baseline: str | None = None, n_resamples: int = 1000) -> str:
  """One markdown table of every `root/*/diagnosis.json` (a row per study folder, in name order): each variant's
  WER and ratio to the ceiling, and the prior's and resynthesis's mel error.

  With `baseline` (a study folder name under `root`), a last column gives each study's resynthesis WER minus the
  baseline's on the sentences both scored: the mean paired difference in points, its bootstrap 95% interval and
  two-sided p (`evaluation.compare` on the studies' resynthesis/results.json), and the number of sentences paired.
  """
  names = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "diagnosis.json")))
  if not names:
    raise FileNotFoundError(f"no */diagnosis.json under {root}")
  if baseline is not None and baseline not in names:
    raise FileNotFoundError(f"baseline study {baseline!r} has no diagnosis.json under {root}")
  cell = lambda r: "-" if r is None or r.get("wer") is None else (
      f"{r['wer']:.1f}" + ("" if r.get("wer_over_ceiling") is None else f" ({r['wer_over_ceiling']:.2f})"))
  mse = lambda r: "-" if r is None or r.get("mel_mse") is None else f"{r['mel_mse']:.3f}"
  header = ("| study | config, recipe | step | split, sentences | "
            + " | ".join(f"{v} WER (/ ceiling)" for v in VARIANTS) + " | mel MSE prior / resynthesis |")
  columns = 5 + len(VARIANTS)
  if baseline is not None:
    header += f" resynthesis WER - {baseline}'s [95% CI], p (sentences) |"
    columns += 1
  lines = [header, "|---" * columns + "|"]
  for name in names:
    with open(os.path.join(root, name, "diagnosis.json")) as f:
      d = json.load(f)
    m, rows = d["meta"], d["variants"]
    # Diagnoses written before 'recipe' named the FM's keys only, under 'fm'.
    line = (f"| {name} | {m.get('config', '-')}, {m.get('recipe', m.get('fm', '-'))} | {m.get('step', '-')} | "
            f"{m.get('split', '-')}, {m['items']} | " + " | ".join(cell(rows.get(v)) for v in VARIANTS)
            + f" | {mse(rows.get('prior'))} / {mse(rows.get('resynthesis'))} |")
    if baseline is not None:
      line += f" {_paired_cell(root, name, baseline, n_resamples)} |"
    lines.append(line)
  return "\n".join(lines) + "\n"


def _paired_cell(root: str, name: str, baseline: str, n_resamples: int) -> str:
  """'diff [lo, hi], p P (n)' of study `name`'s resynthesis WER against `baseline`'s; '-' if nothing pairs."""
  from e2etts_jax.evaluation import report
  paths = [os.path.join(root, n, "resynthesis", "results.json") for n in (name, baseline)]
  if name == baseline or not all(os.path.isfile(p) for p in paths):
    return "-"
  w = report.compare(*paths, n_resamples=n_resamples)["wer"]
  if w is None:
    return "-"
  return f"{w['diff']:+.1f} [{w['ci_low']:+.1f}, {w['ci_high']:+.1f}], p {w['p_bootstrap']:.3f} ({w['n']})"
