"""Offline commands: ``mimo-agent tts | asr | dialogue | continue``.

One prompt in, one response out, streamed to the terminal as it is generated (text deltas on
stdout, a summary on stderr). Works on a checkpoint (``--model DIR`` or a hub id) or a preset
(``--preset tiny``, random weights).

Audio goes in and out as audio files (wav and the formats ``agent.codec.load_wav`` reads, any
rate or channel count, resampled to 24 kHz mono) through the audio tokenizer: ``--tokenizer DIR``
with a checkpoint, the matching preset otherwise. RVQ codes (``.npy`` arrays [T, 8] at 25 Hz) work
too, in and out, and need no audio tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agent.checkpoint import load_lm, parse_device, parse_dtype
from agent.lm.generation import GenerationControls, Mode, parse_interleave, task_stop_ids
from agent.lm.model import MiMoAudioLM, build_preset
from agent.lm.prompts import DEFAULT_SYSTEM_PROMPT, Prompt, PromptBuilder, pad_codes_to_patches
from agent.lm.sampling import GREEDY, ChannelSampling, task_sampling
from agent.lm.session import LMSession, ResponseCollector
from agent.lm.tokenizer import TextTokenizer
from agent.model_card import ModelCard, model_card

#: command -> official task name (sampling defaults and stop tokens)
TASKS = {"tts": "tts", "asr": "asr", "dialogue": "spoken_dialogue", "continue": "continuation"}
#: response budget in patches (160 ms each) when --max-patches is not given
PRESET_MAX_PATCHES = 100  # random weights never stop on their own
CHECKPOINT_MAX_PATCHES = 8192  # the official default


@dataclass(frozen=True)
class AudioCodec:
    """Turns audio files into RVQ codes [T, 8] and codes back into audio files."""

    wav_to_codes: Callable[[str], np.ndarray]
    codes_to_wav: Callable[[np.ndarray, str], None]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="checkpoint directory or Hugging Face hub id (default: none, the preset)")
    from agent.presets import ALL_PRESETS, default_preset

    model.add_argument(
        "--preset", choices=ALL_PRESETS, help="built-in model: tiny-speech (trained, packaged), tiny or mimo-audio-7b "
        f"(random weights) (default: {default_preset()}, in this install)"
    )
    parser.add_argument(
        "--tokenizer", help="MiMo-Audio-Tokenizer checkpoint (directory or hub id) for audio files (default: the "
        "preset's own; with --model, none: .npy codes only)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--dtype", default=None, help="bf16 or fp32 (default: bf16 on CUDA, fp32 on CPU; fp16 is refused for the LM)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: 1 for presets on a CPU, else torch's)",
    )
    parser.add_argument("--max-patches", type=int, default=None,
                        help=f"response budget in 160 ms patches (default: {PRESET_MAX_PATCHES} for presets, "
                             f"{CHECKPOINT_MAX_PATCHES} for checkpoints)")
    parser.add_argument(
        "--min-patches",
        type=int,
        default=None,
        help="no stop token before this many patches (default: 0; for presets the whole budget, since "
        "random weights would stop at a random point)",
    )
    parser.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=None,
        help="text/speech choice per patch (default: free for checkpoints, interleave for presets)",
    )
    parser.add_argument("--interleave", default="5:5", help="N:M text:speech patches for --mode interleave")
    parser.add_argument(
        "--greedy", action="store_true", help="greedy text and codes instead of the task defaults"
    )
    if command == "tts":
        parser.add_argument("--text", required=True, help="the text to speak")
        parser.add_argument("--instruct", help="a style instruction (the model thinks first, then speaks; "
                                               "default: none, plain TTS)")
        parser.add_argument("--voice", help="voice prompt audio (a wav, or .npy codes) for --instruct (default: none)")
    else:
        parser.add_argument("--input", required=True, help="input audio (a wav, or .npy codes [T, 8])")
    if command == "dialogue":
        parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                            help="the system prompt ('' for none; default: the official one, %(default)r)")
        parser.add_argument("--voice", help="voice prompt audio (a wav, or .npy codes; default: none, the model's "
                                            "own voice)")
    if command != "asr":
        parser.add_argument("--out", help="where to write the response audio: .wav, or .npy codes [T, 8] "
                                          "(default: none, the audio is not kept)")


def run(args: argparse.Namespace) -> int:
    try:
        codec = audio_codec(args)
    except (ValueError, OSError) as exc:
        print(f"mimo-agent {args.command}: {exc}", file=sys.stderr)
        return 2
    return run_offline(args, codec=codec)


def audio_codec(args: argparse.Namespace) -> AudioCodec | None:
    """The audio tokenizer as an :class:`AudioCodec`: ``--tokenizer``, or the preset's own; None
    for a checkpoint without ``--tokenizer`` (then only ``.npy`` codes are accepted)."""
    from agent.codec import load_audio_tokenizer, load_wav, write_wav
    from agent.runtime import CODEC_PRESET

    model, tokenizer, preset = resolve_model(args)
    if tokenizer:
        tok = load_audio_tokenizer(tokenizer, dtype=args.dtype, device=args.device)
    elif model:
        return None
    else:
        tok = load_audio_tokenizer(None, preset=CODEC_PRESET[preset], dtype=args.dtype, device=args.device)

    def wav_to_codes(path: str) -> np.ndarray:
        return tok.encode(load_wav(path)).numpy()

    def codes_to_wav(codes: np.ndarray, path: str) -> None:
        audio = tok.decode(codes) if len(codes) else np.zeros(0, np.float32)
        write_wav(path, audio)

    return AudioCodec(wav_to_codes, codes_to_wav)


def run_offline(args: argparse.Namespace, codec: AudioCodec | None = None) -> int:
    """Run one offline command; see :func:`add_arguments` for ``args``."""
    try:
        lm, tokenizer, is_preset, card = _load_model(args)
        # which model runs and what to expect of it (the line `serve` logs at start-up), first
        print(f"[model {card.describe()}]", file=sys.stderr)
        builder = PromptBuilder(tokenizer, lm.config)
        prompt = _build_prompt(args.command, args, builder, codec)
        out = getattr(args, "out", None)
        if out:
            check_output_path(out, codec)
    except (ValueError, OSError) as exc:
        print(f"mimo-agent {args.command}: {exc}", file=sys.stderr)
        return 2
    task = TASKS[args.command]
    budget = args.max_patches or (PRESET_MAX_PATCHES if is_preset else CHECKPOINT_MAX_PATCHES)
    budget = min(budget, lm.config.max_position_embeddings - len(prompt) - 1)
    if budget < 1:
        print(
            f"mimo-agent {args.command}: the prompt ({len(prompt)} patches) fills the context",
            file=sys.stderr,
        )
        return 2
    default_mode = Mode.TEXT if task == "asr" else (Mode.INTERLEAVE if is_preset else Mode.FREE)
    mode = Mode(args.mode or default_mode)
    n, m = parse_interleave(args.interleave)
    controls = GenerationControls(
        mode=mode,
        text_patches=n,
        speech_patches=m,
        stop_ids=task_stop_ids(task, tokenizer.specials),
        max_patches=budget,
        min_patches=budget if args.min_patches is None and is_preset else min(args.min_patches or 0, budget),
    )
    sampling = ChannelSampling(GREEDY, GREEDY) if args.greedy else task_sampling(task)

    start = time.perf_counter()
    response, session = respond(lm, tokenizer, prompt, controls, sampling, seed=args.seed,
                                on_text=lambda text: print(text, end="", flush=True))
    print(flush=True)
    elapsed = time.perf_counter() - start

    codes = response.codes()
    if out:
        _write_audio(codes, out, codec)
        kept = f"; audio written to {out}"
    else:
        kept = "; audio not kept (--out FILE.wav writes it)" if args.command != "asr" else ""
    patches = response.patches
    print(
        f"[{patches} patches ({response.speech_patches} speech, {codes.shape[0]} frames = "
        f"{codes.shape[0] / 25:.2f} s of audio) in {elapsed:.2f} s, "
        f"{patches / max(elapsed, 1e-9):.1f} patches/s; "
        f"prompt {len(prompt)} patches; stop: {session.stop_reason}{kept}]",
        file=sys.stderr,
    )
    return 0


def respond(lm: MiMoAudioLM, tokenizer: TextTokenizer, prompt: Prompt, controls: GenerationControls,
            sampling: ChannelSampling, *, seed: int = 0,
            on_text: Callable[[str], None] | None = None) -> tuple[ResponseCollector, LMSession]:
    """Generate the response to ``prompt`` (what every offline command and ``bench-quality``'s TTS
    run); ``on_text`` gets the readable text as it is decoded."""
    session = LMSession.create(lm, tokenizer, max_positions=len(prompt) + controls.max_patches + 1, seed=seed)
    session.feed(prompt)
    response = ResponseCollector(tokenizer, lm.config.audio_channels)
    for patch in session.generate(controls, sampling):
        text = response.add(patch)
        if on_text is not None:
            on_text(text)
    tail = response.finish()
    if on_text is not None:
        on_text(tail)
    return response, session


#: what ``--out`` writes, by file name ending
OUTPUT_SUFFIXES = {".wav": "a 24 kHz pcm16 wav", ".npy": "the RVQ codes [T, 8]"}


def check_output_path(out: str, codec: AudioCodec | None) -> None:
    """Refuse an ``--out`` that could not be written before anything is generated: a format this
    command does not write (never a wav under another name), a directory that is not there."""
    path = Path(out)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        kinds = ", ".join(f"{suffix} ({what})" for suffix, what in OUTPUT_SUFFIXES.items())
        raise ValueError(f"{out}: cannot write {path.suffix or 'a file without an extension'}; use {kinds}")
    if path.suffix.lower() != ".npy" and codec is None:
        raise ValueError(
            f"{out}: writing audio files needs the audio tokenizer (--tokenizer DIR); or use a .npy path"
        )
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{out}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{out}: the directory {parent} is not writable")
    if path.is_dir():
        raise ValueError(f"{out} is a directory; give a file name")


# ---------------------------------------------------------------------------------- helpers
def resolve_model(args: argparse.Namespace) -> tuple[str | None, str | None, str]:
    """(LM checkpoint, audio tokenizer checkpoint, random-weight preset) that ``--model``,
    ``--tokenizer`` and ``--preset`` name: a packaged preset (``tiny-speech``, the default when
    installed) is its two checkpoint directories, loaded as any checkpoint."""
    from agent.presets import TRAINED_PRESETS, default_preset, preset_dirs

    preset = args.preset or ("tiny" if args.model else default_preset())
    if args.model or preset not in TRAINED_PRESETS:
        return args.model, args.tokenizer, preset
    if args.tokenizer:
        raise ValueError(f"--tokenizer goes with --model; the {preset} preset brings its own audio tokenizer")
    lm_dir, codec_dir = preset_dirs(preset)
    return str(lm_dir), str(codec_dir), preset


def _load_model(args: argparse.Namespace) -> tuple[MiMoAudioLM, TextTokenizer, bool, ModelCard]:
    """(LM, text tokenizer, whether it is a random-weight preset, its card)."""
    device = parse_device(args.device)
    model, _, preset = resolve_model(args)
    if args.threads or (device.type == "cpu" and not args.model):
        torch.set_num_threads(args.threads or 1)  # small models: more threads only add sync overhead
    dtype = (
        parse_dtype(args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    if model:
        lm, _, tokenizer = load_lm(model, dtype, device)
        # a packaged preset is its checkpoint directory, named without --model
        return lm, tokenizer, False, model_card(model, None, None if args.model else preset)
    lm, _, tokenizer = build_preset(preset, dtype, device)
    return lm, tokenizer, True, model_card(None, preset, None)

def _build_prompt(
    command: str, args: argparse.Namespace, b: PromptBuilder, codec: AudioCodec | None
) -> Prompt:
    if command == "tts":
        if not args.text.strip():
            raise ValueError("--text is empty: give the text to speak")
        voice = _read_codes(args.voice, codec, b) if args.voice else None
        if voice is not None and args.instruct is None:
            raise ValueError("--voice needs --instruct (the official plain TTS prompt has no voice prompt)")
        return b.tts(args.text, instruct=args.instruct, voice_codes=voice)
    codes = _read_codes(args.input, codec, b)
    if command == "asr":
        return b.asr(codes)
    if command == "dialogue":
        voice = _read_codes(args.voice, codec, b) if args.voice else None
        return b.spoken_dialogue(codes, system_prompt=args.system_prompt or None, voice_codes=voice)
    if command == "continue":
        return b.continuation(codes)
    raise ValueError(f"unknown offline command {command!r}")


def _read_codes(path: str, codec: AudioCodec | None, b: PromptBuilder) -> torch.Tensor:
    if Path(path).suffix == ".npy":
        codes = np.load(path)
    elif codec is not None:
        codes = codec.wav_to_codes(path)
    else:
        raise ValueError(
            f"{path}: audio files need the audio tokenizer (--tokenizer DIR); or pass RVQ codes as .npy [T, 8]"
        )
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != b.channels or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(
            f"{path}: RVQ codes must be an integer array [T, {b.channels}], got {codes.dtype} {codes.shape}"
        )
    return pad_codes_to_patches(codes, b.group_size)


def _write_audio(codes: np.ndarray, path: str, codec: AudioCodec | None) -> None:
    """Write what :func:`check_output_path` accepted."""
    if Path(path).suffix.lower() == ".npy":
        with open(path, "wb") as f:  # np.save(name) would add ".npy" to a name ending in ".NPY"
            np.save(f, codes)
    else:
        assert codec is not None
        codec.codes_to_wav(codes, path)
