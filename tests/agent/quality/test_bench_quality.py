"""``mimo-agent bench-quality``: the questions it asks, how it scores answers, and the command
against a real server (the random-weight tiny model, which must score nothing)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.quality.bench import KINDS, TYPED, Turn, domain_answers, plan, summarize, typed
from agent.quality.recognize import normalize
from agent.train.dialogue import FOLLOW_UPS, number_words
from streaming.cli import main
from tests.agent.train.conftest import require_voices


def test_plan_asks_every_kind_on_every_voice_and_follows_numbers_up():
    conversations = plan(["flite:rms", "espeak-ng:en-us+m6"], len(KINDS), seed=3)
    assert len(conversations) == 2 * len(KINDS)
    assert [c[0].kind for c in conversations[: len(KINDS)]] == list(KINDS)
    assert {c[0].voice for c in conversations[len(KINDS):]} == {"espeak-ng:en-us+m6"}
    for conversation in conversations:
        first = conversation[0]
        if first.kind in ("plus", "minus", "after"):
            # the follow-up's answer is the first answer's number moved by the follow-up's step
            (follow,) = conversation[1:]
            words = first.question.rstrip("?").split()
            a = {w: i for i, w in enumerate(number_words(n) for n in range(21))}
            value = (a[words[2]] + a[words[4]] if first.kind == "plus" else a[words[2]] - a[words[4]]
                     if first.kind == "minus" else a[words[3]] + 1)
            assert first.expected == number_words(value)
            assert follow.kind == "follow_up" and follow.expected == number_words(value + FOLLOW_UPS[follow.question])
        else:
            assert len(conversation) == 1
    assert plan(["flite:rms"], 4, seed=3) == plan(["flite:rms"], 4, seed=3)


def test_the_answer_set_holds_every_answer_the_domain_gives():
    answers = domain_answers()
    assert {"seven", "minus three", "twenty one", "garden", "hello, how are you?", "i am fine, thank you."} <= {
        a.lower() for a in answers}
    assert len(answers) == len(set(answers)) > 150


def turn(kind: str, expected: str, text: str, heard: str, voice: str = "v") -> Turn:
    return Turn(voice, kind, "q", expected, text=text, heard=heard)


def test_scores_count_right_answers_and_heard_words():
    conversations = [
        [turn("plus", "seven", "Seven.", "seven"), turn("follow_up", "eight", "nine", "nine")],
        [turn("minus", "minus two", "minus two", "minus too much")],
        [turn("repeat", "apple", "", "")],
        # typed: scored apart, and not in the spoken answer's measures
        [turn("plus", "seven", "seven", "", TYPED), turn("follow_up", "eight", "eight", "", TYPED)],
        [turn("greeting", "Hello, how are you?", "seven", "", TYPED)],
    ]
    s = summarize(conversations, [("the red cat", "the red hat"), ("a dog", "a dog")],
                  {"answers_clean": [("seven", "seven")], "answers_codec": [("seven", "eleven")]})
    assert s["questions"] == 3 and s["follow_ups"] == 1
    assert s["text_accuracy"] == pytest.approx(2 / 3)
    assert s["text_accuracy_by_kind"]["plus"] == 1.0 and s["text_accuracy_by_kind"]["repeat"] == 0.0
    assert s["text_accuracy_by_kind"]["greeting"] is None
    assert s["follow_up_accuracy"] == 0.0
    # expected words: seven, eight, minus two, apple = 5; edits: eight->nine, two->too + much, apple deleted = 4
    assert s["spoken_word_accuracy"] == pytest.approx(1 - 4 / 5)
    assert s["tts_wer"] == pytest.approx(1 / 5)
    assert s["ceiling_wer"] == {"answers_clean": 0.0, "answers_codec": 1.0}
    assert s["typed"]["questions"] == 2 and s["typed"]["text_accuracy"] == 0.5
    assert s["typed"]["text_accuracy_by_kind"]["greeting"] == 0.0 and s["typed"]["follow_up_accuracy"] == 1.0


def test_typed_conversations_are_the_spoken_ones_as_text():
    spoken = plan(["flite:rms"], 3, seed=1)
    assert [[(t.kind, t.question, t.expected) for t in c] for c in typed(spoken)] == [
        [(t.kind, t.question, t.expected) for t in c] for c in spoken]
    assert {t.voice for c in typed(spoken) for t in c} == {TYPED} and spoken[0][0].voice == "flite:rms"


def test_bench_quality_against_a_real_server_scores_random_weights_as_wrong(tmp_path, capsys):
    """The whole command, on the random tiny model: it runs every measure, and random weights
    answer nothing right (a benchmark that passed them would be measuring nothing)."""
    require_voices()
    from tests.streaming.live_server import start_server

    live = start_server()
    try:
        out = tmp_path / "quality.json"
        code = main(["bench-quality", "--url", live.ws_url, "--preset", "tiny", "--voices", "flite:rms",
                     "--per-voice", "2", "--tts", "1", "--threads", "1", "--json", str(out)])
    finally:
        live.stop()
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    s = result["summary"]
    assert s["questions"] == 2 and s["follow_ups"] == 2  # plus and minus, each followed up
    assert s["text_accuracy"] == 0.0 and s["follow_up_accuracy"] == 0.0 and s["spoken_word_accuracy"] < 0.5
    assert s["tts_wer"] >= 0.8
    assert s["typed"]["questions"] == 2 and s["typed"]["text_accuracy"] == 0.0  # the same questions, typed
    assert {t["voice"] for t in result["turns"]} == {"flite:rms", TYPED}
    # the recognizer hears the agent's voice itself; the random codec destroys it
    assert s["ceiling_wer"]["answers_clean"] <= 0.25 and s["ceiling_wer"]["tts_clean"] <= 0.4
    assert s["ceiling_wer"]["answers_codec"] >= 0.8
    assert all(t["expected"] for t in result["turns"])
    assert "text-channel answer accuracy: 0.0% of 2 questions (target >= 90.0%)" in printed
    assert result["model"]["model_card"]["weights"] == "random"


def test_bench_quality_names_what_is_missing(tmp_path, capsys, monkeypatch):
    assert main(["bench-quality", "--preset", "tiny", "--voices", "nosuch:voice", "--per-voice", "1"]) == 2
    assert "voice 'nosuch:voice' must be ENGINE:NAME" in capsys.readouterr().err
    import agent.presets

    monkeypatch.setattr(agent.presets, "PRESETS_DIR", tmp_path)
    assert main(["bench-quality", "--preset", "tiny-speech"]) == 2
    assert "the tiny-speech preset's weights are not in this install" in capsys.readouterr().err


def test_turn_dict_has_the_verdicts():
    t = turn("plus", "seven", "seven", "eleven")
    t.audio = np.zeros(10, np.int16)
    d = t.as_dict()
    assert d["text_correct"] is True and d["spoken_accuracy"] == 0.0 and "audio" not in d


def test_the_recognizer_hears_the_agent_voice_through_the_packaged_codec():
    """The ceiling the semantic tests stand on: the answers they expect, said in the agent's voice
    and passed through the shipped codec (the best the model can say them), are heard right."""
    require_voices()
    import torch

    from agent.codec import load_audio_tokenizer
    from agent.presets import PRESETS_DIR
    from agent.quality.bench import Speaker, reconstruct
    from agent.quality.recognize import Recognizer
    from agent.train.lm import trained_agent_voice

    codec = load_audio_tokenizer(PRESETS_DIR / "tiny-speech-codec", dtype=torch.float32, device="cpu")
    hear, speak = Recognizer(phrases=domain_answers()), Speaker()
    voice = trained_agent_voice(PRESETS_DIR / "tiny-speech")
    assert voice is not None  # the packaged model records the voice it was trained to speak in
    for answer in ("seven", "twelve", "five", "garden", "minus three", "Hello, how are you?"):
        clean = speak(voice, answer)
        assert hear.transcribe(clean) == hear.transcribe(reconstruct(codec, clean)) == normalize(answer)
