"""Packaged presets: a trained model shipped in the official checkpoint layout is the default when
this install has its weights, and loads through the checkpoint code like any downloaded model.

The switch is tested on a stand-in: the tiny preset's weights, changed so they are not the seeded
ones, written in the official layout to a temporary presets directory."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest
import torch

import agent.presets
from agent.model_card import TINY_SPEECH_EXAMPLES
from agent.offline import resolve_model
from agent.presets import PresetMissing, default_preset, preset_dirs
from agent.runtime import load_runtime
from tests.agent.test_model_card import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
#: the most the packaged weights may weigh together (issue 16: the wheel stays small)
MAX_PACKAGED_BYTES = 32 * 2**20
#: a tensor of the stand-in whose values differ from the seeded random ones
MARKED = "model.embed_tokens.weight"


@pytest.fixture()
def stand_in(tmp_path, monkeypatch) -> Path:
    """A presets directory holding ``tiny-speech`` (the tiny LM with one tensor marked) and its codec."""
    lm, codec = save_tiny_checkpoint(tmp_path / "made")
    from safetensors.torch import load_file, save_file

    weights = load_file(lm / "model.safetensors")
    weights[MARKED] = torch.full_like(weights[MARKED], 0.25)
    save_file(weights, lm / "model.safetensors", metadata={"format": "pt"})
    presets = tmp_path / "presets"
    presets.mkdir()
    lm.rename(presets / "tiny-speech")
    codec.rename(presets / "tiny-speech-codec")
    monkeypatch.setattr(agent.presets, "PRESETS_DIR", presets)
    return presets


def test_the_packaged_trained_preset_is_the_default_and_loads_as_a_checkpoint(stand_in) -> None:
    assert default_preset() == "tiny-speech"
    rt = load_runtime(threads=1, device="cpu")
    assert rt.name == "mimo-audio-tiny-speech" and rt.info["preset"] == "tiny-speech"
    # loaded from the directory (the marked tensor), not built with random weights
    assert torch.equal(rt.lm.state_dict()[MARKED], torch.full_like(rt.lm.state_dict()[MARKED], 0.25))
    # a checkpoint, not a random-weight preset: serving constrains nothing for it
    assert rt.preset is None and rt.info["weights"] == "trained"
    card = rt.info["model_card"]
    assert card["weights"] == "trained" and tuple(card["examples"]) == TINY_SPEECH_EXAMPLES
    assert "What is three plus four?" in card["examples"] and "plus" in card["summary"]
    assert load_runtime(preset="tiny", threads=1, device="cpu").info["model_card"]["weights"] == "random"


def test_offline_commands_say_which_model_runs_and_that_tiny_speech_does_not_read(stand_in, capsys) -> None:
    from streaming.cli import main

    assert main(["tts", "--text", "the red garden", "--max-patches", "4"]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    # the packaged preset's card, before anything is generated: TTS is the task it never learnt
    assert first.startswith("[model mimo-audio-tiny-speech: a tiny model trained on a closed domain")
    assert "does not read a text aloud" in first and 'try saying: "What is three plus four?"' in first


def test_serve_defaults_to_the_packaged_preset_and_says_what_to_ask(stand_in) -> None:
    import httpx

    from tests.streaming.live_server import start_server

    live = start_server(default_model=True)
    try:
        health = httpx.get(f"{live.url}/healthz").json()
        defaults = live.app.state.config.session_defaults
    finally:
        live.stop()
    assert health["model_card"]["name"] == "mimo-audio-tiny-speech" and health["model_card"]["weights"] == "trained"
    assert health["model_card"]["examples"][0] == "What is three plus four?"
    # a trained model stops on its own and chooses when to speak: no random-weight interleave or budget
    assert defaults["mimo"]["interleave"] is None and "max_output_tokens" not in defaults


def test_offline_commands_default_to_the_packaged_preset(stand_in) -> None:
    import argparse

    args = argparse.Namespace(model=None, tokenizer=None, preset=None)
    assert resolve_model(args) == (str(stand_in / "tiny-speech"), str(stand_in / "tiny-speech-codec"), "tiny-speech")
    assert resolve_model(argparse.Namespace(model=None, tokenizer=None, preset="tiny")) == (None, None, "tiny")
    with pytest.raises(ValueError, match="--tokenizer goes with --model; the tiny-speech preset brings its own"):
        resolve_model(argparse.Namespace(model=None, tokenizer="codec", preset=None))


def test_without_its_weights_the_default_is_random_and_asking_for_it_names_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(agent.presets, "PRESETS_DIR", tmp_path)
    assert default_preset() == "tiny"
    assert load_runtime(threads=1, device="cpu").info["model_card"]["weights"] == "random"
    with pytest.raises(PresetMissing, match=r"tiny-speech/config.json is missing\); use --preset tiny"):
        load_runtime(preset="tiny-speech", threads=1, device="cpu")
    with pytest.raises(PresetMissing, match="tiny-speech"):
        preset_dirs("tiny-speech")


def test_packaged_weights_ship_in_the_wheel_and_stay_small() -> None:
    """Every file of agent/presets/*/ is package data (a wheel has it) and they weigh <= 32 MB together."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["agent.presets"]
    root = ROOT / "agent" / "presets"
    files = [p for p in root.glob("*/*") if p.is_file()]
    assert files, "the packaged codec at least"
    unshipped = [str(p.relative_to(root)) for p in files
                 if not any(fnmatch.fnmatch(str(p.relative_to(root)), pat) for pat in patterns)]
    assert unshipped == []
    assert sum(p.stat().st_size for p in files) <= MAX_PACKAGED_BYTES
