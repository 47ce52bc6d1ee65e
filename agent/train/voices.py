"""Speech from the synthesisers Debian installs (espeak-ng, flite, festival), augmented with sox.

A voice is named ``engine:name``: ``espeak-ng:en-us+f3`` (a language/accent and a variant),
``flite:slt``, ``festival:cmu_us_slt_arctic_hts``. Each engine writes a WAV at its own rate; sox
then shifts the pitch, changes the tempo, adds a room (its ``reverb``), sets the peak level and
converts to 24 kHz pcm16, without dither, so the same recipe gives the same bytes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

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
        return asdict(self)


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
