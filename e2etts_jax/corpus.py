"""The embedded synthetic-speech corpus: real English sentences read by the speech synthesizers Debian ships.

Each synthesizer voice is one speaker. Every utterance gets its own speaking rate and pitch drawn from one of three
bands (slow/normal/fast, low/mid/high) so that the rate and pitch classes can serve as recognition labels.

Speakers:
  * flite_awb, flite_rms, flite_slt, flite_kal16 (Debian `flite`, 16 kHz): the primary speakers. An outside ASR
    understands them well, so they are the only speakers of the test split.
  * mbrola_us1, mbrola_us2, mbrola_us3, mbrola_en1 (espeak-ng driving mbrola; Debian contrib `mbrola`,
    `mbrola-us1`, ...): extra training speakers, used by default where installed and skipped otherwise.
  * espeak_en-us, espeak_en-gb-x-rp (espeak-ng's formant voices): extra training speakers, off by default (an ASR
    barely understands them); ask for them with voices=['default', 'espeak'] or voices=['all'].

Text: sentences cut from Debian's `fortunes` package (/usr/share/games/fortunes), filtered to clean single
sentences (see `is_clean_sentence`), deduplicated and sorted; a seed picks them deterministically.

Values recorded per utterance (voice-independent, 1.0 = the voice's own default):
  rate:  speaking-rate factor, > 1 is faster. flite gets duration_stretch = 1 / rate; espeak-ng gets
         -s round(175 * rate) words per minute (175 is its default) and records the rounded value.
  pitch: mean-F0 factor. flite gets f0_shift = pitch (it scales the voice's mean F0; unlike int_f0_target_mean it
         is relative, so one band fits male and female voices); flite_rms ignores every F0 feature, so its
         output is shifted with `sox pitch` instead; espeak-ng gets -p round(50 + 72 * log2(pitch)) (measured:
         -p moves F0 by about one octave per 72 steps around the default 50) and records the value that implies.

Output layout (all audio 16 kHz mono PCM16):
  DIR/wavs/<id>.wav
  DIR/manifest.jsonl   one JSON object per line, sorted by id, keys sorted: id, audio (relative to DIR), text,
                       speaker, rate, rate_class, pitch, pitch_class, duration, sample_rate, split.
  DIR/failures.jsonl   only when some utterances failed: {"id", "speaker", "text", "error"} per line.

Utterance ids hash the synthesis request, so a cached wav is reused only for exactly the same request; wavs are
written to a temporary name and renamed, so an interrupted run never leaves a partial wav that looks finished.

Debian packages needed: flite, espeak-ng, sox, fortunes (pulls in fortunes-min).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from typing import Iterable, Sequence

from absl import logging
import numpy as np
import soundfile as sf
import tqdm

from e2etts_jax import audio

SAMPLE_RATE = 16000
FORTUNE_DIR = "/usr/share/games/fortunes"
MANIFEST_NAME = "manifest.jsonl"
FAILURES_NAME = "failures.jsonl"
WAV_DIR = "wavs"
MANIFEST_KEYS = ("audio", "duration", "id", "pitch", "pitch_class", "rate", "rate_class", "sample_rate",
                 "speaker", "split", "text")

# Fortune sets read for sentences. Left out: ascii-art (drawings), ethnic, men-women and drugs (jokes that are
# unkind or off-topic for a speech corpus), translate-me (not English), and debian, linux, linuxcookie, perl and
# knghtbrd (IRC logs and command-line jargon that an ASR cannot be expected to spell). The offensive sets live in
# the separate fortunes-off package, which is never read. The list is fixed so that the sentence pool, and with it
# the corpus for a seed, does not depend on which other fortune packages happen to be installed.
FORTUNE_SETS = (
    "art", "computers", "cookie", "definitions", "disclaimer", "education", "food", "fortunes", "goedel",
    "humorists", "kids", "law", "literature", "love", "magic", "medicine", "miscellaneous", "news", "paradoxum",
    "people", "pets", "platitudes", "politics", "pratchett", "riddles", "science", "songs-poems", "sports",
    "startrek", "tao", "wisdom", "work", "zippy",
)
MIN_WORDS = 4
MAX_WORDS = 20

# Words that drop a sentence: profanity, sexual content and slurs have no place in a corpus that is read aloud
# in demos, and dropping a few hundred sentences out of ten thousand costs nothing.
_BLOCKED_WORDS = frozenset("""
    arse ass asses asshole bastard bastards bitch bitches bloody crap damn damned dammit fuck fucked fucking
    goddamn hell piss pissed shit shitty slut sluts whore whores
    sex sexes sexual sexually sexy nude naked penis vagina breast breasts orgasm orgy erection condom condoms
    virgin virginity porn pornography prostitute prostitutes masturbation intercourse horny lust kinky
    rape raped rapist incest
    gay gays lesbian lesbians homosexual homosexuals queer fag faggot nigger negro negroes jew jews jewish
    nazi nazis
    suicide drug drugs cocaine heroin marijuana
""".split())

# A sentence: a capital letter, then letters, apostrophes, spaces, commas, semicolons and hyphens, then a letter and
# exactly one final . ? or !. No digits, quotes, colons, brackets or inner sentence ends.
_SENTENCE_RE = re.compile(r"^[A-Z][A-Za-z' ,;-]*[A-Za-z][.!?]$")
# Abbreviations and initials end in a period that is not a sentence end: a fortune holding any is skipped whole,
# since a split there would cut it into fragments that look like sentences.
_ABBREVIATION_RE = re.compile(
    r"\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|vs|etc|Inc|Ltd|Co|Mt|Gen|Col|Capt|Lt|Rev|Gov|Sen|Rep|No|Ft|Ave|Hon|"
    r"Messrs|Esq|Bros|Corp|Dept|Sgt|Cpl|Adm|Cmdr|Pres|approx|ca|cf|ibid|viz)\.|\b[A-Za-z]\.(?=\s|[A-Za-z]\.|$)")
# A capitalized function word inside a sentence marks joined lines of verse ("..., the Teacher, Were each of them").
_FUNCTION_WORDS = frozenset("""
    a an the and but or nor for so yet of in on at to by with from into upon as than that which who whom whose
    what when where while if then is are was were be been am do does did has have had will would shall should
    can could may might must not no all each every his her its their our your my this these those there here
""".split())
_ATTRIBUTION_RE = re.compile(r"^\s*--")
_SPLIT_RE = re.compile(r"(?<=[.!?])\s+")

RATE_CLASSES = ("slow", "normal", "fast")
PITCH_CLASSES = ("low", "mid", "high")
# Factor bands per class with gaps between them, so a label never sits on a class border; the extremes stay
# within what a human speaker does (about +-30% rate, +-3.5 semitones of pitch).
RATE_BANDS = ((0.74, 0.86), (0.93, 1.07), (1.16, 1.34))
PITCH_BANDS = ((0.80, 0.89), (0.95, 1.05), (1.12, 1.25))
ESPEAK_DEFAULT_WPM = 175
ESPEAK_PITCH_STEPS_PER_OCTAVE = 72.0

SYNTH_TIMEOUT_S = 120


class CorpusError(RuntimeError):
  """The corpus cannot be built as asked; the message names the voice, binary, package or file at fault."""


@dataclasses.dataclass(frozen=True)
class Voice:
  """One synthesizer voice, i.e. one speaker of the corpus.

  name: the speaker id written to the manifest, e.g. 'flite_awb'.
  engine: the synthesizer binary, 'flite' or 'espeak-ng'.
  engine_voice: the engine's own name of the voice ('awb', 'mb-us1', 'en-us').
  family: 'flite', 'mbrola' or 'espeak' (the group name accepted by `resolve_voices`).
  primary: may appear in the test split (an outside ASR understands it).
  pitch_by_sox: the engine ignores pitch settings, so pitch is shifted afterwards with sox.
  package: the Debian package that provides the voice, for error messages.
  """
  name: str
  engine: str
  engine_voice: str
  family: str
  primary: bool
  pitch_by_sox: bool = False
  package: str = ""


KNOWN_VOICES = (
    Voice("flite_awb", "flite", "awb", "flite", True, package="flite"),
    # rms ignores int_f0_target_mean and f0_shift (checked against pYIN: F0 stays put), hence sox.
    Voice("flite_rms", "flite", "rms", "flite", True, pitch_by_sox=True, package="flite"),
    Voice("flite_slt", "flite", "slt", "flite", True, package="flite"),
    Voice("flite_kal16", "flite", "kal16", "flite", True, package="flite"),
    Voice("mbrola_us1", "espeak-ng", "mb-us1", "mbrola", False, package="mbrola-us1 (contrib)"),
    Voice("mbrola_us2", "espeak-ng", "mb-us2", "mbrola", False, package="mbrola-us2 (contrib)"),
    Voice("mbrola_us3", "espeak-ng", "mb-us3", "mbrola", False, package="mbrola-us3 (contrib)"),
    Voice("mbrola_en1", "espeak-ng", "mb-en1", "mbrola", False, package="mbrola-en1 (contrib)"),
    Voice("espeak_en-us", "espeak-ng", "en-us", "espeak", False, package="espeak-ng-data"),
    Voice("espeak_en-gb-x-rp", "espeak-ng", "en-gb-x-rp", "espeak", False, package="espeak-ng-data"),
)
VOICE_GROUPS = ("default", "flite", "mbrola", "espeak", "all")
_MBROLA_DIRS = ("/usr/share/mbrola", "/usr/lib/x86_64-linux-gnu/espeak-ng-data/mbrola")


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One planned utterance; `record` turns it into a manifest line once its wav exists."""
  id: str
  text: str
  voice: Voice
  rate: float
  rate_class: int
  pitch: float
  pitch_class: int
  split: str

  def record(self, duration: float, sample_rate: int) -> dict:
    return {"id": self.id, "audio": f"{WAV_DIR}/{self.id}.wav", "text": self.text, "speaker": self.voice.name,
            "rate": self.rate, "rate_class": self.rate_class, "pitch": self.pitch,
            "pitch_class": self.pitch_class, "duration": round(duration, 4), "sample_rate": sample_rate,
            "split": self.split}


# ---------------------------------------------------------------------------------------------------- sentences


def _words(sentence: str) -> list[str]:
  return sentence[:-1].replace(",", " ").replace(";", " ").split()


def is_clean_sentence(sentence: str) -> bool:
  """True for one plain English sentence of MIN_WORDS..MAX_WORDS words that a synthesizer reads as written.

  ASCII letters, apostrophes inside words, hyphens inside words, commas, semicolons and one final . ? or !;
  no digits, quotes or colons (they mark dialogue, headings and lists); no all-caps words (abbreviations and
  shouting are read letter by letter or oddly); no single letters except 'I' and 'a' (initials); no capitalized
  function word after the first word (joined verse lines); no blocked word.
  """
  if not sentence.isascii() or not _SENTENCE_RE.match(sentence):
    return False
  if re.search(r"[,;](?! )| [,;]|[,;]{2}", sentence):
    return False
  words = _words(sentence)
  if not MIN_WORDS <= len(words) <= MAX_WORDS:
    return False
  if any(w[0].isupper() and w.lower() in _FUNCTION_WORDS for w in words[1:]):
    return False
  for word in words:
    if word[0] in "'-" or word[-1] == "-" or "--" in word or "''" in word or "-'" in word or "'-" in word:
      return False
    letters = re.sub(r"[^A-Za-z]", "", word)
    if sum(c.isupper() for c in letters) >= 2:
      return False
    if len(letters) == 1 and letters not in ("I", "a", "A"):
      return False
    if letters.lower() in _BLOCKED_WORDS or word.lower().rstrip("'s").rstrip("'") in _BLOCKED_WORDS:
      return False
  return True


def normalize_text(sentence: str) -> str:
  """The spoken content: lower-case letters, apostrophes and single spaces (what a CTC recognizer sees)."""
  return " ".join(re.sub(r"[^a-z' ]", " ", sentence.lower().replace("-", " ")).split())


def _fortune_sentences(fortune: str) -> list[str]:
  """Candidate sentences of one fortune: attribution dropped, lines joined, split after . ? !"""
  lines = []
  for line in fortune.split("\n"):
    if _ATTRIBUTION_RE.match(line):
      break  # "-- Author, Work" and anything after it is not part of the quote
    lines.append(line.strip())
  body = " ".join(" ".join(lines).split())
  if not body or _ABBREVIATION_RE.search(body):
    return []
  return _SPLIT_RE.split(body)


@functools.lru_cache(maxsize=4)
def _load_sentences_cached(fortune_dir: str) -> tuple[str, ...]:
  missing = [s for s in FORTUNE_SETS if not os.path.isfile(os.path.join(fortune_dir, s))]
  if missing:
    raise CorpusError(
        f"fortune files {', '.join(missing)} not found under {fortune_dir}: install the Debian package "
        f"'fortunes' (apt-get install fortunes), or pass the folder holding them")
  by_key: dict[str, str] = {}
  for name in FORTUNE_SETS:
    with open(os.path.join(fortune_dir, name), "rb") as f:
      # A few fortunes are Latin-1 or UTF-8; anything non-ASCII is dropped by the filter anyway.
      text = f.read().decode("utf-8", errors="replace")
    for fortune in text.split("\n%\n"):
      for sentence in _fortune_sentences(fortune):
        if is_clean_sentence(sentence):
          key = normalize_text(sentence)
          # Sentences that read the same (differing only in case or punctuation) count once, so that a
          # held-out sentence can never come back into training as a near-copy.
          if key not in by_key or sentence < by_key[key]:
            by_key[key] = sentence
  return tuple(sorted(by_key.values()))


def load_sentences(fortune_dir: str = FORTUNE_DIR) -> list[str]:
  """All clean, distinct sentences from the FORTUNE_SETS files, sorted (about 10k with Debian 12's fortunes).

  Raises CorpusError naming the package when the fortune files are missing.
  """
  return list(_load_sentences_cached(os.path.abspath(fortune_dir)))


# ------------------------------------------------------------------------------------------------------- voices


@functools.lru_cache(maxsize=8)
def _flite_voices(binary: str) -> frozenset[str]:
  out = subprocess.run([binary, "-lv"], capture_output=True, text=True, timeout=30).stdout
  # "Voices available: kal awb_time kal16 awb rms slt "
  return frozenset(out.split(":", 1)[-1].split())


@functools.lru_cache(maxsize=8)
def _espeak_voices(binary: str) -> frozenset[str]:
  # --voices alone lists one variant per language; --voices=en lists every English voice, mbrola ones included.
  out = subprocess.run([binary, "--voices=en"], capture_output=True, text=True, timeout=30).stdout
  names = set()
  for line in out.splitlines()[1:]:
    cols = line.split()
    if len(cols) >= 5:
      # Either the language ('en-gb-x-rp') or the voice file's base name ('mb-us1') selects a voice with -v.
      names.add(cols[1].lower())
      names.add(cols[4].rsplit("/", 1)[-1].lower())
  return frozenset(names)


def _mbrola_database(voice: Voice) -> str | None:
  db = voice.engine_voice.removeprefix("mb-")
  for root in _MBROLA_DIRS:
    for path in (os.path.join(root, db, db), os.path.join(root, db), os.path.join(root, "voices", db)):
      if os.path.isfile(path):
        return path
  return None


def missing_reason(voice: Voice) -> str | None:
  """None when `voice` can be synthesized here, else why not (naming the binary or package to install)."""
  binary = shutil.which(voice.engine)
  if binary is None:
    return (f"voice '{voice.name}' needs the synthesizer '{voice.engine}', which is not on PATH "
            f"(Debian package: {voice.engine})")
  if voice.engine == "flite":
    listed = _flite_voices(binary)
    if voice.engine_voice not in listed:
      return (f"voice '{voice.name}': {binary} has no voice '{voice.engine_voice}' "
              f"(flite -lv lists: {' '.join(sorted(listed)) or 'nothing'})")
  else:
    if voice.engine_voice.lower() not in _espeak_voices(binary):
      return f"voice '{voice.name}': {binary} has no voice '{voice.engine_voice}' (see espeak-ng --voices)"
    if voice.family == "mbrola":
      if shutil.which("mbrola") is None:
        return f"voice '{voice.name}' needs the 'mbrola' binary (Debian contrib package: mbrola)"
      if _mbrola_database(voice) is None:
        return (f"voice '{voice.name}' needs the MBROLA database '{voice.engine_voice.removeprefix('mb-')}' "
                f"under {' or '.join(_MBROLA_DIRS)} (Debian package: {voice.package})")
  if voice.pitch_by_sox and shutil.which("sox") is None:
    return f"voice '{voice.name}' needs 'sox' for its pitch variation, which is not on PATH (Debian package: sox)"
  return None


def available_voices() -> list[Voice]:
  """The KNOWN_VOICES that can be synthesized on this machine, in KNOWN_VOICES order."""
  return [v for v in KNOWN_VOICES if missing_reason(v) is None]


def resolve_voices(names: str | Sequence[str] | None = None) -> list[Voice]:
  """Voices from names and groups, deduplicated, in KNOWN_VOICES order.

  names: voice names ('flite_awb') and/or groups: 'flite' (the four primary voices), 'mbrola', 'espeak'
    (formant voices), 'default' (flite + mbrola) and 'all'; a comma-separated string works too. None = 'default'.
  A voice named explicitly, or a flite/espeak voice of a group, that cannot be synthesized raises CorpusError;
  mbrola voices requested through a group are skipped with a log line when not installed (they come from Debian
  contrib, which is often not enabled), unless none of a requested 'mbrola' group is installed.
  """
  if names is None:
    names = ["default"]
  elif isinstance(names, str):
    names = [n for n in names.split(",")]
  names = [n.strip() for n in names if n.strip()]
  if not names:
    raise CorpusError("no voices given")
  by_name = {v.name: v for v in KNOWN_VOICES}
  chosen: dict[str, bool] = {}  # name -> named explicitly
  for name in names:
    if name in by_name:
      chosen[name] = True
    elif name in VOICE_GROUPS:
      families = {"default": ("flite", "mbrola"), "all": ("flite", "mbrola", "espeak")}.get(name, (name,))
      for v in KNOWN_VOICES:
        if v.family in families:
          chosen.setdefault(v.name, False)
    else:
      raise CorpusError(f"unknown voice '{name}'; known voices: {', '.join(by_name)}; "
                        f"groups: {', '.join(VOICE_GROUPS)}")
  voices, skipped = [], []
  for v in KNOWN_VOICES:
    if v.name not in chosen:
      continue
    reason = missing_reason(v)
    if reason is None:
      voices.append(v)
    elif v.family == "mbrola" and not chosen[v.name]:
      skipped.append((v.name, reason))
    else:
      raise CorpusError(reason)
  if skipped:
    logging.info("skipping MBROLA voices that are not installed: %s (first: %s)",
                 ", ".join(n for n, _ in skipped), skipped[0][1])
  if "mbrola" in names and not any(v.family == "mbrola" for v in voices):
    raise CorpusError("voice group 'mbrola' asked for, but no MBROLA voice is installed: " +
                      "; ".join(missing_reason(v) or "" for v in KNOWN_VOICES if v.family == "mbrola"))
  if not voices:
    raise CorpusError(f"none of the voices {names} can be synthesized here")
  return voices


# -------------------------------------------------------------------------------------------------- synthesis


def _espeak_pitch_setting(pitch: float) -> int:
  return int(np.clip(round(50 + ESPEAK_PITCH_STEPS_PER_OCTAVE * math.log2(pitch)), 0, 99))


def _espeak_wpm(rate: float) -> int:
  return int(round(ESPEAK_DEFAULT_WPM * rate))


def realized_values(voice: Voice, rate: float, pitch: float) -> tuple[float, float]:
  """(rate, pitch) as the engine will actually realize them, rounded to 3 decimals.

  espeak-ng takes integer settings, so its factors are quantized (a step is ~0.6% of rate, ~1% of pitch).
  """
  if voice.engine == "espeak-ng":
    rate = _espeak_wpm(rate) / ESPEAK_DEFAULT_WPM
    pitch = 2.0 ** ((_espeak_pitch_setting(pitch) - 50) / ESPEAK_PITCH_STEPS_PER_OCTAVE)
  return round(rate, 3), round(pitch, 3)


def engine_command(voice: Voice, text: str, rate: float, pitch: float, out_path: str) -> list[str]:
  """The synthesizer command line that writes `text` to the wav `out_path` (before any sox pitch shift)."""
  if voice.engine == "flite":
    cmd = ["flite", "-voice", voice.engine_voice, "--setf", f"duration_stretch={1.0 / rate:.4f}"]
    if not voice.pitch_by_sox:
      cmd += ["--setf", f"f0_shift={pitch:.4f}"]
    return cmd + ["-t", text, "-o", out_path]
  if voice.engine == "espeak-ng":
    return ["espeak-ng", "-v", voice.engine_voice, "-s", str(_espeak_wpm(rate)), "-p",
            str(_espeak_pitch_setting(pitch)), "-w", out_path, "--", text]
  raise CorpusError(f"voice '{voice.name}': unknown engine '{voice.engine}'")


def _run(cmd: list[str]) -> None:
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SYNTH_TIMEOUT_S)
  except FileNotFoundError as e:
    raise CorpusError(f"synthesizer binary '{cmd[0]}' not found on PATH") from e
  except subprocess.TimeoutExpired as e:
    raise CorpusError(f"'{cmd[0]}' timed out after {SYNTH_TIMEOUT_S} s") from e
  if proc.returncode != 0:
    err = " ".join((proc.stderr or proc.stdout).split())[-300:]
    raise CorpusError(f"'{cmd[0]}' exited with status {proc.returncode}: {err}")


def _run_engine(voice: Voice, text: str, rate: float, pitch: float, out_path: str) -> None:
  """Runs the synthesizer (and sox, for voices that ignore pitch settings) to produce the raw wav `out_path`."""
  if not voice.pitch_by_sox:
    _run(engine_command(voice, text, rate, pitch, out_path))
    return
  raw = out_path + ".unshifted.wav"
  try:
    _run(engine_command(voice, text, rate, pitch, raw))
    # -D: no dither, -R: repeatable; both keep the output byte-identical from run to run.
    _run(["sox", "-D", "-R", raw, out_path, "pitch", f"{1200.0 * math.log2(pitch):.1f}"])
  finally:
    if os.path.exists(raw):
      os.remove(raw)


def synthesize(text: str, voice: Voice, path: str, rate: float = 1.0, pitch: float = 1.0,
               sample_rate: int = SAMPLE_RATE) -> float:
  """Writes `text` read by `voice` as a mono PCM16 wav at `sample_rate` to `path`; returns its duration (s).

  The file appears atomically (written under a temporary name in the same folder, then renamed), so `path`
  either holds a complete wav or does not exist. Raises CorpusError or audio.AudioError on failure.
  """
  folder = os.path.dirname(os.path.abspath(path))
  fd, raw = tempfile.mkstemp(prefix=".synth-", suffix=".wav", dir=folder)
  os.close(fd)
  final_tmp = raw[:-4] + ".out.wav"
  try:
    _run_engine(voice, text, rate, pitch, raw)
    wav = audio.load_audio(raw, sample_rate)  # [samples]; espeak-ng's 22.05 kHz is resampled here
    if wav.shape[0] == 0 or float(np.max(np.abs(wav))) < 1e-4:
      raise audio.AudioError(f"'{voice.engine}' produced empty or silent audio")
    audio.save_wav(final_tmp, wav, sample_rate)
    os.replace(final_tmp, path)
    return wav.shape[0] / sample_rate
  finally:
    for tmp in (raw, final_tmp):
      if os.path.exists(tmp):
        os.remove(tmp)


def valid_wav_duration(path: str, sample_rate: int) -> float | None:
  """Duration (s) of an existing mono wav at `sample_rate` with samples, else None (missing or unusable)."""
  try:
    info = sf.info(path)
  except Exception:  # missing, truncated or not audio: synthesize it again
    return None
  if info.samplerate != sample_rate or info.channels != 1 or info.frames <= 0:
    return None
  return info.frames / info.samplerate


# ----------------------------------------------------------------------------------------------------- planning


def _balanced_voices(rng: np.random.Generator, voices: Sequence[Voice], n: int) -> list[Voice]:
  """n voices, each block of len(voices) a fresh permutation: counts differ by at most one, order is random."""
  out: list[Voice] = []
  while len(out) < n:
    out.extend(voices[i] for i in rng.permutation(len(voices)))
  return out[:n]


def _utterance_id(index: int, voice: Voice, text: str, rate: float, pitch: float, sample_rate: int) -> str:
  # The hash covers everything that shapes the audio, so a cached wav from a different request (another seed
  # or voice set written into the same folder) never passes for this one.
  request = json.dumps([index, voice.engine, voice.engine_voice, voice.pitch_by_sox, text, rate, pitch,
                        sample_rate])
  return f"{voice.name}_{index:06d}_{hashlib.sha1(request.encode()).hexdigest()[:8]}"


def plan_corpus(num_utterances: int, seed: int, voices: Sequence[Voice], test_fraction: float,
                sentences: Sequence[str], sample_rate: int = SAMPLE_RATE) -> list[Utterance]:
  """The utterances of a corpus, a pure function of its arguments.

  Sentences are split first (a shuffled prefix is held out), so a sentence's utterances share one split even
  when the pool is small enough for sentences to repeat. round(num_utterances * test_fraction) utterances (at
  least one when test_fraction > 0) go to the test split, spread evenly over the primary voices; the rest go to
  train, spread evenly over all voices, so every primary speaker has train utterances to prompt with.
  """
  if num_utterances < 1:
    raise CorpusError(f"num_utterances must be >= 1, got {num_utterances}")
  if not 0.0 <= test_fraction < 1.0:
    raise CorpusError(f"test_fraction must be in [0, 1), got {test_fraction}")
  if not sentences:
    raise CorpusError("no sentences to read")
  voices = list(voices)
  primary = [v for v in voices if v.primary]
  num_test = 0
  if test_fraction > 0 and num_utterances >= 2:
    if not primary:
      raise CorpusError("the test split is read by the flite voices only, and none is selected; add a flite "
                        "voice or pass test_fraction=0")
    num_test = min(num_utterances - 1, max(1, round(num_utterances * test_fraction)))
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(sentences))
  # Hold out no more sentences than test utterances need, but always leave half the pool to train on.
  num_test_sentences = min(num_test, len(sentences) // 2) if num_test else 0
  if num_test and num_test_sentences == 0:
    raise CorpusError(f"{len(sentences)} sentence(s) cannot be split into train and test")
  test_pool = [sentences[i] for i in order[:num_test_sentences]]
  train_pool = [sentences[i] for i in order[num_test_sentences:]]
  slots = ([("test", test_pool[i % len(test_pool)], v)
            for i, v in enumerate(_balanced_voices(rng, primary, num_test))] +
           [("train", train_pool[i % len(train_pool)], v)
            for i, v in enumerate(_balanced_voices(rng, voices, num_utterances - num_test))])
  plan = []
  for index, (split, text, voice) in enumerate(slots):
    rate_class, pitch_class = (int(c) for c in rng.integers(0, 3, size=2))
    rate = float(rng.uniform(*RATE_BANDS[rate_class]))
    pitch = float(rng.uniform(*PITCH_BANDS[pitch_class]))
    rate, pitch = realized_values(voice, rate, pitch)
    plan.append(Utterance(_utterance_id(index, voice, text, rate, pitch, sample_rate), text, voice, rate,
                          rate_class, pitch, pitch_class, split))
  return plan


# ------------------------------------------------------------------------------------------------------- build


def _write_jsonl(path: str, records: Iterable[dict]) -> None:
  # A temp file of its own per write: runs sharing a corpus folder each rewrite its manifest, and a shared temp
  # name let one run's replace move the other's file away mid-write (FileNotFoundError).
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
  os.fchmod(fd, 0o644)   # mkstemp's 0600 would hide the manifest from other users of a shared corpus
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    for rec in records:
      f.write(json.dumps(rec, sort_keys=True, ensure_ascii=True) + "\n")
  os.replace(tmp, path)


def build_corpus(out_dir: str, num_utterances: int, seed: int = 0, workers: int | None = None,
                 voices: str | Sequence[str] | None = None, test_fraction: float = 0.1,
                 sample_rate: int = SAMPLE_RATE, fortune_dir: str = FORTUNE_DIR,
                 progress: bool = True) -> str:
  """Synthesizes the corpus into out_dir and returns the manifest path (out_dir/manifest.jsonl).

  Deterministic for (num_utterances, seed, voices, test_fraction, sample_rate): the manifest is byte-identical
  from run to run. Wavs that already exist and are valid are kept, not synthesized again. An utterance whose
  synthesis fails is left out of the manifest, logged and listed in out_dir/failures.jsonl; the others go on.

  Args:
    out_dir: output folder (created).
    num_utterances: utterances planned (the manifest has fewer only if some fail).
    seed: picks sentences, speakers, splits, rates and pitches.
    workers: synthesizer processes run at once; None = os.cpu_count().
    voices: see `resolve_voices`; None = 'default' (flite + installed mbrola voices).
    test_fraction: share of utterances in the held-out test split (flite voices, unseen sentences).
    sample_rate: of the written wavs.
    fortune_dir: where the Debian fortunes files are.
    progress: show a tqdm progress bar.
  Raises:
    CorpusError: bad arguments, unknown or uninstalled voices, missing text, or every utterance failing.
  """
  workers = workers or os.cpu_count() or 1
  if workers < 1:
    raise CorpusError(f"workers must be >= 1, got {workers}")
  chosen = resolve_voices(voices)
  plan = plan_corpus(num_utterances, seed, chosen, test_fraction, load_sentences(fortune_dir), sample_rate)
  wav_dir = os.path.join(out_dir, WAV_DIR)
  os.makedirs(wav_dir, exist_ok=True)

  durations: dict[str, float] = {}
  todo = []
  for utt in plan:
    duration = valid_wav_duration(os.path.join(wav_dir, utt.id + ".wav"), sample_rate)
    if duration is None:
      todo.append(utt)
    else:
      durations[utt.id] = duration
  logging.info("corpus %s: %d utterances by %s; %d cached, %d to synthesize with %d workers", out_dir,
               len(plan), ", ".join(v.name for v in chosen), len(durations), len(todo), workers)

  failures: dict[str, str] = {}

  def work(utt: Utterance) -> float:
    return synthesize(utt.text, utt.voice, os.path.join(wav_dir, utt.id + ".wav"), utt.rate, utt.pitch,
                      sample_rate)

  # Threads suffice: the time goes into the synthesizer subprocesses, which run outside the GIL.
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool, \
      tqdm.tqdm(total=len(todo), desc="synthesizing", unit="utt", disable=not progress or not todo) as bar:
    futures = {pool.submit(work, utt): utt for utt in todo}
    for future in concurrent.futures.as_completed(futures):
      utt = futures[future]
      try:
        durations[utt.id] = future.result()
      except (CorpusError, audio.AudioError, OSError) as e:
        failures[utt.id] = str(e)
      bar.update(1)

  records = [utt.record(durations[utt.id], sample_rate) for utt in sorted(plan, key=lambda u: u.id)
             if utt.id in durations]
  failures_path = os.path.join(out_dir, FAILURES_NAME)
  if failures:
    failed = [{"id": u.id, "speaker": u.voice.name, "text": u.text, "error": failures[u.id]}
              for u in sorted(plan, key=lambda u: u.id) if u.id in failures]
    _write_jsonl(failures_path, failed)
    logging.warning("%d of %d utterances failed (listed in %s); first: %s", len(failed), len(plan),
                    failures_path, "; ".join(f"{f['id']}: {f['error']}" for f in failed[:5]))
  elif os.path.exists(failures_path):
    os.remove(failures_path)  # a stale list from an earlier run would be misleading
  if not records:
    raise CorpusError(f"every utterance failed to synthesize; see {failures_path}")
  manifest_path = os.path.join(out_dir, MANIFEST_NAME)
  _write_jsonl(manifest_path, records)
  return manifest_path


def read_manifest(path: str) -> list[dict]:
  """The manifest's records, in file order, with `audio` made absolute (resolved against the manifest folder).

  Raises CorpusError naming the line for malformed JSON or missing keys.
  """
  root = os.path.dirname(os.path.abspath(path))
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{lineno}: not JSON: {e}") from e
      missing = [k for k in MANIFEST_KEYS if k not in rec]
      if missing:
        raise CorpusError(f"{path}:{lineno}: missing keys {missing}")
      rec["audio"] = os.path.normpath(os.path.join(root, rec["audio"]))
      records.append(rec)
  return records


def summarize(records: Sequence[dict]) -> dict:
  """Counts and hours per split and speaker, for logs and reports."""
  out: dict = {"utterances": len(records), "hours": round(sum(r["duration"] for r in records) / 3600.0, 4),
               "speakers": {}}
  for split in ("train", "test"):
    out[split] = sum(r["split"] == split for r in records)
  for r in records:
    s = out["speakers"].setdefault(r["speaker"], {"train": 0, "test": 0})
    s[r["split"]] += 1
  out["speakers"] = dict(sorted(out["speakers"].items()))
  return out
