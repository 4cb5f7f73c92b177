"""The evaluation loop: get a wav per item, transcribe it, score WER / SIM / duration / RTF, write the report.

Three ways to get the wavs (exactly one per run):
  - `synthesize(item) -> (wav [samples] float32, sample_rate, extra: dict)`: the system under test; each wav is
    written to `<out_dir>/wavs/<utt>.wav` and scored from that file, so re-scoring the folder with `wavs_dir`
    reproduces the numbers. `extra` scalars land in details.csv as `extra_<key>`.
  - `wavs_dir`: an existing folder of `<utt>.wav` files (Seed-TTS-Eval's layout).
  - `ceiling=True`: the items' ground-truth wavs, optionally through `roundtrip(wav, sr) -> (wav, sr)` (e.g.
    mel -> vocoder): what the ASR judge gives real speech, the floor a system's WER is reported against.
All scoring is at 16 kHz mono (what the ASR and speaker judges take). One bad item (missing or corrupt wav,
synthesis error) is recorded as a failure with its reason and the run goes on.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import soundfile as sf
import tqdm

from e2etts_jax import audio
from e2etts_jax.evaluation import metalist, report, stats, wer
from e2etts_jax.evaluation.asr import ASR
from e2etts_jax.evaluation.metalist import EvalItem
from e2etts_jax.evaluation.speaker import SpeakerEncoder, cosine_similarity

EVAL_SAMPLE_RATE = 16000
MIN_SAMPLES = EVAL_SAMPLE_RATE // 100  # below 10 ms there is nothing to recognise: a broken output, not speech
WAVS_DIR = "wavs"
ITEMS_LIST = "items.lst"

SynthesizeFn = Callable[[EvalItem], tuple]
InternalScorer = Callable[[EvalItem, np.ndarray, int], Mapping[str, float]]
RoundtripFn = Callable[[np.ndarray, int], tuple]


def _check_utt(utt: str) -> None:
  if not utt or utt in (".", "..") or "/" in utt or "\\" in utt or os.sep in utt:
    raise ValueError(f"utterance id {utt!r} cannot be a file name (<utt>.wav)")


def _as_wave(wav, what: str) -> np.ndarray:
  """Validates a returned waveform: [samples] (or [samples, channels]) finite floats -> [samples] float32."""
  wav = np.asarray(wav, np.float32)
  if wav.ndim == 2:
    wav = wav.mean(axis=1)
  if wav.ndim != 1:
    raise ValueError(f"{what} returned a waveform of shape {wav.shape}, expected [samples]")
  if not np.all(np.isfinite(wav)):
    raise audio.AudioError(f"{what} returned NaN or Inf samples")
  return wav


def _load_scored(path: str) -> np.ndarray:
  if not os.path.exists(path):
    raise FileNotFoundError(f"missing wav: {path}")
  wav = audio.load_audio(path, EVAL_SAMPLE_RATE)
  if wav.size < MIN_SAMPLES:
    raise audio.AudioError(f"empty audio ({wav.size} samples at {EVAL_SAMPLE_RATE} Hz): {path}")
  return wav


def _native_rate(path: str) -> int:
  try:
    return int(sf.info(path).samplerate)
  except Exception as e:  # soundfile's error types vary with the damage
    raise audio.AudioError(f"unreadable audio: {path}: {e}") from e


def _scalar(v) -> bool:
  return isinstance(v, (bool, int, float, str, np.integer, np.floating))


class _Run:
  """State of one evaluate() call: where wavs come from and cached prompt embeddings."""

  def __init__(self, out_dir, synthesize, wavs_dir, ceiling, roundtrip, speaker_encoder):
    self.out_dir, self.synthesize, self.wavs_dir = out_dir, synthesize, wavs_dir
    self.ceiling, self.roundtrip, self.speaker_encoder = ceiling, roundtrip, speaker_encoder
    self.prompt_cache: dict[str, np.ndarray] = {}
    self.gen_dir = os.path.join(out_dir, WAVS_DIR)

  def obtain(self, item: EvalItem, row: dict) -> np.ndarray:
    """Returns the wav to score at 16 kHz and fills wav_path / synth_s / extra_* in row."""
    if self.wavs_dir is not None:
      row["wav_path"] = os.path.join(self.wavs_dir, f"{item.utt}.wav")
      return _load_scored(row["wav_path"])
    out_path = os.path.join(self.gen_dir, f"{item.utt}.wav")
    if os.path.exists(out_path) and not (self.ceiling and self.roundtrip is None):
      os.remove(out_path)  # a wav left by an earlier run must not outlive a failure in this one
    if self.ceiling:
      if not item.gt_wav:
        raise ValueError("item has no ground-truth wav (ceiling mode needs the 5th list field)")
      if self.roundtrip is None:
        row["wav_path"] = item.gt_wav
        return _load_scored(item.gt_wav)
      if not os.path.exists(item.gt_wav):
        raise FileNotFoundError(f"missing ground-truth wav: {item.gt_wav}")
      sr = _native_rate(item.gt_wav)
      gt = audio.load_audio(item.gt_wav, sr)
      start = time.perf_counter()
      out = self.roundtrip(gt, sr)
      row["synth_s"] = time.perf_counter() - start
      wav, out_sr = out
      wav = _as_wave(wav, "roundtrip")
    else:
      start = time.perf_counter()
      out = self.synthesize(item)
      row["synth_s"] = time.perf_counter() - start
      if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise TypeError("synthesize(item) must return (wav, sample_rate, extra_dict), got "
                        f"{type(out).__name__}")
      wav, out_sr = out[0], out[1]
      extra = out[2] if len(out) == 3 and out[2] is not None else {}
      for k, v in dict(extra).items():
        if _scalar(v):
          row[f"extra_{k}"] = v.item() if isinstance(v, (np.integer, np.floating)) else v
      wav = _as_wave(wav, "synthesize")
    if wav.size == 0:
      raise audio.AudioError("empty audio (0 samples)")
    os.makedirs(self.gen_dir, exist_ok=True)
    audio.save_wav(out_path, wav, int(out_sr))
    row["wav_path"] = out_path
    # Scored from the written file (clipped, 16-bit) so a later --wavs re-score gives the same numbers.
    return _load_scored(out_path)

  def similarity(self, item: EvalItem, wav16: np.ndarray) -> float:
    enc: SpeakerEncoder = self.speaker_encoder
    if item.prompt_wav not in self.prompt_cache:
      if not os.path.exists(item.prompt_wav):
        raise FileNotFoundError(f"missing prompt wav: {item.prompt_wav}")
      self.prompt_cache[item.prompt_wav] = enc.embed(audio.load_audio(item.prompt_wav, EVAL_SAMPLE_RATE),
                                                     EVAL_SAMPLE_RATE)
    return cosine_similarity(enc.embed(wav16, EVAL_SAMPLE_RATE), self.prompt_cache[item.prompt_wav])


def _error(e: BaseException) -> str:
  return f"{type(e).__name__}: {e}"


def _fail(row: dict, e: BaseException) -> None:
  row["status"], row["error"] = "failed", _error(e)
  logging.warning("%s failed: %s", row["utt"], row["error"])


def _transcription(asr, wav16: np.ndarray) -> concurrent.futures.Future:
  """The judge's transcript of wav16: queued on an ASRPool (`submit`), else transcribed now (a done Future)."""
  if hasattr(asr, "submit"):
    return asr.submit(wav16, EVAL_SAMPLE_RATE)
  done: concurrent.futures.Future = concurrent.futures.Future()
  try:
    done.set_result(asr.transcribe(wav16, EVAL_SAMPLE_RATE))
  except Exception as e:  # pylint: disable=broad-except  # resolved (and recorded) by _judge
    done.set_exception(e)
  return done


def _judge(row: dict, item: EvalItem, transcript: concurrent.futures.Future, lang: str) -> bool:
  """Fills row's WER from the transcript (waiting for it); False (row failed) if the judge raised."""
  try:
    hyp = str(transcript.result() or "")
    row.update(wer.utterance_wer(item.target_text, hyp, lang), hypothesis=hyp,
               ref_norm=wer.normalize(item.target_text, lang), hyp_norm=wer.normalize(hyp, lang))
  except Exception as e:  # pylint: disable=broad-except
    _fail(row, e)
    return False
  row["status"] = "ok"
  return True


def _measure(run: _Run, row: dict, item: EvalItem, wav16: np.ndarray, speaker_encoder, internal_scorer) -> None:
  """Everything but the transcript: real-time factor, duration ratio, SIM, internal scores."""
  if row["synth_s"] is not None:
    row["rtf"] = row["synth_s"] / row["duration_s"]
  if item.gt_wav:
    try:
      row["gt_duration_s"] = float(sf.info(item.gt_wav).duration)
      row["duration_ratio"] = row["duration_s"] / row["gt_duration_s"]
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("%s: ground-truth duration unavailable: %s", item.utt, _error(e))
  if speaker_encoder is not None:
    try:
      row["sim"] = run.similarity(item, wav16)
    except Exception as e:  # pylint: disable=broad-except
      row["sim_error"] = _error(e)
  if internal_scorer is not None:
    try:
      for k, v in dict(internal_scorer(item, wav16, EVAL_SAMPLE_RATE)).items():
        row[f"internal_{k}"] = float(v)
    except Exception as e:  # pylint: disable=broad-except
      row["internal_error"] = _error(e)


def _progress(rows: list) -> dict:
  ok = [r["wer"] for r in rows if r["status"] == "ok"]
  failed = sum(1 for r in rows if r["error"] is not None)
  return {"wer": f"{100 * sum(ok) / len(ok):.2f}%", "failed": failed} if ok else {"failed": failed}


def evaluate(items: Sequence[EvalItem], out_dir: str, *, synthesize: SynthesizeFn | None = None,
             wavs_dir: str | None = None, asr: ASR, speaker_encoder: SpeakerEncoder | None = None,
             lang: str = "en", internal_scorer: InternalScorer | None = None, ceiling: bool = False,
             roundtrip: RoundtripFn | None = None, ceiling_results: str | Mapping | None = None,
             compare_to: str | Mapping | None = None, n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = 0,
             num_mel_plots: int = 3, progress: bool = True, meta: Mapping | None = None) -> dict:
  """Scores every item and writes results.json, details.csv, report.md and plots/ into out_dir.

  Args:
    items: EvalItems (or 4/5-tuples in EvalItem order).
    out_dir: output folder (created).
    synthesize / wavs_dir / ceiling: where wavs come from; exactly one (see the module docstring).
    asr: the ASR judge (`asr.make_asr`), or an `asr.ASRPool`: its workers transcribe while the next wav is made,
      and the run waits for them at the end (same results).
    speaker_encoder: SIM judge, or None to skip SIM (`speaker.make_speaker_encoder`).
    lang: 'en' or 'zh' (text normalisation rules).
    internal_scorer: optional `fn(item, wav [samples] at 16 kHz, 16000) -> {name: float}`, e.g. the reward
      model's own ASR/speaker scores; reported as `internal_<name>`.
    roundtrip: with ceiling=True, `fn(wav, sr) -> (wav, sr)` applied to the ground truth first.
    ceiling_results: a ceiling run's results (dict or path) to report WER / ceiling WER.
    compare_to: another run's results (dict or path) for a paired comparison section.
    n_resamples, seed: bootstrap settings.
    num_mel_plots: how many utterances get a mel image.
    progress: show a tqdm bar.
    meta: extra fields for results.json's `meta`.
  Returns:
    The results.json content: summary, failures, meta, utterances (and ceiling / compare when asked).
  """
  modes = [name for name, on in (("synthesize", synthesize is not None), ("wavs", wavs_dir is not None),
                                 ("ceiling", ceiling)) if on]
  if len(modes) != 1:
    raise ValueError("evaluate needs exactly one of synthesize=, wavs_dir= or ceiling=True; got "
                     f"{', '.join(modes) or 'none'}")
  if roundtrip is not None and not ceiling:
    raise ValueError("roundtrip= only applies with ceiling=True")
  if lang not in wer.LANGS:
    raise ValueError(f"unsupported language {lang!r}; choose one of {', '.join(wer.LANGS)}")
  items = [EvalItem(*it) for it in items]
  seen = set()
  for it in items:
    _check_utt(it.utt)
    if it.utt in seen:
      raise ValueError(f"duplicate utterance id {it.utt!r}")
    seen.add(it.utt)
  if wavs_dir is not None and not os.path.isdir(wavs_dir):
    raise FileNotFoundError(f"wavs folder not found: {wavs_dir}")
  os.makedirs(out_dir, exist_ok=True)
  try:
    metalist.write_metalist(items, os.path.join(out_dir, ITEMS_LIST))
  except metalist.MetalistError as e:
    logging.warning("items list not written: %s", e)

  run = _Run(out_dir, synthesize, wavs_dir, ceiling, roundtrip, speaker_encoder)
  rows: list[dict] = []
  judging: list[tuple] = []   # (row, item, transcript Future) a pool is still transcribing
  # Named by the output folder, not the mode: the main job's resynthesis is a ceiling-mode run with a roundtrip.
  bar = tqdm.tqdm(items, desc=f"eval[{os.path.basename(os.path.normpath(out_dir))}]", unit="utt",
                  disable=not progress)
  for item in bar:
    row: dict = {"utt": item.utt, "status": "failed", "error": None, "target_text": item.target_text,
                 "prompt_wav": item.prompt_wav, "gt_wav": item.gt_wav, "wav_path": None, "synth_s": None}
    rows.append(row)
    try:
      wav16 = run.obtain(item, row)
      row["duration_s"] = wav16.size / EVAL_SAMPLE_RATE
    except Exception as e:  # pylint: disable=broad-except  # one item must never end the run
      _fail(row, e)
      bar.set_postfix(_progress(rows))
      continue
    transcript = _transcription(asr, wav16)
    if not transcript.done():
      judging.append((row, item, transcript))
    elif not _judge(row, item, transcript, lang):
      bar.set_postfix(_progress(rows))
      continue
    _measure(run, row, item, wav16, speaker_encoder, internal_scorer)
    bar.set_postfix(_progress(rows))
  for row, item, transcript in judging:
    _judge(row, item, transcript, lang)

  run_meta = {"mode": modes[0], "lang": lang, "asr": getattr(asr, "name", type(asr).__name__),
              "speaker_encoder": None if speaker_encoder is None else getattr(speaker_encoder, "name",
                                                                               type(speaker_encoder).__name__),
              "wavs_dir": os.path.abspath(wavs_dir) if wavs_dir else None,
              "roundtrip": roundtrip is not None, **dict(meta or {})}
  results = report.build_results(rows, run_meta, n_resamples=n_resamples, seed=seed)
  if ceiling_results is not None:
    ceil = report.load_results(ceiling_results)
    results["ceiling"] = {"wer": ceil["summary"].get("wer"), "meta": ceil.get("meta")}
    results["wer_over_ceiling"] = report.ceiling_ratio(results, ceil)
  section = ""
  if compare_to is not None:
    results["compare"] = report.compare(results, compare_to, n_resamples=n_resamples, seed=seed)
    other = compare_to if isinstance(compare_to, str) else "other"
    section = report.compare_markdown(results["compare"], "this run", other)
  report.write_all(out_dir, results, rows, num_mel_plots=num_mel_plots, compare_section=section)
  return results
