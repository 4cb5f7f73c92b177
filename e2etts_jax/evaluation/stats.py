"""Uncertainty for evaluation figures: bootstrap CIs of a mean, and paired tests for two systems.

Test sets are small (hundreds to a few thousand utterances) and per-utterance WERs are heavy-tailed (mostly 0,
a few near 1), so a 0.2-point WER difference is often noise; every reported mean carries a 95% percentile
bootstrap interval, and comparisons on the same utterances use a paired bootstrap and an exact sign test.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000


def _as_array(values: Sequence[float], what: str = "values") -> np.ndarray:
  x = np.asarray(values, np.float64).ravel()
  if x.size == 0:
    raise ValueError(f"{what}: need at least one value")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: NaN or Inf present")
  return x


def _resample_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
  """[n_resamples] means of samples drawn with replacement (n = len(x))."""
  rng = np.random.default_rng(seed)
  # Chunked so memory stays at ~8 MB whatever the test-set size.
  out, chunk = np.empty(n_resamples), max(1, 1_000_000 // x.size)
  for start in range(0, n_resamples, chunk):
    stop = min(n_resamples, start + chunk)
    out[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
  return out


def bootstrap_ci(values: Sequence[float], *, n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                 seed: int = 0) -> dict:
  """Percentile bootstrap interval of the mean.

  Returns:
    dict(mean, ci_low, ci_high, n, confidence); one value gives a zero-width interval.
  """
  x = _as_array(values)
  means = _resample_means(x, n_resamples, seed)
  alpha = (1.0 - confidence) / 2.0
  lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
  mean = float(x.mean())
  # Quantiles of the resampled means can miss the sample mean by float rounding when all values are equal.
  return {"mean": mean, "ci_low": float(min(lo, mean)), "ci_high": float(max(hi, mean)), "n": int(x.size),
          "confidence": confidence}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_resamples: int = DEFAULT_RESAMPLES,
                     confidence: float = 0.95, seed: int = 0) -> dict:
  """Bootstrap of the mean paired difference a - b (same utterances, same order).

  Returns:
    dict(diff, ci_low, ci_high, p_value, n): p_value is two-sided, 2 * min(P(d* <= 0), P(d* >= 0)) over the
    resampled mean differences d*, capped at 1; identical systems give diff 0 and p 1.
  """
  xa, xb = _as_array(a, "a"), _as_array(b, "b")
  if xa.shape != xb.shape:
    raise ValueError(f"paired test needs equal lengths, got {xa.size} and {xb.size}")
  d = xa - xb
  means = _resample_means(d, n_resamples, seed)
  alpha = (1.0 - confidence) / 2.0
  lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
  p = min(1.0, 2.0 * min(np.mean(means <= 0.0), np.mean(means >= 0.0)))
  diff = float(d.mean())
  return {"diff": diff, "ci_low": float(min(lo, diff)), "ci_high": float(max(hi, diff)), "p_value": float(p),
          "n": int(d.size), "confidence": confidence}


def binomial_two_sided_p(k: int, n: int) -> float:
  """Exact two-sided p of k successes in n fair coin flips: 2 * P(X <= min(k, n - k)), capped at 1."""
  if n == 0:
    return 1.0
  m = min(k, n - k)
  tail = sum(math.comb(n, i) for i in range(m + 1)) / 2.0 ** n
  return min(1.0, 2.0 * tail)


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict:
  """Exact sign test on paired values: ties are dropped, the rest are fair coin flips under H0.

  Returns:
    dict(n_a_higher, n_b_higher, n_ties, p_value).
  """
  xa, xb = _as_array(a, "a"), _as_array(b, "b")
  if xa.shape != xb.shape:
    raise ValueError(f"paired test needs equal lengths, got {xa.size} and {xb.size}")
  pos, neg = int(np.sum(xa > xb)), int(np.sum(xa < xb))
  return {"n_a_higher": pos, "n_b_higher": neg, "n_ties": int(xa.size - pos - neg),
          "p_value": binomial_two_sided_p(pos, pos + neg)}


def paired_over_seeds(seed_a: Sequence[float], seed_b: Sequence[float], utt_a: Sequence[float] = (),
                      utt_b: Sequence[float] = (), *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
  """Two systems trained with the same seeds: a paired t-test over the seeds' figures, and a paired bootstrap
  over the utterances of all those seeds pooled (what varies: the training run, then the sentence).

  Args:
    seed_a, seed_b: one figure per training seed (e.g. mean WER %), in the same seed order.
    utt_a, utt_b: per-utterance figures of every paired seed, pooled in the same order (may be empty).

  Returns:
    dict(n_seeds, mean_a, std_a, mean_b, std_b, t_test_p, n_utterances, utt_diff, utt_ci_low, utt_ci_high,
    utt_p): std is over seeds (ddof 1; 0 for one seed); t_test_p is None below two seeds or when a and b agree
    on every seed; the utt_* are None without utterances.
  """
  from scipy import stats as sstats   # only for the t distribution; scipy comes with librosa
  xa, xb = _as_array(seed_a, "seed_a"), _as_array(seed_b, "seed_b")
  if xa.shape != xb.shape:
    raise ValueError(f"paired test needs the same seeds, got {xa.size} and {xb.size} figures")
  std = lambda x: float(x.std(ddof=1)) if x.size > 1 else 0.0
  t_p = float(sstats.ttest_rel(xa, xb).pvalue) if xa.size >= 2 and np.any(xa != xb) else None
  boot = paired_bootstrap(utt_a, utt_b, n_resamples=n_resamples, seed=seed) if len(utt_a) else None
  return {"n_seeds": int(xa.size), "mean_a": float(xa.mean()), "std_a": std(xa), "mean_b": float(xb.mean()),
          "std_b": std(xb), "t_test_p": t_p, "n_utterances": 0 if boot is None else boot["n"],
          "utt_diff": None if boot is None else boot["diff"],
          "utt_ci_low": None if boot is None else boot["ci_low"],
          "utt_ci_high": None if boot is None else boot["ci_high"],
          "utt_p": None if boot is None else boot["p_value"]}
