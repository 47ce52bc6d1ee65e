"""Loading the golden fixtures made with the official implementation (see fixtures/reference/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from agent.checkpoint import load_into_module, load_lm, load_state_dict
from agent.lm.model import MiMoAudioLM
from agent.lm.tokenizer import ByteTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
VARIANTS = ("small", "other")


def reference_tokenizer() -> ByteTokenizer:
    """A byte tokenizer with the special ids the reference script used (others at free ids)."""
    s = json.loads((FIXTURES / "specials.json").read_text())
    ids = {
        "<|sosp|>": s["sosp_idx"],
        "<|eosp|>": s["eosp_idx"],
        "<|empty|>": s["empty_idx"],
        "<|sostm|>": s["sostm_idx"],
        "<|eostm|>": s["eostm_idx"],
        "<|eot|>": s["eot_idx"],
        "<|endoftext|>": 280,
        "<|im_start|>": 281,
        "<|im_end|>": 282,
        "<think>": 283,
        "</think>": 284,
    }
    return ByteTokenizer(ids)


def load_reference(variant: str, boost: bool) -> tuple[MiMoAudioLM, dict[str, torch.Tensor]]:
    """The fp32 reference model (plain or boosted weights) and its expected outputs."""
    directory = FIXTURES / variant
    lm, _, _ = load_lm(directory, "fp32", "cpu", tokenizer=reference_tokenizer())
    if boost:
        state = load_state_dict(directory)
        state.update(load_file(str(directory / "boost_overrides.safetensors")))
        load_into_module(lm, state, source=str(directory))
    expected = load_file(str(directory / f"expected_{'boost' if boost else 'plain'}.safetensors"))
    return lm, expected
