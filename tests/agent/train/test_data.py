"""``mimo-agent train data``: the same corpus for the same seed, held-out voices kept out."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from agent.train.data import HELD_OUT_VOICES, MANIFEST, CorpusRecipe, generate, load_split
from agent.train.lexicon import WORDS, SentenceGenerator
from agent.train.voices import Augmentation, VoiceError, synthesize
from streaming.cli import main

from .conftest import SMALL, require_voices


def test_sentences_are_seeded_and_inside_the_lexicon():
    a, b = SentenceGenerator(7).sentences(300), SentenceGenerator(7).sentences(300)
    assert a == b
    assert a != SentenceGenerator(8).sentences(300)
    words = {w for s in a for w in re.findall(r"[a-z]+", s.lower())}
    assert words <= WORDS, words - WORDS
    assert any("plus" in s for s in a) and any(s.startswith("Repeat after me") for s in a)


def test_same_seed_same_bytes_and_held_out_voices_only_in_held_out(corpus, tmp_path):
    again = tmp_path / "again"
    assert main(["train", "data", "--out", str(again), "--seed", "3", "--minutes", str(SMALL["train_minutes"]),
                 "--held-out-per-voice", str(SMALL["held_out_per_voice"])]) == 0
    first, second = (json.loads((d / MANIFEST).read_text()) for d in (corpus, again))
    assert first["utterances"] == second["utterances"]
    for u in first["utterances"]:
        assert (corpus / u["file"]).read_bytes() == (again / u["file"]).read_bytes(), u["file"]
    held_out = [u for u in first["utterances"] if u["split"] == "held_out"]
    train = [u for u in first["utterances"] if u["split"] == "train"]
    assert [u["voice"] for u in held_out] == list(HELD_OUT_VOICES)
    assert first["recipe"]["held_out_voices"] == list(HELD_OUT_VOICES)
    assert train and not {u["voice"] for u in train} & set(HELD_OUT_VOICES)
    assert first["minutes"]["train"] >= SMALL["train_minutes"]
    assert first["recipe"]["seed"] == 3 and first["tools"]["sox"] != "not installed"
    # the audio is speech-like: 24 kHz, not silent, at the drawn peak level
    entry, audio = load_split(corpus, "held_out")[0]
    assert entry["file"] == held_out[0]["file"]
    assert audio.size / 24000 == pytest.approx(entry["seconds"], abs=1e-3)
    assert 20 * np.log10(np.abs(audio).max()) == pytest.approx(entry["augment"]["peak_db"], abs=0.2)


def test_another_seed_draws_other_sentences_voices_and_augmentation(corpus, tmp_path):
    other = generate(tmp_path, CorpusRecipe(seed=4, train_minutes=0.05, held_out_per_voice=1), log=lambda _: None)
    first = json.loads((corpus / MANIFEST).read_text())
    assert [u["text"] for u in other["utterances"]] != [u["text"] for u in first["utterances"]]
    assert [u["augment"] for u in other["utterances"]] != [u["augment"] for u in first["utterances"]]


def test_a_held_out_voice_among_the_training_voices_is_refused():
    with pytest.raises(ValueError, match="held-out voices also in the training voices"):
        CorpusRecipe(held_out_voices=("flite:slt",))


def test_unknown_voices_name_the_problem(tmp_path):
    require_voices()
    with pytest.raises(VoiceError, match="ENGINE:NAME"):
        synthesize("nobody", "hello", tmp_path / "x.wav", Augmentation())
    with pytest.raises(VoiceError, match="festival voice no_such_voice is not installed"):
        synthesize("festival:no_such_voice", "hello", tmp_path / "x.wav", Augmentation())
    with pytest.raises(VoiceError, match="flite voice"):
        synthesize("flite:no_such_voice", "hello", tmp_path / "x.wav", Augmentation())
