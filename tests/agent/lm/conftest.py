from __future__ import annotations

import queue

import pytest
import torch

from agent.engine import AddUserText, Engine, EngineConfig, Respond, ResponseDone, ResponseParams
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


def twin_caches(lm: MiMoAudioLM, lengths: list[int], slots: int, positions: int, device: str = "cpu"):
    """Two identical caches of ``slots`` x ``positions``, slot i prefilled with ``lengths[i]``
    positions of its own random history (seeded; made on the CPU, then moved to ``device``)."""
    a = lm.allocate_cache(slots, positions)
    g = torch.Generator().manual_seed(0)
    for slot, n in enumerate(lengths):
        if n:
            lm.prefill(a, slot, torch.randn(1, n, lm.config.hidden_size, generator=g).to(device))
    b = lm.allocate_cache(slots, positions)
    b.k.copy_(a.k)
    b.v.copy_(a.v)
    b.lengths.copy_(a.lengths)
    b.host_lengths = list(a.host_lengths)
    return a, b


def short_answer(runtime, sampling, **config):
    """A short seeded answer of an engine on ``runtime`` (``config``: EngineConfig fields): the
    engine, its ResponseDone and the answer's codes (patches, 4, 8)."""
    engine = Engine(runtime.lm, runtime.tokenizer, runtime.codec,
                    EngineConfig(max_sessions=1, max_positions=512, **config)).start()
    events: queue.Queue = queue.Queue()
    try:
        handle = engine.open_session(events.put, seed=3)
        handle.submit(AddUserText("u", "Say something"))
        handle.submit(Respond("r", "a", ResponseParams(sampling=sampling, max_output_patches=8, min_patches=8,
                                                       interleave=(2, 3))))
        while not isinstance(event := events.get(timeout=800), ResponseDone):
            pass
        return engine, event, engine._sessions[handle.sid].items[-1].patches.codes
    finally:
        engine.stop()
