"""Shared fixtures for the audio tokenizer tests: golden checkpoints and a tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agent.codec import load_audio_tokenizer

DATA = Path(__file__).resolve().parents[2] / "data" / "codec"
VARIANTS = ("small", "other")


@pytest.fixture(scope="session", params=VARIANTS)
def golden(request):
    """(variant name, tokenizer loaded from the official-layout checkpoint, expected outputs)."""
    directory = DATA / request.param
    tok = load_audio_tokenizer(directory, dtype="fp32", device="cpu")
    return request.param, tok, load_file(str(directory / "expected.safetensors"))


@pytest.fixture(scope="session")
def tiny():
    """The ``tiny`` preset, seeded random weights, fp32 on the CPU."""
    torch.set_num_threads(1)
    return load_audio_tokenizer(None, preset="tiny", dtype="fp32", device="cpu")
