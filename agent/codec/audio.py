"""Audio in: read files, check samples, down-mix to mono and resample to the tokenizer's rate.

As the official pipeline: the channels are averaged and the audio resampled with torchaudio's
default windowed sinc (:mod:`streaming.resample`, the same filter without torchaudio).
"""

from __future__ import annotations

import os
import wave

import numpy as np
import torch

from streaming.resample import resample as sinc_resample

#: Sample rates accepted as input (anything a sound card or codec produces).
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768_000
#: A 2-D array with more columns than this is taken to be channels-first by mistake.
MAX_CHANNELS = 16


class AudioError(ValueError):
    """Audio that cannot be used; the message says what is wrong with it."""


def as_mono_float(audio: np.ndarray | torch.Tensor, *, name: str = "audio") -> np.ndarray:
    """Samples as float32 mono: 1-D as is, 2-D (samples, channels) averaged over channels.

    int16 input is scaled to [-1, 1) (pcm16); other integer types, NaN and infinity are refused.
    """
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32768.0
    elif not np.issubdtype(audio.dtype, np.floating):
        raise AudioError(f"{name} must hold float samples (or int16 pcm), got dtype {audio.dtype}")
    if audio.ndim == 2:
        if audio.shape[1] > MAX_CHANNELS:
            raise AudioError(
                f"{name} has shape {audio.shape}: 2-D audio must be (samples, channels) with at most "
                f"{MAX_CHANNELS} channels; pass audio.T if it is channels-first"
            )
        if audio.shape[1] == 0:
            raise AudioError(f"{name} has shape {audio.shape}: no channels")
        audio = audio.mean(axis=1)
    elif audio.ndim != 1:
        raise AudioError(f"{name} must be 1-D (samples) or 2-D (samples, channels), got shape {audio.shape}")
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if not np.isfinite(audio).all():
        bad = int(np.size(audio) - np.isfinite(audio).sum())
        raise AudioError(f"{name} contains {bad} NaN or infinite sample(s)")
    return audio


def check_sample_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        if isinstance(sample_rate, float) and sample_rate.is_integer():
            sample_rate = int(sample_rate)
        else:
            raise AudioError(f"sample rate must be a whole number of Hz, got {sample_rate!r}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"sample rate {sample_rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    return int(sample_rate)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample mono float32 audio as the official pipeline does (torchaudio's default windowed
    sinc, :func:`streaming.resample.resample`); a no-op when the rates agree."""
    from_rate, to_rate = check_sample_rate(from_rate), check_sample_rate(to_rate)
    if from_rate == to_rate or audio.size == 0:
        return audio
    return sinc_resample(audio, from_rate, to_rate)


def prepare_audio(
    audio: np.ndarray | torch.Tensor, sample_rate: int | None, target_rate: int, *, name: str = "audio"
) -> np.ndarray:
    """Any float/int16 array, mono or (samples, channels), at any rate -> float32 mono at ``target_rate``.

    ``sample_rate=None`` means the audio is already at ``target_rate``.
    """
    mono = as_mono_float(audio, name=name)
    if sample_rate is None:
        return mono
    return resample(mono, sample_rate, target_rate)


def read_audio_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(float32 samples of shape (N,) or (N, channels), sample rate) of an audio file.

    PCM WAV (8/16/24/32-bit) is read with the standard library; other formats (float WAV, FLAC,
    MP3, Ogg ...) with PyAV when it is installed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"no such audio file: {path}")
    try:
        with wave.open(path, "rb") as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError):
        return _read_with_av(path)
    return _pcm_to_float(raw, width, channels), rate


def _pcm_to_float(raw: bytes, width: int, channels: int) -> np.ndarray:
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        samples = ints.astype(np.float32) / float(1 << 23)
    elif width == 4:
        samples = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    else:
        raise AudioError(f"unsupported WAV sample width: {width} bytes")
    return samples.reshape(-1, channels) if channels > 1 else samples


def _read_with_av(path: str) -> tuple[np.ndarray, int]:
    try:
        import av
    except ImportError:
        raise AudioError(f"{path} is not a PCM WAV file and PyAV is not installed to decode it") from None
    try:
        with av.open(path) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioError(f"{path} has no audio stream")
            rate = stream.rate
            chunks = [frame.to_ndarray() for frame in container.decode(stream)]
    except av.error.FFmpegError as exc:
        raise AudioError(f"cannot decode {path}: {exc}") from exc
    if not chunks:
        return np.zeros(0, np.float32), rate
    planar = [c if c.ndim == 2 else c[None] for c in chunks]
    data = np.concatenate(planar, axis=1)  # (channels or 1, N * packed channels)
    channels = stream.codec_context.channels or 1
    if data.shape[0] == 1 and channels > 1:  # packed (interleaved) layout
        data = data.reshape(-1, channels).T
    if np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    data = data.astype(np.float32).T  # (N, channels)
    return (data[:, 0] if data.shape[1] == 1 else data), rate


def load_wav(path: str | os.PathLike, sample_rate: int = 24000) -> np.ndarray:
    """An audio file as float32 mono at ``sample_rate`` (channels averaged, resampled as the
    official pipeline does)."""
    audio, rate = read_audio_file(path)
    return prepare_audio(audio, rate, sample_rate, name=os.fspath(path))


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = 24000) -> None:
    """Write mono float audio as pcm16 WAV (clipped to [-1, 1])."""
    pcm = (np.clip(as_mono_float(audio), -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(os.fspath(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
