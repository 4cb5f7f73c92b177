"""Evaluation outputs: `results.json` (summary + per-utterance scores), `details.csv`, `report.md` with plots.

`results.json` keeps a compact per-utterance list (utt, wer, sim, duration_ratio) so that two runs on the same
list can be compared later (`compare`) with paired tests, without re-scoring anything.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from e2etts_jax.evaluation import stats

RESULTS_JSON, DETAILS_CSV, REPORT_MD, PLOTS_DIR = "results.json", "details.csv", "report.md", "plots"

# Fixed leading columns of details.csv; `internal_*` and `extra_*` columns follow, sorted.
DETAIL_COLUMNS = (
    "utt", "status", "error", "wer", "substitutions", "deletions", "insertions", "hits", "ref_len",
    "target_text", "hypothesis", "ref_norm", "hyp_norm", "sim", "sim_error", "duration_s", "gt_duration_s",
    "duration_ratio", "synth_s", "rtf", "internal_error", "wav_path", "prompt_wav", "gt_wav",
)


def _finite(values) -> list[float]:
  return [float(v) for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]


def _ci(values, n_resamples: int, seed: int, scale: float = 1.0) -> dict | None:
  vals = _finite(values)
  if not vals:
    return None
  return stats.bootstrap_ci(np.asarray(vals) * scale, n_resamples=n_resamples, seed=seed)


def summarize(rows: Sequence[Mapping], *, n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
  """Aggregates per-utterance rows (see harness) into the summary of results.json.

  WER figures are percent: the mean of per-utterance WERs x 100 (the Seed-TTS-Eval figure) with its bootstrap
  CI; `corpus_wer` (pooled) is given for reference only.
  """
  ok = [r for r in rows if r["status"] == "ok"]
  failed = [r for r in rows if r["status"] != "ok"]
  summary: dict[str, Any] = {
      "counts": {"items": len(rows), "scored": len(ok), "failed": len(failed),
                 "sim_scored": sum(1 for r in ok if r.get("sim") is not None),
                 "sim_failed": sum(1 for r in ok if r.get("sim_error"))},
      "wer": _ci([r["wer"] for r in ok], n_resamples, seed, scale=100.0),
      "corpus_wer": None, "wer_components": None, "n_wer_above_50": None,
      "sim": _ci([r.get("sim") for r in ok], n_resamples, seed),
      "duration_ratio": _ci([r.get("duration_ratio") for r in ok], n_resamples, seed),
      "rtf": None, "internal": {},
  }
  if ok:
    words = sum(r["ref_len"] for r in ok)
    errors = sum(r["substitutions"] + r["deletions"] + r["insertions"] for r in ok)
    summary["corpus_wer"] = 100.0 * errors / words
    # As Seed-TTS-Eval's average_wer.py: mean over utterances of (count / reference length) x 100.
    summary["wer_components"] = {k: float(np.mean([r[k] / r["ref_len"] for r in ok]) * 100.0)
                                 for k in ("substitutions", "deletions", "insertions")}
    summary["n_wer_above_50"] = sum(1 for r in ok if r["wer"] > 0.5)
  timed = [r for r in ok if r.get("synth_s") is not None and r.get("duration_s")]
  if timed:
    summary["rtf"] = {"overall": sum(r["synth_s"] for r in timed) / sum(r["duration_s"] for r in timed),
                      "mean": float(np.mean([r["rtf"] for r in timed])), "n": len(timed)}
  internal_keys = sorted({k for r in ok for k in r if k.startswith("internal_") and k != "internal_error"})
  for k in internal_keys:
    ci = _ci([r.get(k) for r in ok], n_resamples, seed)
    if ci is not None:
      summary["internal"][k[len("internal_"):]] = ci
  return summary


def build_results(rows: Sequence[Mapping], meta: Mapping, *, n_resamples: int = stats.DEFAULT_RESAMPLES,
                  seed: int = 0) -> dict:
  """The content of results.json."""
  return {
      "summary": summarize(rows, n_resamples=n_resamples, seed=seed),
      "failures": [{"utt": r["utt"], "reason": r["error"]} for r in rows if r["status"] != "ok"],
      "meta": {**meta, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "n_resamples": n_resamples, "seed": seed},
      "utterances": [{"utt": r["utt"], "wer": r["wer"], "sim": r.get("sim"),
                      "duration_ratio": r.get("duration_ratio")} for r in rows if r["status"] == "ok"],
  }


def load_results(path_or_dict: str | Mapping) -> dict:
  """A results dict, or reads one from a results.json path (or the folder holding it)."""
  if isinstance(path_or_dict, Mapping):
    return dict(path_or_dict)
  path = path_or_dict
  if os.path.isdir(path):
    path = os.path.join(path, RESULTS_JSON)
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def ceiling_ratio(results: Mapping, ceiling: Mapping) -> float | None:
  """(system WER) / (ceiling WER): how far the system is from what the judge gives real speech."""
  sys_wer, ceil_wer = results["summary"].get("wer"), ceiling["summary"].get("wer")
  if not sys_wer or not ceil_wer or ceil_wer["mean"] == 0:
    return None
  return sys_wer["mean"] / ceil_wer["mean"]


def _paired(values_a, values_b, n_resamples: int, seed: int, scale: float) -> dict | None:
  pairs = [(a, b) for a, b in zip(values_a, values_b) if a is not None and b is not None]
  if not pairs:
    return None
  a = np.asarray([p[0] for p in pairs], np.float64) * scale
  b = np.asarray([p[1] for p in pairs], np.float64) * scale
  boot = stats.paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed)
  return {"a": float(a.mean()), "b": float(b.mean()), "diff": boot["diff"], "ci_low": boot["ci_low"],
          "ci_high": boot["ci_high"], "p_bootstrap": boot["p_value"], "sign_test": stats.sign_test(a, b),
          "n": len(pairs)}


def compare(results_a: str | Mapping, results_b: str | Mapping, *, n_resamples: int = stats.DEFAULT_RESAMPLES,
            seed: int = 0) -> dict:
  """Paired comparison of two runs on the utterances both scored (diff = a - b; WER in percent).

  Returns:
    dict(n_common, only_a, only_b, wer, sim): `wer`/`sim` hold a, b, diff, ci_low, ci_high, p_bootstrap,
    sign_test (or None when there is nothing to pair).
  """
  ra, rb = load_results(results_a), load_results(results_b)
  ua = {u["utt"]: u for u in ra["utterances"]}
  ub = {u["utt"]: u for u in rb["utterances"]}
  common = [u for u in ua if u in ub]
  out = {"n_common": len(common), "only_a": len(set(ua) - set(ub)), "only_b": len(set(ub) - set(ua)),
         "wer": None, "sim": None}
  if common:
    out["wer"] = _paired([ua[u]["wer"] for u in common], [ub[u]["wer"] for u in common], n_resamples, seed, 100.0)
    out["sim"] = _paired([ua[u].get("sim") for u in common], [ub[u].get("sim") for u in common], n_resamples,
                         seed, 1.0)
  return out


def _fmt(x, digits: int = 3) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


def _md(text) -> str:
  return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def compare_markdown(cmp: Mapping, name_a: str = "this run", name_b: str = "other") -> str:
  """A markdown section for a `compare` result."""
  lines = [f"## Comparison: {_md(name_a)} (a) vs {_md(name_b)} (b)", "",
           f"{cmp['n_common']} utterances scored by both ({cmp['only_a']} only in a, {cmp['only_b']} only in b).",
           "", "| metric | a | b | a - b | 95% CI of a - b | p (paired bootstrap) | sign test a>b / a<b / ties | "
           "p (sign) |", "|---|---|---|---|---|---|---|---|"]
  for key, label in (("wer", "WER %"), ("sim", "SIM")):
    c = cmp.get(key)
    if not c:
      continue
    st = c["sign_test"]
    lines.append(f"| {label} | {_fmt(c['a'])} | {_fmt(c['b'])} | {_fmt(c['diff'])} | "
                 f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] | {_fmt(c['p_bootstrap'], 4)} | "
                 f"{st['n_a_higher']} / {st['n_b_higher']} / {st['n_ties']} | {_fmt(st['p_value'], 4)} |")
  lines.append("")
  return "\n".join(lines)


def write_details(path: str, rows: Sequence[Mapping]) -> None:
  extra = sorted({k for r in rows for k in r if k not in DETAIL_COLUMNS})
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(DETAIL_COLUMNS) + extra, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in list(DETAIL_COLUMNS) + extra})


def _plot_wer_hist(path: str, rows: Sequence[Mapping]) -> None:
  # Figure, not pyplot: no global backend switch (that would break a notebook's inline plots).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  wers = [100.0 * r["wer"] for r in rows if r["status"] == "ok"]
  fig = Figure(figsize=(6, 3.5), layout='tight')
  ax = fig.subplots()
  top = max(100.0, max(wers, default=0.0))
  ax.hist(wers, bins=np.linspace(0.0, top, 21), color="#4472c4", edgecolor="white")
  if wers:
    ax.axvline(float(np.mean(wers)), color="#c00000", linestyle="--", label=f"mean {np.mean(wers):.2f}%")
    ax.legend()
  ax.set_xlabel("per-utterance WER (%)")
  ax.set_ylabel("utterances")
  ax.set_title(f"WER distribution (n={len(wers)})")
  fig.savefig(path, dpi=100)


def _plot_mels(path: str, row: Mapping, audio_cfg) -> None:
  # Figure, not pyplot: no global backend switch (that would break a notebook's inline plots).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  from e2etts_jax import audio  # pylint: disable=import-outside-toplevel
  panels = [("generated", row["wav_path"])]
  if row.get("gt_wav") and os.path.exists(row["gt_wav"]):
    panels.append(("ground truth", row["gt_wav"]))
  fig = Figure(figsize=(8, 2.4 * len(panels)), layout='tight')
  axes = fig.subplots(len(panels), 1, squeeze=False)
  for ax, (label, wav_path) in zip(axes[:, 0], panels):
    mel = audio.log_mel(audio.load_audio(wav_path, audio_cfg.sample_rate), audio_cfg)
    ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma")
    ax.set_title(f"{label}: {row['utt']}", fontsize=9)
    ax.set_ylabel("mel bin")
  axes[-1, 0].set_xlabel(f"frame ({audio_cfg.hop_length / audio_cfg.sample_rate * 1000:.0f} ms)")
  fig.suptitle(f"WER {100 * row['wer']:.1f}%  |  ref: {row['target_text'][:70]}\nhyp: {row['hypothesis'][:70]}",
               fontsize=8)
  fig.savefig(path, dpi=90)


def _mel_rows(rows: Sequence[Mapping], k: int) -> list[Mapping]:
  """Up to k scored rows spread over the WER range: the worst, the best and evenly spaced ones between."""
  ok = sorted((r for r in rows if r["status"] == "ok" and r.get("wav_path")), key=lambda r: (-r["wer"], r["utt"]))
  if k <= 0 or not ok:
    return []
  idx = sorted({int(round(i)) for i in np.linspace(0, len(ok) - 1, min(k, len(ok)))})
  return [ok[i] for i in idx]


def _safe_name(utt: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in utt)


def write_plots(out_dir: str, rows: Sequence[Mapping], *, num_mel_plots: int = 3, audio_cfg=None) -> dict:
  """Writes plots/wer_hist.png and a few plots/mel_<utt>.png; returns {name: path relative to out_dir}."""
  plot_dir = os.path.join(out_dir, PLOTS_DIR)
  os.makedirs(plot_dir, exist_ok=True)
  made = {}
  _plot_wer_hist(os.path.join(plot_dir, "wer_hist.png"), rows)
  made["wer_hist"] = os.path.join(PLOTS_DIR, "wer_hist.png")
  if audio_cfg is None:
    from e2etts_jax import config_lib  # pylint: disable=import-outside-toplevel
    audio_cfg = config_lib.base_config().audio
  for r in _mel_rows(rows, num_mel_plots):
    name = f"mel_{_safe_name(r['utt'])}.png"
    try:
      _plot_mels(os.path.join(plot_dir, name), r, audio_cfg)
      made[f"mel:{r['utt']}"] = os.path.join(PLOTS_DIR, name)
    except Exception as e:  # a plot must never sink the scores already computed
      made[f"mel:{r['utt']}"] = f"failed: {type(e).__name__}: {e}"
  return made


def _metric_line(label: str, ci: Mapping | None, digits: int = 3) -> str:
  if not ci:
    return f"| {label} | - | - | 0 |"
  interval = f"[{_fmt(ci['ci_low'], digits)}, {_fmt(ci['ci_high'], digits)}]"
  return f"| {label} | {_fmt(ci['mean'], digits)} | {interval} | {ci['n']} |"


def render_markdown(results: Mapping, rows: Sequence[Mapping], plots: Mapping[str, str],
                    compare_section: str = "") -> str:
  s, meta = results["summary"], results["meta"]
  lines = ["# Evaluation report", "",
           f"mode `{meta.get('mode')}`, language `{meta.get('lang')}`, ASR `{meta.get('asr')}`, speaker encoder "
           f"`{meta.get('speaker_encoder')}`, {meta.get('n_resamples')} bootstrap resamples (seed "
           f"{meta.get('seed')}), {meta.get('created')}.", "",
           "WER is the Seed-TTS-Eval figure: the mean of per-utterance WERs x 100. Scores from different ASR "
           "or speaker backends are not comparable with each other or with published numbers.", "",
           "| metric | mean | 95% CI | n |", "|---|---|---|---|",
           _metric_line("WER %", s["wer"], 2), _metric_line("SIM", s["sim"]),
           _metric_line("duration ratio (generated / ground truth)", s["duration_ratio"])]
  for name, ci in s["internal"].items():
    lines.append(_metric_line(f"internal: {_md(name)}", ci))
  lines += ["", "| figure | value |", "|---|---|",
            f"| corpus (pooled) WER % | {_fmt(s['corpus_wer'], 2)} |"]
  if s["wer_components"]:
    c = s["wer_components"]
    lines.append(f"| substitutions / deletions / insertions % | {_fmt(c['substitutions'], 2)} / "
                 f"{_fmt(c['deletions'], 2)} / {_fmt(c['insertions'], 2)} |")
  lines.append(f"| utterances with WER > 50% | {_fmt(s['n_wer_above_50'])} |")
  if s["rtf"]:
    lines.append(f"| RTF (total synthesis time / total audio) | {_fmt(s['rtf']['overall'], 4)} |")
  if results.get("wer_over_ceiling") is not None:
    lines.append(f"| WER / ceiling WER | {_fmt(results['wer_over_ceiling'], 3)} |")
  cnt = s["counts"]
  lines.append(f"| items / scored / failed | {cnt['items']} / {cnt['scored']} / {cnt['failed']} |")
  lines.append("")
  if results["failures"]:
    lines += ["## Failures", "", "| utt | reason |", "|---|---|"]
    lines += [f"| {_md(f['utt'])} | {_md(f['reason'])} |" for f in results["failures"]]
    lines.append("")
  ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (-r["wer"], r["utt"]))
  if ok:
    lines += ["## Highest-WER utterances", "", "| utt | WER % | reference | ASR hypothesis |", "|---|---|---|---|"]
    lines += [f"| {_md(r['utt'])} | {100 * r['wer']:.1f} | {_md(r['target_text'])} | {_md(r['hypothesis'])} |"
              for r in ok[:10]]
    lines.append("")
  lines += ["## Plots", ""]
  for name, rel in plots.items():
    if rel.startswith("failed:"):
      lines.append(f"- {_md(name)}: {_md(rel)}")
    else:
      lines.append(f"![{_md(name)}]({rel})")
  lines.append("")
  if compare_section:
    lines += [compare_section, ""]
  return "\n".join(lines)


def write_all(out_dir: str, results: Mapping, rows: Sequence[Mapping], *, num_mel_plots: int = 3,
              audio_cfg=None, compare_section: str = "") -> dict:
  """Writes results.json, details.csv, plots/ and report.md into out_dir; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, v) for k, v in
           (("results", RESULTS_JSON), ("details", DETAILS_CSV), ("report", REPORT_MD))}
  with open(paths["results"], "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, ensure_ascii=False)
  write_details(paths["details"], rows)
  plots = write_plots(out_dir, rows, num_mel_plots=num_mel_plots, audio_cfg=audio_cfg)
  with open(paths["report"], "w", encoding="utf-8") as f:
    f.write(render_markdown(results, rows, plots, compare_section))
  paths["plots"] = {k: os.path.join(out_dir, v) for k, v in plots.items() if not v.startswith("failed:")}
  return paths
