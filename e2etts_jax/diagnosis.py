"""Where intelligibility is lost between the ground truth and TTS: the judge's WER on mel variants.

Every variant is a log-mel of the same sentence vocoded the same way (the shipped vocoder); all but `tts` are made
from its ground-truth audio, so their differences in WER belong to the mel alone:

  ground_truth  the mel itself: the ceiling.
  envelope      its spectral envelope (`audio.spectral_envelope`: pitch harmonics removed): how much of the ceiling
                survives without pitch information, the most an over-smoothed decoder could keep.
  prior         tokenizer -> the FM's prior head (`Synthesizer.prior_mel`): what the codes alone say, no flow.
  resynthesis   tokenizer -> FM sampler (`Synthesizer.resynthesize_mel`).
  tts           the sentence's text and its item's prompt -> LLM -> FM (`Synthesizer.synthesize_item`): the whole
                system, so tts - resynthesis is what the LLM's tokens lose against the ground truth's.

On training sentences (`split='train'`) the networks have seen every target: a resynthesis far from the ceiling
there is a failure to fit (capacity, budget, what the tokens keep), not to generalise.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from e2etts_jax import audio, config_lib, synthesis

VARIANTS = ("ground_truth", "envelope", "prior", "resynthesis", "tts")
MEL_VARIANTS = VARIANTS[:-1]   # made from the ground-truth mel (variant_mel); tts is made from text


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
  raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(MEL_VARIANTS)}")


def diagnose(synth, items: Sequence, out_dir: str, *, asr, variants: Sequence[str] = VARIANTS,
             envelope_coeffs: int = 20, seed: int = 0, n_resamples: int = 1000, progress: bool = True,
             meta: dict | None = None) -> dict:
  """Scores each variant of every item (made from its ground truth; tts from its text and prompt) with the judge;
  writes OUT/<variant>/ (the harness's reports), OUT/diagnosis.json (with `meta`, e.g. the split, beside what the
  synthesizer says of the model) and OUT/diagnosis.md.

  Returns {variant: {wer, ci_low, ci_high, wer_over_ceiling, mel_mse, scored}}: mel_mse is the mean over items of
  the mean squared log-mel error against the ground truth (None for tts, whose length is the model's own);
  wer_over_ceiling needs 'ground_truth' among variants.
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

    source = dict(synthesize=synth.synthesize_item) if variant == "tts" else dict(ceiling=True, roundtrip=roundtrip)
    res = evaluation.evaluate(items, os.path.join(out_dir, variant), **source, asr=asr, ceiling_results=ceiling,
                              seed=seed, n_resamples=n_resamples, progress=progress,
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
          "train_seed": int(c.seed),
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
# are named without their 'fm.' prefix. The training mode and stage 1's networks and token gradients tell a
# cascade or an ablation arm from e2e on the same config, which its step count alone need not.
RECIPE_KEYS = ("fm.encoder_layers", "fm.t_schedule", "fm.prior_start", "fm.prior_weight", "fm.conv_kernel",
               "tokenizer.conv_kernel", "rm.conv_kernel", "train.stage1.learning_rate", "train.mode",
               "train.stage1.trainable", "train.stage1.token_grads", "train.optimizer",
               "train.muon_networks")


# Keys named where they differ from the defaults of the config's own size (`c.name`): the LLM's shape, its text
# units and an LLM-only stage 2 (the LLM studies vary these).
SIZE_RECIPE_KEYS = ("llm.d_model", "llm.num_layers", "llm.mlp_dim", "text.frontend", "text.model_type",
                    "text.vocab_size", "train.stage2.trainable", "train.stage2.learning_rate",
                    *(f"{n}.dropout" for n in config_lib.NETWORKS))


def recipe(c) -> str:
  """The FM's size and the non-default RECIPE_KEYS and SIZE_RECIPE_KEYS, e.g. 'd192 x 4 layers, t_schedule=cosine,
  rm.conv_kernel=7, llm.d_model=192'."""
  default = config_lib.base_config()
  size_default = config_lib.get_config(c.name, c.train.mode) if c.name in config_lib.SIZES else default
  get = config_lib.get_path
  return ", ".join([f"d{c.fm.d_model} x {c.fm.num_layers} layers"]
                   + [f"{k.removeprefix('fm.')}={get(c, k)}" for k in RECIPE_KEYS if get(c, k) != get(default, k)]
                   + [f"{k}={get(c, k)}" for k in SIZE_RECIPE_KEYS if get(c, k) != get(size_default, k)])


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
  names = _study_names(root, baseline)
  if not names:
    raise FileNotFoundError(f"no */diagnosis.json under {root}")
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
    line = (f"| {name} | {m.get('config', '-')}, {_recipe_of(m)} | {m.get('step', '-')} | "
            f"{m.get('split', '-')}, {m['items']} | " + " | ".join(cell(rows.get(v)) for v in VARIANTS)
            + f" | {mse(rows.get('prior'))} / {mse(rows.get('resynthesis'))} |")
    if baseline is not None:
      line += f" {_paired_cell(root, name, baseline, n_resamples)} |"
    lines.append(line)
  return "\n".join(lines) + "\n"


def _study_names(root: str, baseline: str | None) -> list[str]:
  """The study folders under `root` (those with a diagnosis.json), in name order; names a missing baseline."""
  names = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "diagnosis.json")))
  if baseline is not None and baseline not in names:
    raise FileNotFoundError(f"baseline study {baseline!r} has no diagnosis.json under {root}")
  return names


def _recipe_of(meta: dict) -> str:
  return meta.get("recipe", meta.get("fm", "-"))   # diagnoses written before 'recipe' named the FM's keys, as 'fm'


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


SEED_VARIANTS = ("prior", "resynthesis", "tts")   # the model's variants: what training seeds move


def _study(root: str, name: str) -> dict:
  with open(os.path.join(root, name, "diagnosis.json")) as f:
    d = json.load(f)
  seed = d["meta"].get("train_seed")
  config_json = os.path.join(root, name, "config.json")
  if seed is None and os.path.isfile(config_json):   # diagnoses written before 'train_seed': the run's config
    with open(config_json) as f:
      seed = json.load(f).get("seed")
  return {**d, "name": name, "train_seed": seed}


def _group_key(m: dict) -> tuple:
  """Studies of one recipe: same config, recipe, step, split and sentence count."""
  return m.get("config", "-"), _recipe_of(m), m.get("step", "-"), m.get("split", "-"), m["items"]


def _utterance_wers(root: str, name: str, variant: str) -> dict:
  """{utt: WER %} of a study's variant report ({} if the variant was not run)."""
  from e2etts_jax.evaluation import report
  path = os.path.join(root, name, variant)
  if not os.path.isfile(os.path.join(path, report.RESULTS_JSON)):
    return {}
  return {u["utt"]: 100.0 * u["wer"] for u in report.load_results(path)["utterances"] if u.get("wer") is not None}


def _seed_paired(root: str, studies: dict, base: dict, variant: str, n_resamples: int) -> str:
  """'diff, t-test p; utterances diff [lo, hi] p (seeds)' of two seed groups {seed: study} on `variant`'s WER."""
  from e2etts_jax.evaluation import stats
  if studies is base:
    return "-"
  seeds = sorted(s for s in set(studies) & set(base)
                 if studies[s]["variants"].get(variant, {}).get("wer") is not None
                 and base[s]["variants"].get(variant, {}).get("wer") is not None)
  if len(seeds) < 2:
    return "-"
  ua, ub, utt_seeds = [], [], 0
  for s in seeds:
    a, b = (_utterance_wers(root, g[s]["name"], variant) for g in (studies, base))
    paired = sorted(set(a) & set(b))
    utt_seeds += bool(paired)
    for utt in paired:
      ua.append(a[utt])
      ub.append(b[utt])
  c = stats.paired_over_seeds([studies[s]["variants"][variant]["wer"] for s in seeds],
                              [base[s]["variants"][variant]["wer"] for s in seeds], ua, ub, n_resamples=n_resamples)
  t = "-" if c["t_test_p"] is None else f"{c['t_test_p']:.3f}"
  utt = "" if c["utt_diff"] is None else (f"; sentences {c['utt_diff']:+.1f} [{c['utt_ci_low']:+.1f}, "
                                          f"{c['utt_ci_high']:+.1f}], p {c['utt_p']:.3f}")
  if utt and utt_seeds < len(seeds):   # a seed whose folder lacks per-sentence results: say the pool is smaller
    utt += f" over {utt_seeds} of them"
  return f"{c['mean_a'] - c['mean_b']:+.1f}, t-test p {t}{utt} ({len(seeds)} seeds)"


def collect_seeds(root: str, baseline: str | None = None, n_resamples: int = 1000) -> str:
  """A markdown table of the studies under `root` that repeat one recipe (config, recipe, step, split, sentence
  count) with two or more training seeds: each group's prior, resynthesis and tts WER (those run), mean ± std
  over seeds.

  With `baseline` (a study folder), each group is also paired with the baseline study's group on the seeds both
  ran: the difference of the seed means, a paired t-test over seeds, and a paired bootstrap over the sentences of
  those seeds pooled. '' when no recipe has two seeds. A seed diagnosed twice for one recipe counts once (the
  first study in name order).
  """
  groups: dict[tuple, dict] = {}
  base_key = None
  for name in _study_names(root, baseline):
    st = _study(root, name)
    key = _group_key(st["meta"])
    if name == baseline:
      base_key = key
    if st["train_seed"] is not None:
      groups.setdefault(key, {}).setdefault(int(st["train_seed"]), st)
  shown = [k for k in sorted(groups, key=str) if len(groups[k]) >= 2]
  if not shown:
    return ""
  # The variants some shown study ran (tts is newer than most studies).
  variants = [v for v in SEED_VARIANTS if any(v in st["variants"] for k in shown for st in groups[k].values())]

  def spread(group: dict, variant: str) -> str:
    wer = [st["variants"][variant]["wer"] for st in group.values()
           if st["variants"].get(variant, {}).get("wer") is not None]
    ratio = [st["variants"][variant]["wer_over_ceiling"] for st in group.values()
             if st["variants"].get(variant, {}).get("wer_over_ceiling") is not None]
    if not wer:
      return "-"
    cell = f"{np.mean(wer):.1f}" + (f" ± {np.std(wer, ddof=1):.1f}" if len(wer) > 1 else "")
    cell += f" ({np.mean(ratio):.2f})" if len(ratio) == len(wer) else ""
    # A variant that only some seeds ran (e.g. tts, newer than the rest) says over how many.
    return cell + (f", {len(wer)} of {len(group)} seeds" if len(wer) < len(group) else "")

  header = ("| config, recipe | step | split, sentences | seeds | "
            + " | ".join(f"{v} WER mean ± std (/ ceiling)" for v in variants) + " |")
  columns = 4 + len(variants)
  if base_key is not None:
    header += " " + " | ".join(f"{v} - {baseline}'s seeds" for v in variants) + " |"
    columns += len(variants)
  lines = [header, "|---" * columns + "|"]
  for key in shown:
    config, rec, step, split, items = key
    group = groups[key]
    line = (f"| {config}, {rec} | {step} | {split}, {items} | {', '.join(str(s) for s in sorted(group))} | "
            + " | ".join(spread(group, v) for v in variants) + " |")
    if base_key is not None:
      base = groups.get(base_key, {})
      line += " " + " | ".join(_seed_paired(root, group, base, v, n_resamples) for v in variants) + " |"
    lines.append(line)
  return "\n".join(lines) + "\n"
