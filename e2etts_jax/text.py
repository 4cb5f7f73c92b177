"""English text normalisation, the LLM's text front end and sentencepiece model, and CTC units for the RM's ASR head.

Normalised text contains only the 28 CTC characters " 'abcdefghijklmnopqrstuvwxyz": lowercase letters, the
apostrophe inside words ("don't") and single spaces. Numbers, currency, percentages, ordinals and common
abbreviations are spelt out; accents are stripped; other punctuation becomes a word break. The same function
runs at data preparation and at synthesis, so training and inference see identical text.

The LLM reads sentencepiece pieces of one of two front ends (`text.frontend`): 'text', the normalised text
itself, or 'phones', the CMU phone sequence that flite's letter-to-sound rules give the raw sentence (stress marked
on vowels, 'pau' at phrase breaks; `to_phones`). Phones spell each sound the same way every time, so a small corpus
teaches the LLM their acoustics from many more examples per unit than of its word pieces.

Sentencepiece ids: 0 = padding (never produced by `encode`), 1 = unknown; no bos/eos (the LLM adds its own
special tokens beyond the text vocabulary). CTC ids: 0 = blank; 'char' units are the 28 characters as 1..28;
'sentencepiece' units are the sentencepiece ids + 1.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from typing import Iterable, Sequence

import sentencepiece as spm

CTC_CHARS = " 'abcdefghijklmnopqrstuvwxyz"
_CHAR_TO_ID = {c: i + 1 for i, c in enumerate(CTC_CHARS)}
PAD_ID = 0
UNK_ID = 1

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                      "nine": "ninth", "twelve": "twelfth"}

# Abbreviations that are always followed by a period in running English text; expanded before the period is
# treated as a word break. Matched case-insensitively on whole words.
_ABBREVIATIONS = {
    "mr": "mister", "mrs": "misses", "ms": "miss", "dr": "doctor", "st": "saint", "co": "company",
    "jr": "junior", "sr": "senior", "maj": "major", "gen": "general", "drs": "doctors", "rev": "reverend",
    "lt": "lieutenant", "hon": "honorable", "sgt": "sergeant", "capt": "captain", "esq": "esquire",
    "ltd": "limited", "col": "colonel", "ft": "fort", "vs": "versus", "etc": "et cetera",
}
_ABBREV_RE = re.compile(r"\b(" + "|".join(_ABBREVIATIONS) + r")\.", re.IGNORECASE)
_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "=": " equals ", "@": " at ", "#": " number "}
_CURRENCY_RE = re.compile(r"([$£€])\s?(\d[\d,]*(?:\.\d+)?)")
_CURRENCY_NAMES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
                   "€": ("euro", "euros", "cent", "cents")}
_ORDINAL_RE = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_DECIMAL_RE = re.compile(r"\b(\d+)\.(\d+)\b")
_NUMBER_RE = re.compile(r"\d+")
_COMMA_NUMBER_RE = re.compile(r"\b(\d{1,3}(?:,\d{3})+)\b")


def _below_thousand(n: int) -> list[str]:
  words = []
  if n >= 100:
    words += [_ONES[n // 100], "hundred"]
    n %= 100
  if n >= 20:
    words.append(_TENS[n // 10])
    n %= 10
    if n:
      words.append(_ONES[n])
  elif n or not words:
    words.append(_ONES[n])
  return words


def number_to_words(n: int) -> str:
  """Cardinal English words for a non-negative integer: 1203 -> 'one thousand two hundred three'."""
  if n < 1000:
    return " ".join(_below_thousand(n))
  words = []
  for scale, name in _SCALES:
    if n >= scale:
      head, n = divmod(n, scale)
      words += [number_to_words(head), name]
  if n:
    words += _below_thousand(n)
  return " ".join(words)


def _year_or_number(digits: str) -> str:
  n = int(digits)
  # Four-digit numbers in 1100..1999 and 2010..2099 are overwhelmingly years in read speech; say them in pairs.
  if len(digits) == 4 and (1100 <= n <= 1999 or 2010 <= n <= 2099) and n % 100:
    hi, lo = divmod(n, 100)
    lo_words = number_to_words(lo) if lo >= 10 else "oh " + number_to_words(lo)
    return f"{number_to_words(hi)} {lo_words}"
  if len(digits) > 1 and digits.startswith("0"):
    # Leading zeros (codes, phone numbers): read digit by digit.
    return " ".join(_ONES[int(d)] for d in digits)
  return number_to_words(n)


def _ordinal(n: int) -> str:
  words = number_to_words(n).split()
  last = words[-1]
  if last in _ORDINAL_IRREGULAR:
    words[-1] = _ORDINAL_IRREGULAR[last]
  elif last.endswith("y"):
    words[-1] = last[:-1] + "ieth"
  else:
    words[-1] = last + "th"
  return " ".join(words)


def _currency(match: re.Match) -> str:
  one, many, sub_one, sub_many = _CURRENCY_NAMES[match.group(1)]
  amount = match.group(2).replace(",", "")
  whole, _, frac = amount.partition(".")
  whole_n = int(whole) if whole else 0
  parts = [f"{number_to_words(whole_n)} {one if whole_n == 1 else many}"]
  if frac:
    cents = int((frac + "0")[:2])
    if cents:
      parts.append(f"{number_to_words(cents)} {sub_one if cents == 1 else sub_many}")
  return " " + " and ".join(parts) + " "


def normalize_text(text: str) -> str:
  """Normalises English text to the CTC alphabet.

  'Dr. Smith paid $3.50 for 2 apples & the 1st pear!' ->
  "doctor smith paid three dollars and fifty cents for two apples and the first pear".
  Returns '' when nothing speakable is left.
  """
  text = unicodedata.normalize("NFKC", text)
  # Typographic apostrophes/quotes to ASCII before stripping accents, so "don’t" keeps its apostrophe.
  text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u02bc", "'")
  text = _ABBREV_RE.sub(lambda m: " " + _ABBREVIATIONS[m.group(1).lower()] + " ", text)
  text = _CURRENCY_RE.sub(_currency, text)
  # Digit-grouped numbers ("1,250") are quantities, never years: spell them out before the year rule sees them.
  text = _COMMA_NUMBER_RE.sub(lambda m: " " + number_to_words(int(m.group(1).replace(",", ""))) + " ", text)
  text = _ORDINAL_RE.sub(lambda m: " " + _ordinal(int(m.group(1))) + " ", text)
  text = _DECIMAL_RE.sub(lambda m: " " + number_to_words(int(m.group(1))) + " point "
                         + " ".join(_ONES[int(d)] for d in m.group(2)) + " ", text)
  text = _NUMBER_RE.sub(lambda m: " " + _year_or_number(m.group(0)) + " ", text)
  for sym, word in _SYMBOLS.items():
    text = text.replace(sym, word)
  # Strip accents: decompose, then drop combining marks ("café" -> "cafe").
  text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
  text = text.lower()
  text = re.sub(r"[^a-z' ]+", " ", text)
  # Apostrophes only survive between letters ("don't", "o'clock"); quote marks and "dogs'" lose them.
  text = re.sub(r"(?<![a-z])'+|'+(?![a-z])", " ", text)
  return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------- front end

FRONTENDS = ("text", "phones")


class FrontendError(RuntimeError):
  """The text front end cannot turn a sentence into the LLM's text (a missing program, a failed run)."""


@functools.lru_cache(maxsize=1)
def _t2p() -> str:
  exe = shutil.which("t2p")
  if exe is None:
    raise FrontendError("text.frontend='phones' needs flite's letter-to-sound program 't2p', which is not on PATH "
                        "(Debian/Ubuntu: apt-get install flite)")
  return exe


def to_phones(raw: str) -> str:
  """CMU phones of an English sentence, space-separated, by flite's `t2p` (its own text normalisation and lexicon).

  'Dr. Smith, 2 apples' -> 'd aa1 k t er s m ih1 th pau t uw1 ae1 p ax l z': vowels carry their stress digit,
  reduced vowels none; 'pau' marks a phrase break (punctuation), and the breaks flite puts at both ends are
  dropped since every sentence has them. Raises FrontendError when t2p is missing or fails.
  """
  try:
    # A leading space keeps a sentence that starts with '-' from being read as an option.
    out = subprocess.run([_t2p(), " " + raw], capture_output=True, text=True, timeout=60, check=True).stdout
  except (subprocess.SubprocessError, OSError) as e:
    raise FrontendError(f"t2p failed on {raw[:80]!r}: {type(e).__name__}: {e}") from e
  phones = out.split()
  while phones and phones[0] == "pau":
    phones.pop(0)
  while phones and phones[-1] == "pau":
    phones.pop()
  return " ".join(phones)


def check_frontend(frontend: str) -> None:
  """Raises ValueError for an unknown front end and FrontendError when the program it runs is missing: a check to
  make once, before a run turns many sentences."""
  if frontend not in FRONTENDS:
    raise ValueError(f"text.frontend={frontend!r}: choose one of {FRONTENDS}")
  if frontend == "phones":
    _t2p()


def llm_text(raw: str, norm: str, frontend: str) -> str:
  """What the LLM's sentencepiece model reads for one sentence: `norm` (its `normalize_text`) for 'text', the
  phones of `raw` for 'phones'. The same call runs at data preparation and at synthesis."""
  if frontend == "text":
    return norm
  if frontend == "phones":
    return to_phones(raw)
  raise ValueError(f"text.frontend={frontend!r}: choose one of {FRONTENDS}")


# ------------------------------------------------------------------------------------------- sentencepiece


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int,
                        model_type: str = "unigram") -> spm.SentencePieceProcessor:
  """Trains a sentencepiece model on (normalised) `texts`; writes `{model_prefix}.model` and `.vocab`.

  The vocabulary is a soft limit: on a small corpus sentencepiece may stop below `vocab_size` (never above),
  so read the real size from `sp.vocab_size()`. Ids: 0 = pad, 1 = unk, no bos/eos.
  """
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("train_sentencepiece: no non-empty training text")
  # Sentencepiece reads training text from a file most robustly (the iterator API drops very short corpora).
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
    f.write("\n".join(texts) + "\n")
    corpus = f.name
  try:
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=-1,
        hard_vocab_limit=False, num_threads=max(1, min(4, os.cpu_count() or 1)),
        input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2)
  finally:
    os.unlink(corpus)
  return load_sentencepiece(model_prefix + ".model")


def load_sentencepiece(path: str) -> spm.SentencePieceProcessor:
  if not os.path.exists(path):
    raise FileNotFoundError(f"sentencepiece model not found: {path}")
  return spm.SentencePieceProcessor(model_file=path)


def encode_text(text: str, sp: spm.SentencePieceProcessor) -> list[int]:
  """Sentencepiece ids of already-normalised text (no bos/eos)."""
  return list(sp.encode(text, out_type=int))


# ----------------------------------------------------------------------------------------------------- CTC


def ctc_vocab_size(config, sp: spm.SentencePieceProcessor | None = None) -> int:
  """Number of CTC classes including the blank (id 0).

  For 'sentencepiece' units this is `sp.vocab_size() + 1` when `sp` is given, else `config.text.vocab_size + 1`
  (the upper bound; a small corpus can give a smaller sentencepiece vocabulary).
  """
  units = config.text.ctc_units
  if units == "char":
    return len(CTC_CHARS) + 1
  if units == "sentencepiece":
    return (sp.vocab_size() if sp is not None else config.text.vocab_size) + 1
  raise ValueError(f"text.ctc_units={units!r}: choose 'char' or 'sentencepiece'")


def text_to_ctc(text: str, config, sp: spm.SentencePieceProcessor | None = None) -> list[int]:
  """CTC label ids (no blanks) of normalised text; characters outside the alphabet are dropped."""
  units = config.text.ctc_units
  if units == "char":
    return [_CHAR_TO_ID[c] for c in text if c in _CHAR_TO_ID]
  if units == "sentencepiece":
    if sp is None:
      raise ValueError("text_to_ctc: text.ctc_units='sentencepiece' needs the sentencepiece model `sp`")
    return [i + 1 for i in encode_text(text, sp)]
  raise ValueError(f"text.ctc_units={units!r}: choose 'char' or 'sentencepiece'")


def ctc_separator(config) -> tuple[int, ...]:
  """CTC labels between two joined sentences (`data.join_prob`): the space for 'char' units, none for
  'sentencepiece' (its pieces carry their own word starts)."""
  units = config.text.ctc_units
  if units == "char":
    return (_CHAR_TO_ID[" "],)
  if units == "sentencepiece":
    return ()
  raise ValueError(f"text.ctc_units={units!r}: choose 'char' or 'sentencepiece'")


def ctc_to_text(ids: Sequence[int], config, sp: spm.SentencePieceProcessor | None = None) -> str:
  """Inverse of `text_to_ctc` for label ids (blanks and padding, id 0, are skipped; no collapsing)."""
  ids = [int(i) for i in ids if int(i) > 0]
  units = config.text.ctc_units
  if units == "char":
    return "".join(CTC_CHARS[i - 1] for i in ids if i <= len(CTC_CHARS))
  if units == "sentencepiece":
    if sp is None:
      raise ValueError("ctc_to_text: text.ctc_units='sentencepiece' needs the sentencepiece model `sp`")
    return sp.decode([i - 1 for i in ids])
  raise ValueError(f"text.ctc_units={units!r}: choose 'char' or 'sentencepiece'")


def ctc_collapse(frame_ids: Sequence[int]) -> list[int]:
  """Greedy CTC decoding of per-frame argmax ids: merge repeats, then drop blanks: [frames] -> labels."""
  out, prev = [], None
  for i in frame_ids:
    i = int(i)
    if i != prev and i != 0:
      out.append(i)
    prev = i
  return out
