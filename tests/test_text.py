"""Text normalisation, CTC units and the sentencepiece model."""
import pytest

from e2etts_jax import text


@pytest.mark.parametrize("raw, expected", [
    ("Hello,   WORLD!  ", "hello world"),
    ("Dr. Smith paid $3.50 for 2 apples & the 1st pear.",
     "doctor smith paid three dollars and fifty cents for two apples and the first pear"),
    ("In 1984, 1,250 people came.", "in nineteen eighty four one thousand two hundred fifty people came"),
    ("It rose 12.5% in 2005", "it rose twelve point five percent in two thousand five"),
    ("Don\u2019t say 'hi' to the dogs' owners", "don't say hi to the dogs owners"),
    ("Caf\u00e9 na\u00efve, the 21st and 100th", "cafe naive the twenty first and one hundredth"),
    ("well-known -- \"quoted\" (text)", "well known quoted text"),
    ("?!...", ""),
])
def test_normalize_text(raw, expected):
  assert text.normalize_text(raw) == expected


def test_normalized_text_uses_only_ctc_characters():
  out = text.normalize_text("Mr. O'Neil, 42 years old; Ægir & Zoë @ 7:30 #1 -- Ünïcode\t\n")
  assert out and set(out) <= set(text.CTC_CHARS)
  assert "  " not in out and out == out.strip()


def test_number_to_words():
  assert text.number_to_words(0) == "zero"
  assert text.number_to_words(115) == "one hundred fifteen"
  assert text.number_to_words(2_000_019) == "two million nineteen"


def test_char_ctc_round_trip(tiny_config):
  assert text.ctc_vocab_size(tiny_config) == 29
  s = text.normalize_text("It's a quick test of the CTC units")
  ids = text.text_to_ctc(s, tiny_config)
  assert all(1 <= i <= 28 for i in ids) and len(ids) == len(s)
  assert ids[0] == text.CTC_CHARS.index("i") + 1 and text.text_to_ctc(" '", tiny_config) == [1, 2]
  assert text.ctc_to_text(ids + [0, 0], tiny_config) == s  # padding/blank ids are skipped


def test_ctc_collapse():
  assert text.ctc_collapse([0, 3, 3, 0, 3, 5, 5, 0]) == [3, 3, 5]


SENTENCES = [
    "the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
    "she sells sea shells by the sea shore", "peter piper picked a peck of pickled peppers",
    "how much wood would a woodchuck chuck", "the rain in spain stays mainly in the plain",
    "all that glitters is not gold", "an apple a day keeps the doctor away",
    "better late than never", "birds of a feather flock together", "curiosity killed the cat",
    "don't count your chickens before they hatch", "every cloud has a silver lining",
    "fortune favours the bold", "great minds think alike", "honesty is the best policy",
    "it's raining cats and dogs", "knowledge is power", "laughter is the best medicine",
    "many hands make light work", "no news is good news", "once bitten twice shy",
    "practice makes perfect", "rome wasn't built in a day", "slow and steady wins the race",
    "the early bird catches the worm", "time flies when you're having fun", "two heads are better than one",
    "when in rome do as the romans do", "you can't judge a book by its cover",
]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_train_load_round_trip(tmp_path, tiny_config, model_type):
  prefix = str(tmp_path / "spm")
  sp = text.train_sentencepiece(SENTENCES, prefix, vocab_size=64, model_type=model_type)
  assert 29 <= sp.vocab_size() <= 64
  assert sp.id_to_piece(text.PAD_ID) == "<pad>" and sp.id_to_piece(text.UNK_ID) == "<unk>"
  loaded = text.load_sentencepiece(prefix + ".model")
  for s in SENTENCES[:5] + ["a new sentence the model never saw"]:
    ids = text.encode_text(s, loaded)
    assert ids == text.encode_text(s, sp) and min(ids) >= 1  # 0 is padding, never produced
    assert loaded.decode(ids) == s
  # CTC over sentencepiece units: ids shifted by one for the blank.
  tiny_config.text.ctc_units = "sentencepiece"
  assert text.ctc_vocab_size(tiny_config, loaded) == loaded.vocab_size() + 1
  ids = text.text_to_ctc(SENTENCES[0], tiny_config, loaded)
  assert [i - 1 for i in ids] == text.encode_text(SENTENCES[0], loaded)
  assert text.ctc_to_text(ids, tiny_config, loaded) == SENTENCES[0]


def test_load_missing_model(tmp_path):
  with pytest.raises(FileNotFoundError):
    text.load_sentencepiece(str(tmp_path / "none.model"))


# CMU phones (ARPAbet without the stress digit) and flite's phrase break: what the 'phones' front end may produce.
CMU_PHONES = set("aa ae ah ao aw ax ay b ch d dh eh er ey f g hh ih iy jh k l m n ng ow oy p r s sh t th uh uw v w y "
                 "z zh pau".split())


@pytest.mark.parametrize("raw, expected", [
    # Reference pronunciations (CMUdict, as flite's lexicon gives them); the comma is a phrase break, the
    # breaks at both ends are dropped.
    ("Hello, world.", "hh ax l ow1 pau w er1 l d"),
    ("Thank you.", "th ae1 ng k y uw1"),
    # flite normalises numbers and abbreviations itself; a leading '-' is text, not an option.
    ("Dr. Smith paid $3.50", "d aa1 k t er s m ih1 th p ey1 d th r iy1 d aa1 l er z f ih1 f t iy s eh1 n t s"),
    ("-yes", "y eh1 s"),
    ("?!...", ""),
])
def test_to_phones(raw, expected):
  assert text.to_phones(raw) == expected
  assert text.llm_text(raw, text.normalize_text(raw), "phones") == expected


def test_phones_are_cmu_phones():
  phones = text.to_phones(" ".join(SENTENCES)).split()
  assert len(phones) > 100
  assert {p.rstrip("012") for p in phones} <= CMU_PHONES


def test_llm_text_frontends():
  raw = "Dr. Smith, 2 apples!"
  norm = text.normalize_text(raw)
  assert text.llm_text(raw, norm, "text") == norm == "doctor smith two apples"
  with pytest.raises(ValueError, match="text.frontend='ipa'"):
    text.llm_text(raw, norm, "ipa")


def test_phones_without_t2p_names_the_package(monkeypatch):
  text._t2p.cache_clear()   # (a failed lookup raises and is not cached: nothing to clear afterwards)
  monkeypatch.setattr(text.shutil, "which", lambda name: None)
  with pytest.raises(text.FrontendError, match="apt-get install flite"):
    text.to_phones("hello")
  with pytest.raises(text.FrontendError, match="apt-get install flite"):
    text.check_frontend("phones")
  text.check_frontend("text")   # needs no program
  with pytest.raises(ValueError, match="text.frontend='ipa'"):
    text.check_frontend("ipa")
  monkeypatch.undo()
  assert text.to_phones("hello") == "hh ax l ow1"


def test_sentencepiece_word_model_keeps_one_piece_per_phone(tmp_path):
  phones = [text.to_phones(s) for s in SENTENCES]
  sp = text.train_sentencepiece(phones, str(tmp_path / "spm"), vocab_size=512, model_type="word")
  assert sp.vocab_size() == 2 + len({p for s in phones for p in s.split()})
  for s in phones:
    ids = text.encode_text(s, sp)
    assert len(ids) == len(s.split()) and text.UNK_ID not in ids
    assert sp.decode(ids) == s
