"""Learned end of turn for ``semantic_vad``: Pipecat's Smart Turn v3.2 (BSD-2), an 8 M-parameter
Whisper-Tiny encoder with a linear head, int8 ONNX, that reads the last 8 s of a turn (16 kHz) and
says how likely it is that the speaker has finished.

Getting the model: it ships inside the ``pipecat-ai`` wheel, whose own requirements (``onnxruntime``,
the same module as our ``onnxruntime-gpu``, and numba) must not be installed next to ours. So
``mimo-agent fetch-turn-model`` downloads that wheel alone (``pip download --no-deps``), takes only
the ONNX file out of it, checks its sha256 and keeps it in the cache (:func:`cache_dir`). The
server finds the model (:func:`find_model`) at ``--turn-model`` / ``MIMO_TURN_MODEL``, in the cache,
or inside an installed ``pipecat`` package.

Features are computed here (:func:`whisper_features`, numpy): Whisper's log-mel (80 Slaney mel bins,
25 ms Hann windows every 10 ms, log10, clamped 8 below the maximum, scaled to about [-1, 1]) of the
last 8 s, zero-padded in front, the waveform normalised to zero mean and unit variance first, as
the model's reference preprocessing does (``tests/streaming/test_turn_model.py`` compares both on
the same audio).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MODEL_NAME = "smart-turn-v3.2-cpu.onnx"
MODEL_SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
PIPECAT_WHEEL = "pipecat-ai==1.14.0"
MODEL_IN_WHEEL = f"pipecat/audio/turn/smart_turn/data/{MODEL_NAME}"
ENV_MODEL = "MIMO_TURN_MODEL"

RATE = 16000
WINDOW_S = 8  # the model reads the last 8 s of the turn
N_FFT, HOP, N_MELS = 400, 160, 80
FRAMES = WINDOW_S * RATE // HOP  # 800


class TurnModelMissing(RuntimeError):
    """No end-of-turn model file: the message says how to get one."""


def cache_dir() -> Path:
    """Where fetched models live: ``$MIMO_AGENT_CACHE``, else ``$XDG_CACHE_HOME/mimo-agent``
    (``~/.cache/mimo-agent``)."""
    if os.environ.get("MIMO_AGENT_CACHE"):
        return Path(os.environ["MIMO_AGENT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mimo-agent"


def _in_pipecat() -> Path | None:
    """The model inside an installed ``pipecat`` package, found without importing it."""
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).parent / MODEL_IN_WHEEL
    return path if path.is_file() else None


def find_model(path: str | Path | None = None) -> Path:
    """The Smart Turn ONNX file: ``path``, else ``$MIMO_TURN_MODEL``, else the cache, else an
    installed ``pipecat``. Raises :class:`TurnModelMissing` naming the command that fetches it."""
    given = path or os.environ.get(ENV_MODEL)
    if given:
        if not Path(given).is_file():
            raise TurnModelMissing(f"end-of-turn model {given}: no such file")
        return Path(given)
    cached = cache_dir() / MODEL_NAME
    if cached.is_file():
        return cached
    found = _in_pipecat()
    if found is not None:
        return found
    raise TurnModelMissing(
        f"semantic_vad needs the Smart Turn model ({MODEL_NAME}), which is not in {cache_dir()} nor in an "
        f"installed pipecat-ai: run `mimo-agent fetch-turn-model` (downloads the {PIPECAT_WHEEL} wheel without "
        f"its dependencies and keeps only the model), or give its path with --turn-model / ${ENV_MODEL}"
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_model(dest_dir: str | Path | None = None, wheel_dir: str | Path | None = None) -> Path:
    """Download the ``pipecat-ai`` wheel with pip (no dependencies; or take it from ``wheel_dir``),
    extract the model into ``dest_dir`` (the cache by default) and check its sha256. Idempotent."""
    dest = Path(dest_dir) if dest_dir else cache_dir()
    target = dest / MODEL_NAME
    if target.is_file() and _sha256(target) == MODEL_SHA256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        where = Path(wheel_dir) if wheel_dir else Path(tmp)
        if wheel_dir is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                   "--disable-pip-version-check", "-d", tmp, PIPECAT_WHEEL]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise TurnModelMissing(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-2000:]}")
        wheels = sorted(where.glob("pipecat_ai-*.whl"))
        if not wheels:
            raise TurnModelMissing(f"no pipecat_ai wheel in {where}")
        part = Path(tmp) / (MODEL_NAME + ".part")
        with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(MODEL_IN_WHEEL) as src:
            part.write_bytes(src.read())
        got = _sha256(part)
        if got != MODEL_SHA256:
            raise TurnModelMissing(f"{wheels[-1].name}: {MODEL_IN_WHEEL} has sha256 {got}, expected {MODEL_SHA256}")
        part.replace(target)
    return target


# ------------------------------------------------------------------------------------- features
def _slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, np.float64)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz < 1000.0, hz * 3.0 / 200.0, log_part)


def _slaney_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0)))


@functools.cache
def mel_filters() -> np.ndarray:
    """(n_fft // 2 + 1, 80) triangular filters, evenly spaced in Slaney mel from 0 to 8 kHz, each
    scaled to unit area (``norm="slaney"``), as Whisper's front end uses."""
    edges = _slaney_hz(np.linspace(_slaney_mel(0.0), _slaney_mel(RATE / 2), N_MELS + 2))  # (82,)
    bins = np.linspace(0, RATE / 2, N_FFT // 2 + 1)[:, None]  # (201, 1)
    rising = (bins - edges[None, :-2]) / np.diff(edges)[None, :-1]
    falling = (edges[None, 2:] - bins) / np.diff(edges)[None, 1:]
    tri = np.clip(np.minimum(rising, falling), 0.0, None)
    return tri * (2.0 / (edges[2:] - edges[:-2]))[None, :]


@functools.cache
def _hann() -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic


def last_window(audio16k: np.ndarray) -> np.ndarray:
    """The last 8 s of float audio, zero-padded in front to exactly 8 s."""
    x = np.asarray(audio16k, np.float32)[-WINDOW_S * RATE :]
    return np.pad(x, (WINDOW_S * RATE - len(x), 0))


def whisper_features(audio16k: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] at 16 kHz -> (80, 800) float32 log-mel of its last 8 s (module docstring)."""
    x = last_window(audio16k)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = sliding_window_view(padded, N_FFT)[::HOP][:FRAMES]  # the centred frames but the last
    power = np.abs(np.fft.rfft(frames * _hann(), axis=-1)) ** 2  # (800, 201)
    log_mel = np.log10(np.maximum(power @ mel_filters(), 1e-10)).T  # (80, 800)
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return ((log_mel + 4.0) / 4.0).astype(np.float32)


# ---------------------------------------------------------------------------------------- model
class SmartTurn:
    """The ONNX model on the CPU, one thread per call (calls from several threads are safe)."""

    def __init__(self, path: str | Path | None = None) -> None:
        import onnxruntime as ort

        self.path = find_model(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def probability(self, audio16k: np.ndarray) -> float:
        """P(the speaker has finished) from float audio at 16 kHz (the turn so far, its pause included)."""
        features = whisper_features(audio16k)[None]
        return float(self._session.run(None, {"input_features": features})[0][0, 0])


@functools.cache
def shared_model(path: str | None = None) -> SmartTurn:
    """One loaded model per file for the whole process."""
    return SmartTurn(path)


class TurnScorer:
    """Runs the end-of-turn model for the server, away from its event loop: one worker thread, the
    calls of every session in order of arrival. (Not batched: on a CPU a batch of 4 costs what 4
    single calls cost, ~90 ms each, BENCHMARKS.md.) The model loads on the first call, on that
    thread."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="turn-model")

    def score(self, audio16k: np.ndarray) -> concurrent.futures.Future[float]:
        """P(the speaker has finished) of ``audio16k`` (float, 16 kHz), later."""
        return self._pool.submit(lambda: shared_model(self.path).probability(audio16k))


@functools.cache
def default_scorer() -> TurnScorer:
    """The process's scorer for bridges built without one (the app gives each bridge its own)."""
    return TurnScorer()


# ------------------------------------------------------------------------------------------ cli
def add_arguments(parser, command: str) -> None:
    parser.add_argument("--dir", default=None, help=f"where to keep it (default: {cache_dir()})")
    parser.add_argument("--wheel-dir", default=None,
                        help="take the pipecat_ai wheel from this directory instead of downloading it")


def run(args) -> int:
    try:
        path = fetch_model(args.dir, args.wheel_dir)
    except TurnModelMissing as exc:
        print(f"mimo-agent fetch-turn-model: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
