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

import json
import os
from typing import Sequence

import jax
import numpy as np

from e2etts_jax import audio, synthesis

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
          "fm": f"d{c.fm.d_model} x {c.fm.num_layers} layers", "token_rate": float(c.tokenizer.token_rate),
          "inference": synthesis.inference_settings(c),
          **(meta or {})}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "diagnosis.json"), "w") as f:
    json.dump({"variants": rows, "meta": meta}, f, indent=1)
  with open(os.path.join(out_dir, "diagnosis.md"), "w") as f:
    f.write(markdown(rows, meta))
  return rows


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


def collect(root: str) -> str:
  """One markdown table of every `root/*/diagnosis.json` (a row per study folder, in name order): each variant's
  WER and ratio to the ceiling, and the prior's and resynthesis's mel error."""
  names = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "diagnosis.json")))
  if not names:
    raise FileNotFoundError(f"no */diagnosis.json under {root}")
  cell = lambda r: "-" if r is None or r.get("wer") is None else (
      f"{r['wer']:.1f}" + ("" if r.get("wer_over_ceiling") is None else f" ({r['wer_over_ceiling']:.2f})"))
  mse = lambda r: "-" if r is None or r.get("mel_mse") is None else f"{r['mel_mse']:.3f}"
  lines = ["| study | config, FM | step | split, sentences | " + " | ".join(f"{v} WER (/ ceiling)" for v in VARIANTS)
           + " | mel MSE prior / resynthesis |", "|---" * (5 + len(VARIANTS)) + "|"]
  for name in names:
    with open(os.path.join(root, name, "diagnosis.json")) as f:
      d = json.load(f)
    m, rows = d["meta"], d["variants"]
    lines.append(f"| {name} | {m.get('config', '-')}, {m.get('fm', '-')} | {m.get('step', '-')} | "
                 f"{m.get('split', '-')}, {m['items']} | " + " | ".join(cell(rows.get(v)) for v in VARIANTS)
                 + f" | {mse(rows.get('prior'))} / {mse(rows.get('resynthesis'))} |")
  return "\n".join(lines) + "\n"
