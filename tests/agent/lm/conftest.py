from __future__ import annotations

import pytest
import torch

from agent.lm.config import MiMoAudioConfig
from agent.lm.model import MiMoAudioLM, build_preset
from agent.lm.prompts import Prompt, PromptBuilder
from agent.lm.tokenizer import TextTokenizer


@pytest.fixture(scope="session")
def tiny() -> tuple[MiMoAudioLM, MiMoAudioConfig, TextTokenizer]:
    """The tiny preset, fp32 on the CPU (shared: tests must not modify its weights)."""
    return build_preset("tiny")


def random_codes(config: MiMoAudioConfig, frames: int, seed: int) -> torch.Tensor:
    """Valid RVQ codes (frames, channels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, e, (frames,), generator=g) for e in config.speech_empty_ids], dim=1)


def mixed_prompt(builder: PromptBuilder, seed: int, speech_patches: int = 6) -> Prompt:
    """Text patches, an audio segment and text again: every kind of patch."""
    codes = random_codes(builder.config, 4 * speech_patches, seed)
    return (
        builder.text("<|im_start|>user\nhi ") + builder.audio(codes) + builder.text("<|im_end|>\n<|sostm|>")
    )
