"""Word/character error rate with the Seed-TTS-Eval text rules.

The reference script (`run_wer.py` of Seed-TTS-Eval) scores each utterance on its own:
  1. delete every ASCII punctuation mark and every Chinese punctuation mark (the `zhon.hanzi.punctuation` set)
     except the ASCII apostrophe, so "don't" stays one word;
  2. replace double spaces by single ones ONCE (`str.replace('  ', ' ')`, so three spaces become two; jiwer's
     own whitespace handling then absorbs the rest, but we keep the single pass to match the script exactly);
  3. English: lowercase; Chinese: put a space between every character, so the "WER" is a CER;
  4. WER with jiwer's default word transform.
The published figure is the MEAN of these per-utterance WERs x 100, not the corpus WER (pooled errors over
pooled reference words): a short utterance with one error weighs as much as a long one.
"""
from __future__ import annotations

import string
from typing import Mapping, Sequence

import jiwer
import numpy as np

LANGS = ("en", "zh")

# `zhon.hanzi.punctuation` (non-stops followed by stops), spelled out so scoring needs no extra package.
CJK_PUNCTUATION = (
    # Fullwidth ASCII variants
    "\uff02\uff03\uff04\uff05\uff06\uff07\uff08\uff09\uff0a\uff0b\uff0c\uff0d"
    "\uff0f\uff1a\uff1b\uff1c\uff1d\uff1e\uff20\uff3b\uff3c\uff3d\uff3e\uff3f"
    "\uff40\uff5b\uff5c\uff5d\uff5e\uff5f\uff60"
    # Halfwidth CJK punctuation
    "\uff62\uff63\uff64"
    # CJK symbols and punctuation (\u3000 is the ideographic space: deleted, not turned into a space)
    "\u3000\u3001\u3003"
    # CJK angle and corner brackets
    "\u3008\u3009\u300a\u300b\u300c\u300d\u300e\u300f\u3010\u3011"
    # CJK brackets and symbols/punctuation
    "\u3014\u3015\u3016\u3017\u3018\u3019\u301a\u301b\u301c\u301d\u301e\u301f"
    # Other CJK symbols, special CJK indicators
    "\u3030\u303e\u303f"
    # Dashes
    "\u2013\u2014"
    # Curly quotes: the typographic apostrophe (\u2019) IS deleted; only the ASCII one survives
    "\u2018\u2019\u201b\u201c\u201d\u201e\u201f"
    # General punctuation, overscores/underscores, small form variants, middle dot
    "\u2026\u2027\ufe4f\ufe51\ufe54\u00b7"
    # Stops
    "\uff01\uff1f\uff61\u3002"
)
PUNCTUATION = CJK_PUNCTUATION + string.punctuation
_DELETE = str.maketrans("", "", PUNCTUATION.replace("'", ""))


def normalize(text: str, lang: str) -> str:
  """Applies the Seed-TTS-Eval rules to one transcript; the result is what jiwer sees.

  Args:
    text: a raw reference or ASR hypothesis.
    lang: 'en' (lowercase, words) or 'zh' (characters separated by spaces).
  """
  if lang not in LANGS:
    raise ValueError(f"unsupported language {lang!r}; choose one of {', '.join(LANGS)}")
  text = text.translate(_DELETE)
  text = text.replace("  ", " ")
  if lang == "zh":
    return " ".join(text)
  return text.lower()


def utterance_wer(ref: str, hyp: str, lang: str) -> dict:
  """WER of one utterance under the Seed-TTS-Eval rules.

  Returns:
    dict(wer, substitutions, deletions, insertions, hits, ref_len): `wer` is a fraction (not x100) and may
    exceed 1 with insertions; `ref_len` counts reference words (characters for zh) after normalisation.
  Raises:
    ValueError: the reference is empty after normalisation (a WER would be meaningless).
  """
  ref_n, hyp_n = normalize(ref, lang), normalize(hyp, lang)
  if not ref_n.split():
    raise ValueError(f"reference text is empty after normalisation: {ref!r}")
  out = jiwer.process_words(ref_n, hyp_n)
  ref_len = out.hits + out.substitutions + out.deletions
  return {
      "wer": float(out.wer),
      "substitutions": int(out.substitutions),
      "deletions": int(out.deletions),
      "insertions": int(out.insertions),
      "hits": int(out.hits),
      "ref_len": int(ref_len),
  }


def _wer_value(x: float | Mapping) -> float:
  return float(x["wer"]) if isinstance(x, Mapping) else float(x)


def mean_wer(per_utterance: Sequence[float | Mapping]) -> float:
  """The reported figure: mean of per-utterance WER fractions x 100 (percent).

  Args:
    per_utterance: `utterance_wer` dicts or plain WER fractions.
  """
  if len(per_utterance) == 0:
    raise ValueError("mean_wer of an empty list")
  return float(np.mean([_wer_value(x) for x in per_utterance]) * 100.0)


def corpus_wer(per_utterance: Sequence[Mapping]) -> float:
  """Pooled WER x 100 (all errors over all reference words); reported beside the mean, never instead."""
  if len(per_utterance) == 0:
    raise ValueError("corpus_wer of an empty list")
  errors = sum(d["substitutions"] + d["deletions"] + d["insertions"] for d in per_utterance)
  words = sum(d["ref_len"] for d in per_utterance)
  return 100.0 * errors / words
