"""The independent recognizer: PocketSphinx restricted to the lexicon, judged on known speech, and
the scoring the quality benchmark builds on it."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from agent.codec.audio import load_wav
from agent.quality.recognize import Recognizer, bigram_arpa, normalize, word_accuracy, word_error_rate
from agent.train.voices import Augmentation, synthesize
from tests.agent.train.conftest import require_voices


@pytest.fixture(scope="module")
def recognizer():
    return Recognizer()


def speak(tmp_path, voice: str, text: str) -> np.ndarray:
    require_voices()
    path = tmp_path / "speech.wav"
    synthesize(voice, text, path, Augmentation())
    return load_wav(path)


def test_normalize_keeps_words_and_writes_numbers_as_words():
    assert normalize("What is 3 plus four?") == "what is three plus four"
    assert normalize("Hello, how are you?") == "hello how are you"
    assert normalize("  Repeat after me:  APPLE. ") == "repeat after me apple"


def test_word_error_rate_counts_substitutions_deletions_and_insertions():
    assert word_error_rate([("three plus four", "three plus four")]) == 0.0
    assert word_error_rate([("three plus four", "three minus four")]) == pytest.approx(1 / 3)
    assert word_error_rate([("three plus four", "three four"), ("seven", "seven eight")]) == pytest.approx(2 / 4)
    assert word_accuracy("seven", "") == 0.0
    assert word_accuracy("seven", "seven seven seven") == 0.0  # insertions past 100% stop at zero
    assert word_accuracy("Seven.", "seven") == 1.0


def test_bigram_language_model_is_normalised():
    """Each context's seen bigrams plus its backoff mass over the unseen words sum to one, and
    every vocabulary word is reachable (the recognizer may hear any word of the domain)."""
    text = bigram_arpa(["the cat sees the dog", "the dog runs", "a cat"], ["the", "a", "cat", "dog", "sees",
                                                                           "runs", "bird"])
    unigrams, bigrams, backoff = {}, {}, {}
    section = None
    for line in text.splitlines():
        if line.startswith("\\"):
            section = line
            continue
        fields = line.split()
        if section == "\\1-grams:" and fields:
            unigrams[fields[1]] = 10 ** float(fields[0])
            if len(fields) == 3:
                backoff[fields[1]] = 10 ** float(fields[2])
        elif section == "\\2-grams:" and fields:
            bigrams[(fields[1], fields[2])] = 10 ** float(fields[0])
    assert "bird" in unigrams and unigrams["bird"] > 0
    assert re.search(r"ngram 1=9\b", text)
    words = [w for w in unigrams if w != "<s>"]
    assert math.fsum(unigrams[w] for w in words) == pytest.approx(1.0, abs=1e-4)
    for context in ("<s>", "the", "cat"):
        seen = {w for (v, w) in bigrams if v == context}
        total = math.fsum(bigrams[(context, w)] for w in seen)
        total += backoff[context] * math.fsum(unigrams[w] for w in words if w not in seen)
        assert total == pytest.approx(1.0, abs=1e-4), context


@pytest.mark.parametrize("voice", ["flite:kal16", "espeak-ng:en-us"])
def test_recognizer_hears_a_domain_question(tmp_path, recognizer, voice):
    audio = speak(tmp_path, voice, "What is three plus four?")
    assert recognizer.transcribe(audio) == "what is three plus four"


def test_recognizer_tells_different_answers_apart(tmp_path, recognizer):
    """It hears what was said, not what the domain makes likely: two answers that differ in one
    word are told apart (so a wrong spoken answer scores as wrong)."""
    heard = [recognizer.transcribe(speak(tmp_path, "flite:kal16", text)) for text in ("seven", "nine", "The red cat.")]
    assert heard == ["seven", "nine", "the red cat"]


def test_recognizer_hears_nothing_in_silence_and_takes_any_rate(tmp_path, recognizer):
    assert recognizer.transcribe(np.zeros(24000, np.float32)) == ""
    assert recognizer.transcribe(np.zeros(0, np.float32)) == ""
    audio = speak(tmp_path, "flite:kal16", "Good morning.")
    from agent.codec.audio import resample

    assert recognizer.transcribe(resample(audio, 24000, 16000), sample_rate=16000) == "good morning"
    assert recognizer.transcribe((audio * 32767).astype(np.int16)) == "good morning"


def test_extra_sentences_join_the_vocabulary():
    """Words the domain's answers use beyond the lexicon (``thirty``) become recognisable."""
    assert "thirty" not in Recognizer().vocabulary
    assert "thirty" in Recognizer(extra_sentences=["twenty plus ten is thirty"]).vocabulary


def test_phrase_recognizer_hears_one_of_its_phrases(tmp_path):
    """Restricted to a closed set of answers it hears the nearest one, or nothing: never a
    word outside the set."""
    answers = Recognizer(phrases=["seven", "minus two", "Hello, how are you?", "garden", "eleven"])
    assert answers.phrases == ("seven", "minus two", "hello how are you", "garden", "eleven")
    assert answers.transcribe(speak(tmp_path, "flite:kal16", "Minus two.")) == "minus two"
    assert answers.transcribe(speak(tmp_path, "flite:kal16", "Hello, how are you?")) == "hello how are you"
    assert answers.transcribe(speak(tmp_path, "flite:kal16", "eleven")) == "eleven"
