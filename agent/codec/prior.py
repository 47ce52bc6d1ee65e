"""The streaming decode's calibrated GroupNorm prior, stored with a checkpoint (``streaming_prior.json``).

The decoder's two up-samplers normalise with statistics of the whole sequence, which a stream
cannot know at its start; a stream estimates them as it goes (running statistics). Starting that
estimate from the statistics of typical speech, weighted as a few tokens, brings the streamed
audio measurably closer to the offline decode (BENCHMARKS.md, "Streaming decode on the trained
weights"). The statistics depend on the weights, so they are calibrated per checkpoint
(``mimo-agent calibrate-codec``) and written next to it in their own file: the official files
(``config.json``, ``model.safetensors``) stay untouched, and a checkpoint without the file streams
with running statistics exactly as before.

The file (JSON object)::

    {"format": "mimo-agent streaming prior", "version": 1,
     "prior_tokens": 10,                        # weight of the prior, in 25 Hz tokens (K)
     "norms": {"decoder.dconv1.norm": {"num_groups": 1, "mean": [m], "var": [v]},
               "decoder.dconv2.norm": {"num_groups": 1, "mean": [m], "var": [v]}},
     "checkpoint_fingerprint": "...",           # agent.checkpoint.checkpoint_fingerprint of the weights
     "calibration": {"command": "...", ...}}    # recipe and data: how to make it again

``mean``/``var`` hold one value per group of the GroupNorm (the official decoder's are
``GroupNorm(1, C)``: one): the mean and (biased) variance of the norm's input over all channels
and frames of the calibration utterances' offline decodes, pooled. A stream of norm
``"checkpoint"`` (the default :class:`~agent.codec.streaming.DecodeSchedule`) starts its running
statistics from them as pseudo-moments worth ``prior_tokens`` tokens of frames.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import checkpoint as ckpt
from .streaming import NormStatistics, norm_statistics

if TYPE_CHECKING:
    from .tokenizer import MiMoAudioTokenizer

PRIOR_NAME = "streaming_prior.json"
FORMAT = "mimo-agent streaming prior"
VERSION = 1
#: the GroupNorms a stream cannot compute exactly, by their names in the checkpoint, and the
#: :class:`NormStatistics` fields that hold their (mean, var)
NORMS = {"decoder.dconv1.norm": ("mean1", "var1"), "decoder.dconv2.norm": ("mean2", "var2")}
#: prior weight in tokens that ``calibrate-codec`` writes unless told otherwise (BENCHMARKS.md: 10
#: tokens was the best on the recordings and held-out voices together for the tiny-speech codec)
DEFAULT_PRIOR_TOKENS = 10


class StreamingPriorError(ckpt.CheckpointError):
    """A ``streaming_prior.json`` that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class StreamingPrior:
    """Calibrated GroupNorm statistics of a checkpoint, and their weight as a number of tokens."""

    statistics: NormStatistics
    tokens: int = DEFAULT_PRIOR_TOKENS
    #: the recipe and data it was calibrated with (written to the file, not used to decode)
    calibration: dict[str, Any] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        """One line for the start-up log."""
        data = self.calibration.get("data") or "audio files"
        return (f"the codec's calibrated GroupNorm prior ({PRIOR_NAME}: {self.tokens} tokens' weight, "
                f"{self.calibration.get('utterances', '?')} utterances of {data})")

    def to_json(self, fingerprint: str) -> dict[str, Any]:
        s = self.statistics
        norms = {name: {"num_groups": 1, "mean": [getattr(s, m)], "var": [getattr(s, v)]}
                 for name, (m, v) in NORMS.items()}
        return {"format": FORMAT, "version": VERSION, "prior_tokens": self.tokens, "norms": norms,
                "checkpoint_fingerprint": fingerprint, "calibration": self.calibration}


def describe_streaming(prior: StreamingPrior | None) -> str:
    """What a default audio stream starts its GroupNorm statistics from, in words."""
    if prior is None:
        return f"running GroupNorm statistics only (no {PRIOR_NAME}, or turned off)"
    return prior.describe()


def save_streaming_prior(directory: str | os.PathLike, prior: StreamingPrior) -> Path:
    """Write ``prior`` as the checkpoint's ``streaming_prior.json`` (tied to its weights)."""
    path = Path(directory) / PRIOR_NAME
    path.write_text(json.dumps(prior.to_json(ckpt.checkpoint_fingerprint(directory)), indent=1) + "\n")
    return path


def load_streaming_prior(directory: str | os.PathLike, tok: MiMoAudioTokenizer) -> StreamingPrior | None:
    """The checkpoint's calibrated prior, or None when it has no ``streaming_prior.json``.

    Raises :class:`StreamingPriorError` naming the file and field when the file is not a prior of
    this checkpoint: bad JSON, a missing or malformed field, norms or group counts other than the
    decoder's, or a fingerprint of other weights (calibrated before the checkpoint changed).
    """
    path = Path(directory) / PRIOR_NAME
    if not path.exists():
        return None
    try:
        data = ckpt.read_json(path, "streaming prior")
    except ckpt.CheckpointError as exc:
        raise StreamingPriorError(str(exc)) from None

    def bad(where: str, why: str) -> StreamingPriorError:
        return StreamingPriorError(f"{path}: field {where!r} {why} (calibrate it again: mimo-agent "
                                   f"calibrate-codec --checkpoint {directory}; or delete the file to stream "
                                   f"with running statistics)")

    if data.get("format") != FORMAT:
        raise bad("format", f"must be {FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != VERSION:
        raise bad("version", f"must be {VERSION}, got {data.get('version')!r}")
    tokens = data.get("prior_tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise bad("prior_tokens", f"must be a whole number of tokens >= 1, got {tokens!r}")
    norms = data.get("norms")
    if not isinstance(norms, dict) or set(norms) != set(NORMS):
        got = sorted(norms) if isinstance(norms, dict) else norms
        raise bad("norms", f"must name exactly the decoder's streamed GroupNorms {sorted(NORMS)}, got {got!r}")
    try:
        _check_one_group(tok)
    except ValueError as exc:
        raise bad("norms", f"cannot apply to this checkpoint: {exc}") from None
    values: dict[str, float] = {}
    groups = 1
    for name, fields in NORMS.items():
        entry = norms[name]
        if not isinstance(entry, dict) or entry.get("num_groups") != groups:
            raise bad(f"norms.{name}.num_groups", f"must be this checkpoint's {groups}, got "
                      f"{entry.get('num_groups') if isinstance(entry, dict) else entry!r}")
        for key, attr in zip(("mean", "var"), fields, strict=True):
            value = entry.get(key)
            ok = (isinstance(value, list) and len(value) == groups
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                          for x in value))
            if not ok or (key == "var" and min(value) < 0):
                raise bad(f"norms.{name}.{key}", f"must be a list of {groups} finite number(s)"
                          + (" >= 0" if key == "var" else "") + f", got {value!r}")
            values[attr] = float(value[0])
    fingerprint = ckpt.checkpoint_fingerprint(directory)
    if data.get("checkpoint_fingerprint") != fingerprint:
        raise bad("checkpoint_fingerprint", f"is {data.get('checkpoint_fingerprint')!r} but the weights in "
                  f"{directory} are {fingerprint!r}: it was calibrated on other weights")
    calibration = data.get("calibration", {})
    return StreamingPrior(NormStatistics(**values), tokens, calibration if isinstance(calibration, dict) else {})


def _check_one_group(tok: MiMoAudioTokenizer) -> None:
    """Streams keep one (mean, var) per norm (:class:`NormStatistics`): the official decoder's
    ``GroupNorm(1, C)``. Raises ValueError naming a norm with more groups."""
    for name in NORMS:
        groups = tok.get_submodule(name).num_groups
        if groups != 1:
            raise ValueError(f"{name} has {groups} groups; streaming statistics need 1")


def calibrate(tok: MiMoAudioTokenizer, audio: list[np.ndarray], n_q: int, tokens: int = DEFAULT_PRIOR_TOKENS,
              calibration: dict[str, Any] | None = None) -> StreamingPrior:
    """The prior of ``audio`` (24 kHz utterances): the offline decode's GroupNorm statistics over
    all of them (encoded with ``n_q`` codebooks, what the streams will decode), weighted as
    ``tokens`` tokens."""
    _check_one_group(tok)
    stats = norm_statistics(tok, [tok.encode(a, n_q=n_q) for a in audio])
    return StreamingPrior(stats, tokens, dict(calibration or {}))


# --- mimo-agent calibrate-codec -------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    from .tokenizer import LM_CODEBOOKS

    add = parser.add_argument
    add("--checkpoint", required=True, help="codec checkpoint directory: streaming_prior.json is written there")
    add("--data", help="a corpus of `mimo-agent train data`: utterances are drawn from its --split")
    add("--split", default="train", choices=["train", "held_out"], help="the corpus split to draw from")
    add("--audio", nargs="*", default=[], help="audio files (any rate) calibrated on, all of them")
    add("--utterances", type=int, default=60, help="utterances drawn from the corpus (seeded)")
    add("--seed", type=int, default=0, help="seed of the draw")
    add("--prior-tokens", type=int, default=DEFAULT_PRIOR_TOKENS,
        help="weight of the prior in 25 Hz tokens (K): how long a stream leans on it")
    add("--codebooks", type=int, default=LM_CODEBOOKS,
        help="codebooks the calibration audio is encoded with (what the LM's streams decode)")
    add("--threads", type=int, default=1, help="torch CPU threads")


def command_line(args: argparse.Namespace) -> str:
    """The command that writes the same file (recorded in it)."""
    parts = ["mimo-agent", "calibrate-codec", "--checkpoint", str(args.checkpoint)]
    if args.data:
        parts += ["--data", str(args.data), "--split", args.split, "--utterances", str(args.utterances),
                  "--seed", str(args.seed)]
    if args.audio:
        parts += ["--audio", *map(str, args.audio)]
    parts += ["--prior-tokens", str(args.prior_tokens), "--codebooks", str(args.codebooks)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from .audio import load_wav
    from .tokenizer import load_audio_tokenizer

    if not args.data and not args.audio:
        raise SystemExit("calibrate-codec: give --data (a corpus) and/or --audio files")
    if args.prior_tokens < 1 or args.utterances < 1:
        raise SystemExit("calibrate-codec: --prior-tokens and --utterances must be at least 1")
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    tok = load_audio_tokenizer(args.checkpoint, dtype=torch.float32, device="cpu", streaming_prior=False)
    audio, sources = [], []
    if args.data:
        from ..train.data import load_entries, split_entries

        entries = split_entries(args.data, args.split)
        if args.utterances > len(entries):
            raise SystemExit(f"calibrate-codec: --utterances {args.utterances} but the {args.split} split of "
                             f"{args.data} has {len(entries)}")
        pick = np.random.default_rng(args.seed).choice(len(entries), args.utterances, replace=False)
        loaded = load_entries(args.data, [entries[i] for i in pick], tok.sample_rate)
        audio += [a for _, a in loaded]
        sources += [u["file"] for u, _ in loaded]
    for path in args.audio:
        audio.append(load_wav(path, tok.sample_rate))
        sources.append(str(path))
    seconds = sum(a.size for a in audio) / tok.sample_rate
    calibration = {"command": command_line(args), "data": args.data, "split": args.split if args.data else None,
                   "seed": args.seed if args.data else None, "utterances": len(audio),
                   "audio_seconds": round(seconds, 2), "codebooks": args.codebooks, "files": sources}
    prior = calibrate(tok, audio, args.codebooks, args.prior_tokens, calibration)
    path = save_streaming_prior(args.checkpoint, prior)
    s = prior.statistics
    print(f"{path}: dconv1 mean {s.mean1:.4f} var {s.var1:.4f}, dconv2 mean {s.mean2:.4f} var {s.var2:.4f}, "
          f"weighted as {prior.tokens} tokens; {len(audio)} utterances, {seconds:.1f} s of audio "
          f"({time.monotonic() - started:.0f} s)")
    return 0
