"""Reading audio files and preparing samples."""

from __future__ import annotations

import struct
import wave

import numpy as np
import pytest

from agent.codec import AudioError, load_wav, write_wav
from agent.codec.audio import read_audio_file

from .conftest import DATA


def _write_pcm(path, samples: np.ndarray, rate: int, width: int) -> None:
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    scale = float(1 << (8 * width - 1))
    ints = np.clip(np.round(samples * scale), -scale, scale - 1).astype(np.int64).reshape(-1)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    else:
        raw = ints.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_wav_widths(tmp_path, width):
    t = np.arange(1600) / 16000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    _write_pcm(tmp_path / "a.wav", tone, 16000, width)
    samples, rate = read_audio_file(tmp_path / "a.wav")
    assert rate == 16000 and samples.dtype == np.float32
    np.testing.assert_allclose(samples, tone, atol=2.0 ** (1 - 8 * width) + 1e-7)


def test_stereo_48k_is_downmixed_and_resampled(tmp_path):
    t = np.arange(48000) / 48000
    left, right = 0.4 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 300 * t)
    _write_pcm(tmp_path / "s.wav", np.stack([left, right], axis=1), 48000, 2)
    wav = load_wav(tmp_path / "s.wav")
    assert wav.shape == (24000,) and wav.dtype == np.float32
    # the mean of the channels: a 300 Hz tone of amplitude 0.3
    assert abs(np.abs(wav[1000:-1000]).max() - 0.3) < 2e-3


def test_float_wav_goes_through_pyav(tmp_path):
    pytest.importorskip("av", reason="PyAV decodes non-PCM files")
    tone = (0.25 * np.sin(2 * np.pi * 200 * np.arange(2400) / 24000)).astype("<f4")
    data = tone.tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 3, 1, 24000, 24000 * 4, 4, 32
    ) + b"data" + struct.pack("<I", len(data))
    (tmp_path / "f.wav").write_bytes(header + data)
    np.testing.assert_allclose(load_wav(tmp_path / "f.wav"), tone, atol=1e-6)


def test_write_then_read(tmp_path):
    speech = load_wav(DATA / "speech_en.wav")
    assert speech.shape == (48000,)
    write_wav(tmp_path / "out.wav", speech)
    np.testing.assert_allclose(load_wav(tmp_path / "out.wav"), speech, atol=1 / 32767)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(AudioError, match="no such audio file"):
        load_wav(tmp_path / "nope.wav")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match=r"junk\.wav"):
        load_wav(tmp_path / "junk.wav")
