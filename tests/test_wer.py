"""Seed-TTS-Eval WER rules on worked examples, and mean-of-utterances versus corpus WER."""
import pytest

from e2etts_jax.evaluation import wer


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    # ASCII apostrophes survive, every other ASCII mark goes; a dash glues its neighbours (no space is added).
    ("Don't stop-it's O'Brien's (car).", "don't stopit's o'brien's car"),
    # The typographic apostrophe and curly quotes are in the CJK/general set, so they are deleted.
    ("don\u2019t \u201cquote\u201d", "dont quote"),
    # Em dash and ellipsis are deleted without leaving a space.
    ("wait\u2014what\u2026", "waitwhat"),
    # Double spaces are replaced ONCE, left to right: 3 spaces -> 2, 4 -> 2.
    ("a  b", "a b"), ("a   b", "a  b"), ("a    b", "a  b"),
    # Removing punctuation can create a double space that is then halved.
    ("one , two", "one two"),
    ("MiXeD CaSe", "mixed case"),
])
def test_normalize_english(text, expected):
  assert wer.normalize(text, "en") == expected


@pytest.mark.parametrize("text, expected", [
    ("你好，世界！", "你 好 世 界"),
    ("《三体》（刘慈欣）。", "三 体 刘 慈 欣"),
    ("他说：“好的”、‘行’？", "他 说 好 的 行"),
    # zh is not lowercased, and latin letters become single characters too.
    ("AB好", "A B 好"),
])
def test_normalize_chinese(text, expected):
  assert wer.normalize(text, "zh") == expected


def test_normalize_rejects_unknown_language():
  with pytest.raises(ValueError, match="unsupported language"):
    wer.normalize("x", "fr")


def test_utterance_wer_counts():
  d = wer.utterance_wer("The cat sat on the mat.", "the cat sat on mat", "en")
  assert d == {"wer": pytest.approx(1 / 6), "substitutions": 0, "deletions": 1, "insertions": 0, "hits": 5,
               "ref_len": 6}
  # Case and punctuation alone are not errors; apostrophes are part of the word.
  assert wer.utterance_wer("Hello, World!", "hello world", "en")["wer"] == 0.0
  assert wer.utterance_wer("It's fine.", "its fine", "en")["substitutions"] == 1
  # Insertions can push WER above 1.
  assert wer.utterance_wer("yes", "yes yes yes", "en")["wer"] == pytest.approx(2.0)


def test_utterance_cer_for_chinese():
  d = wer.utterance_wer("今天天气很好。", "今天天汽很好", "zh")
  assert (d["substitutions"], d["ref_len"]) == (1, 6)
  assert d["wer"] == pytest.approx(1 / 6)


def test_empty_reference_is_an_error():
  with pytest.raises(ValueError, match="empty after normalisation"):
    wer.utterance_wer("?!", "something", "en")


def test_reported_figure_is_mean_of_utterances_not_corpus():
  # A 1-word utterance fully wrong and a 9-word one fully right: the mean weighs them equally (50%),
  # pooling would give 1 error in 10 words (10%).
  per_utt = [wer.utterance_wer("hello", "yellow", "en"),
             wer.utterance_wer("one two three four five six seven eight nine",
                               "one two three four five six seven eight nine", "en")]
  assert wer.mean_wer(per_utt) == pytest.approx(50.0)
  assert wer.corpus_wer(per_utt) == pytest.approx(10.0)
  assert wer.mean_wer([1.0, 0.0]) == pytest.approx(50.0)
  with pytest.raises(ValueError):
    wer.mean_wer([])
