"""What the loaded model is said to be: the presets' random weights, a checkpoint's own
``model_card.json``, and the errors of a card that cannot be used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.model_card import MODEL_CARD_NAME, ModelCardError, checkpoint_card
from agent.runtime import load_runtime


def save_tiny_checkpoint(directory: Path, card: dict | None = None) -> tuple[Path, Path]:
    """The tiny preset's weights as official-layout checkpoints (LM and audio tokenizer), with
    ``card`` as the LM's model_card.json."""
    from agent.checkpoint import save_lm
    from agent.codec import load_audio_tokenizer
    from agent.codec.tokenizer import save_audio_tokenizer
    from agent.lm.model import build_preset

    lm, _, tokenizer = build_preset("tiny")
    save_lm(lm, directory / "lm", tokenizer=tokenizer)
    save_audio_tokenizer(load_audio_tokenizer(None, preset="tiny"), directory / "codec")
    if card is not None:
        (directory / "lm" / MODEL_CARD_NAME).write_text(json.dumps(card))
    return directory / "lm", directory / "codec"


def test_a_preset_says_its_weights_are_random() -> None:
    rt = load_runtime(preset="tiny", threads=1)
    card = rt.info["model_card"]
    assert card["name"] == "mimo-audio-tiny" and card["weights"] == "random" and card["examples"] == []
    assert card["summary"].startswith("random weights: ") and "noise" in card["summary"]
    assert rt.card.describe().startswith("mimo-audio-tiny: random weights: ")


def test_a_checkpoint_describes_itself_with_its_model_card(tmp_path) -> None:
    card = {"summary": "answers arithmetic questions", "examples": ["what is three plus four?", "hello"]}
    lm, codec = save_tiny_checkpoint(tmp_path, card)
    rt = load_runtime(str(lm), str(codec), threads=1)
    assert rt.info["model_card"] == {"name": "lm", "weights": "trained", "summary": "answers arithmetic questions",
                                     "examples": ["what is three plus four?", "hello"]}
    assert rt.card.describe() == 'lm: answers arithmetic questions; try saying: "what is three plus four?" / "hello"'
    (lm / MODEL_CARD_NAME).unlink()  # an official checkpoint has none
    plain = checkpoint_card(lm, "MiMo-Audio-7B-Instruct")
    assert plain.weights == "trained" and plain.examples == () and "MiMo-Audio checkpoint" in plain.summary


@pytest.mark.parametrize(("content", "message"), [
    ("{", "cannot read it as JSON"),
    ("[]", "must hold a JSON object, not list"),
    ('{"summary": 3}', "summary must be a non-empty string"),
    ('{"examples": "hi"}', "examples must be a list of at most 12 non-empty strings"),
    ('{"examples": [""]}', "examples must be a list"),
])
def test_a_model_card_that_cannot_be_used_is_named(tmp_path, content, message) -> None:
    (tmp_path / MODEL_CARD_NAME).write_text(content)
    with pytest.raises(ModelCardError, match=message) as refused:
        checkpoint_card(tmp_path, "x")
    assert str(tmp_path / MODEL_CARD_NAME) in str(refused.value)
