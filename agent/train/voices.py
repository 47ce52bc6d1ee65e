"""Speech from the synthesisers Debian installs (espeak-ng, flite, festival), augmented with sox.

A voice is named ``engine:name``: ``espeak-ng:en-us+f3`` (a language/accent and a variant),
``flite:slt``, ``festival:cmu_us_slt_arctic_hts``. Each engine writes a WAV at its own rate; sox
then shifts the pitch, changes the tempo, adds a room (its ``reverb``), sets the peak level and
converts to 24 kHz pcm16, without dither, so the same recipe gives the same bytes. A formant shift
(:func:`shift_formants`: another vocal-tract length at the same pitch, which no sox effect does)
comes first, on the raw voice, when the augmentation asks for one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ENGINES = ("espeak-ng", "flite", "festival")
#: the Debian packages that provide each engine (and sox), for error messages and CI
PACKAGES = {
    "espeak-ng": "espeak-ng",
    "flite": "flite",
    "festival": "festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts",
    "sox": "sox",
}


class VoiceError(RuntimeError):
    """A synthesiser or sox is missing or failed; the message names the command and the package."""


@dataclass(frozen=True)
class Augmentation:
    """sox effects applied to one utterance (all deterministic)."""

    pitch_cents: float = 0.0
    tempo: float = 1.0
    reverb: float = 0.0  # reverberance 0..100; 0 = no room
    room_scale: float = 0.0
    pre_delay_ms: float = 0.0
    peak_db: float = -1.0
    #: the spectral envelope's frequency scale (:func:`shift_formants`); 1.0 = none
    formant_shift: float = 1.0

    def effects(self) -> list[str]:
        out: list[str] = []
        if self.pitch_cents:
            out += ["pitch", f"{self.pitch_cents:.0f}"]
        if self.tempo != 1.0:
            out += ["tempo", "-s", f"{self.tempo:.3f}"]
        if self.reverb > 0:
            # sox's reverb makes two channels: mix them back before the level is set
            out += ["reverb", f"{self.reverb:.0f}", "50", f"{self.room_scale:.0f}", "100", f"{self.pre_delay_ms:.0f}",
                    "channels", "1"]
        return [*out, "norm", f"{self.peak_db:.1f}"]

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.formant_shift == 1.0:  # as recorded before formant shifts existed
            del out["formant_shift"]
        return out


def shift_formants(audio: np.ndarray, factor: float, sample_rate: int = 24000) -> np.ndarray:
    """``audio`` as if from a vocal tract ``1 / factor`` as long: its spectral envelope (the
    formants) moved by ``factor`` along the frequency axis, with the pitch, timing and phase kept.

    Short-time Fourier frames of about 40 ms (hop a quarter of that); each frame's envelope is its
    linear-prediction (all-pole) spectrum, which follows the formants and not the harmonics, and the
    frame is multiplied by the warped envelope over its own (the harmonics stay where they are);
    weighted overlap-add puts the frames back together.
    """
    if not 0.5 <= factor <= 2.0:
        raise ValueError(f"formant shift {factor} is outside 0.5..2")
    audio = np.asarray(audio, np.float64)
    nfft = 1 << int(np.ceil(np.log2(sample_rate * 0.04)))
    hop = nfft // 4
    order = sample_rate // 1000 + 4  # a formant (two poles) per kHz of the band, and a few for the source
    window = np.hanning(nfft + 1)[:-1]  # periodic: its squares overlap-add to a constant at this hop
    padded = np.pad(audio, (nfft, nfft + hop))
    count = 1 + (len(padded) - nfft) // hop
    frames = padded[np.arange(nfft)[None, :] + hop * np.arange(count)[:, None]] * window
    spectrum = np.fft.rfft(frames, axis=1)
    autocorr = np.fft.irfft(np.abs(spectrum) ** 2, n=nfft, axis=1)[:, : order + 1]
    autocorr[:, 0] = autocorr[:, 0] * (1 + 1e-4) + 1e-12  # a little white noise: silent frames stay solvable
    lags = np.abs(np.arange(order)[:, None] - np.arange(order)[None, :])
    predictor = np.linalg.solve(autocorr[:, lags], autocorr[:, 1:, None])[..., 0]
    inverse = np.fft.rfft(np.concatenate([np.ones((count, 1)), -predictor], axis=1), n=nfft, axis=1)
    envelope = -np.log(np.abs(inverse) + 1e-9)  # log magnitude, up to the frame's gain
    bins = np.arange(envelope.shape[1], dtype=np.float64)
    warped = np.stack([np.interp(bins / factor, bins, e) for e in envelope])
    frames = np.fft.irfft(spectrum * np.exp(np.clip(warped - envelope, -12.0, 12.0)), n=nfft, axis=1) * window
    out, weight = np.zeros(len(padded)), np.zeros(len(padded))
    for i, frame in enumerate(frames):
        out[i * hop : i * hop + nfft] += frame
        weight[i * hop : i * hop + nfft] += window**2
    return (out / np.maximum(weight, 1e-8))[nfft : nfft + len(audio)].astype(np.float32)


def split_voice(voice: str) -> tuple[str, str]:
    engine, sep, name = voice.partition(":")
    if not sep or engine not in ENGINES or not name:
        raise VoiceError(f"voice {voice!r} must be ENGINE:NAME with ENGINE one of {', '.join(ENGINES)}")
    return engine, name


def require(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        package = PACKAGES.get(command, command)
        raise VoiceError(f"{command} is not installed (Debian: apt-get install {package})")
    return path


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VoiceError(f"{what} failed ({' '.join(cmd[:3])} ...): {proc.stderr.strip()[-500:]}")


def _festival_voices() -> set[str]:
    roots = [Path("/usr/share/festival/voices")]
    return {p.name for root in roots if root.is_dir() for p in root.glob("*/*") if p.is_dir()}


def _flite_voices() -> set[str]:
    # flite falls back to its default voice for an unknown name: ask it for the list instead
    proc = subprocess.run([require("flite"), "-lv"], capture_output=True, text=True, check=False)
    return set(proc.stdout.partition(":")[2].split())


def synthesize_raw(voice: str, text: str, out: Path) -> None:
    """Write ``text`` spoken by ``voice`` to the WAV ``out`` at the engine's own rate."""
    engine, name = split_voice(voice)
    require(engine)
    if engine == "espeak-ng":
        _run([engine, "-v", name, "-w", str(out), "--", text], f"espeak-ng voice {name}")
    elif engine == "flite":
        if name not in _flite_voices():
            known = " ".join(sorted(_flite_voices()))
            raise VoiceError(f"flite voice {name} is not built in; flite -lv lists: {known}")
        _run([engine, "-voice", name, "-t", text, "-o", str(out)], f"flite voice {name}")
    else:
        if name not in _festival_voices():
            raise VoiceError(f"festival voice {name} is not installed (Debian: {PACKAGES['festival']})")
        require("text2wave")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        try:
            _run(["text2wave", "-eval", f"(voice_{name})", "-o", str(out), f.name], f"festival voice {name}")
        finally:
            os.unlink(f.name)
    if not out.is_file() or out.stat().st_size <= 44:
        raise VoiceError(f"{voice} produced no audio for {text!r}")


def synthesize(voice: str, text: str, out: str | os.PathLike, augment: Augmentation, sample_rate: int = 24000) -> None:
    """Write ``text`` spoken by ``voice``, augmented, as mono pcm16 at ``sample_rate`` to ``out``."""
    sox = require("sox")
    with tempfile.TemporaryDirectory(prefix="mimo-voice-") as tmp:
        raw = Path(tmp) / "raw.wav"
        synthesize_raw(voice, text, raw)
        if augment.formant_shift != 1.0:
            from ..codec.audio import load_wav, write_wav

            mono = Path(tmp) / "mono.wav"
            _run([sox, "-D", "-V1", str(raw), "-c", "1", "-b", "16", "-e", "signed-integer", "-r", str(sample_rate),
                  str(mono), "remix", "-", "rate", str(sample_rate)], "sox")
            shifted = shift_formants(load_wav(mono, sample_rate), augment.formant_shift, sample_rate)
            # at half scale (no clipping); the level is set at the end as for every utterance
            write_wav(raw, 0.5 * shifted / max(float(np.abs(shifted).max()), 1e-6), sample_rate)
        effects = augment.effects()  # the level (norm) last, after the rate conversion
        cmd = [sox, "-D", "-V1", str(raw), "-c", "1", "-b", "16", "-e", "signed-integer", "-r", str(sample_rate),
               os.fspath(out), "remix", "-", *effects[:-2], "rate", str(sample_rate), *effects[-2:]]
        _run(cmd, "sox")


def tool_versions() -> dict[str, str]:
    """First line of each installed tool's version, for the manifest (a recipe depends on them)."""
    probes = {"espeak-ng": ["--version"], "flite": ["--version"], "festival": ["--version"], "sox": ["--version"]}
    out = {}
    for tool, args in probes.items():
        path = shutil.which(tool)
        if path is None:
            out[tool] = "not installed"
            continue
        proc = subprocess.run([path, *args], capture_output=True, text=True, check=False)
        lines = (proc.stdout or proc.stderr).strip().splitlines()
        out[tool] = lines[0].strip() if lines else "unknown"
    return out
