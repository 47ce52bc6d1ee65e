"""Load what serving needs: the language model, its text tokenizer and the audio tokenizer.

From official checkpoints (``--model`` a MiMo-Audio-7B directory or hub id, ``--tokenizer`` a
MiMo-Audio-Tokenizer directory or hub id) or from a built-in preset: ``tiny-speech`` (trained on
a closed spoken domain, packaged in the official layout and loaded as a checkpoint: see
:mod:`agent.presets`; the default when this install has its weights), ``tiny`` (random seeded
weights, runs on a CPU; the default otherwise) or ``mimo-audio-7b`` (the real sizes, random
weights, for GPU benchmarks without a download).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from agent.checkpoint import parse_device, parse_dtype

log = logging.getLogger(__name__)

#: LM preset -> the audio-tokenizer preset of the same scale
CODEC_PRESET = {"tiny": "tiny", "mimo-audio-7b": "mimo-audio-tokenizer"}
#: presets have random weights: without a constraint they rarely choose to speak, so the server
#: defaults them to an interleave (N text patches, then M speech patches)
PRESET_INTERLEAVE = "2:6"
#: ... and bounds their responses: at least this many patches (stop tokens banned before), at most
#: ``PRESET_MAX_OUTPUT`` (a random model babbles until the budget runs out)
PRESET_MIN_OUTPUT = 8
PRESET_MAX_OUTPUT = 40


@dataclass
class Runtime:
    lm: Any
    tokenizer: Any  # text tokenizer
    codec: Any  # audio tokenizer
    name: str
    #: the random-weight preset built (``tiny``, ``mimo-audio-7b``); None for a checkpoint, packaged
    #: presets (``tiny-speech``) included: what is constrained for random weights is not for them
    preset: str | None
    device: torch.device
    dtype: torch.dtype
    load_s: float = 0.0
    info: dict = field(default_factory=dict)
    card: Any = None  # agent.model_card.ModelCard: what the model is and what to expect of it
    #: the checkpoint directory (or hub id) the LM was loaded from; None for a random-weight preset
    model_dir: str | None = None


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_threads(device: torch.device) -> int:
    """Intra-op threads for ``device``: on a CPU every core but one, which the event loop and the
    engine's own Python need (when torch's OpenMP workers fill all cores, each parallel region
    waits for a worker the OS has preempted: on 2 busy cores a decode step ran 10x slower with 2
    threads than with 1); elsewhere torch's default."""
    if device.type != "cpu":
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def set_threads(threads: int | None, device: torch.device) -> int:
    """Set torch's intra-op threads (None: :func:`default_threads`) for the whole process; return it."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    n = threads or default_threads(device)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def load_runtime(
    model: str | None = None,
    tokenizer: str | None = None,
    preset: str | None = None,
    *,
    device: str | None = "auto",
    dtype: str | None = None,
    threads: int | None = None,
    codec_prior: bool = True,
) -> Runtime:
    """Everything a server or benchmark needs; a preset when no ``model`` is given (default:
    :func:`agent.presets.default_preset`). ``threads``: torch intra-op threads (None:
    :func:`default_threads`). ``codec_prior=False``: decode streams with running GroupNorm
    statistics only, ignoring the audio tokenizer's ``streaming_prior.json``."""
    from agent.checkpoint import load_lm
    from agent.codec import load_audio_tokenizer
    from agent.lm.model import build_preset
    from agent.model_card import model_card
    from agent.presets import TRAINED_PRESETS, default_preset, preset_dirs

    t0 = time.perf_counter()
    dev = parse_device(device)
    if dev.type == "cuda":  # --device cuda:N: allocations, streams and graphs on that GPU, not GPU 0
        torch.cuda.set_device(dev)
    n_threads = set_threads(threads, dev)
    dt = parse_dtype(dtype) if dtype else default_dtype(dev)
    packaged = None
    if model is None and (preset or default_preset()) in TRAINED_PRESETS:
        packaged, preset = preset or default_preset(), None
        if tokenizer is not None:
            raise ValueError(f"--tokenizer goes with --model; the {packaged} preset brings its own audio tokenizer")
        model, tokenizer = (str(d) for d in preset_dirs(packaged))  # loaded as the checkpoint it is
    if model is None:
        preset = preset or "tiny"
        if preset not in CODEC_PRESET:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(CODEC_PRESET)}")
        lm, _, text_tokenizer = build_preset(preset, dt, dev)
    else:
        if preset is not None:
            raise ValueError("give --model or --preset, not both")
        lm, _, text_tokenizer = load_lm(model, dtype=dt, device=dev)
    card = model_card(model, preset, packaged)
    name = card.name
    if tokenizer is not None:
        codec = load_audio_tokenizer(tokenizer, dtype=dt, device=dev, streaming_prior=codec_prior)
    else:
        if model is not None:
            raise ValueError("a checkpoint --model needs its audio tokenizer: pass --tokenizer DIR or hub id "
                             "(e.g. XiaomiMiMo/MiMo-Audio-Tokenizer)")
        codec = load_audio_tokenizer(None, preset=CODEC_PRESET[preset], dtype=dt, device=dev)
    lm.eval()
    codec.eval()
    rt = Runtime(lm, text_tokenizer, codec, name, preset, dev, dt, load_s=time.perf_counter() - t0)
    rt.info = {
        "model": name, "preset": preset or packaged, "weights": card.weights, "device": str(dev),
        "dtype": str(dt).removeprefix("torch."),
        "threads": n_threads,
        "lm_parameters": sum(p.numel() for p in lm.parameters()),
        "codec_parameters": sum(p.numel() for p in codec.parameters()),
        "model_card": card.as_dict(),
    }
    rt.card = card
    rt.model_dir = model
    return rt
