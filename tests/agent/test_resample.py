"""Resampling to 24 kHz as the official pipeline does (torchaudio's default windowed sinc), without
torchaudio: compared with torchaudio's own output, stored in ``tests/data/resample_torchaudio.npz``
(see tests/data/README.md for how it was made)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from agent.codec.audio import load_wav, prepare_audio, read_audio_file
from streaming.resample import SincResampler, resample

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN = DATA / "resample_torchaudio.npz"
#: every STRIDE-th output sample is stored (13 is prime to every phase count used: all phases checked)
STRIDE = 13


def inputs() -> dict[str, tuple[np.ndarray, int]]:
    """Speech at 16 and 8 kHz (telephony, datasets, G.711), made here from the 24 kHz test speech
    and rounded to pcm16; a chirp with harmonics at 44.1 and 48 kHz (files, WebRTC)."""
    speech, rate = read_audio_file(DATA / "codec" / "speech_en.wav")
    speech = speech[: rate]  # 1 s
    out = {}
    for low in (16000, 8000):
        pcm = np.clip(np.rint(resample(speech, rate, low).astype(np.float64) * 32768.0), -32768, 32767)
        out[f"speech{low // 1000}k"] = (pcm.astype(np.int16), low)
    for high in (44100, 48000):
        t = np.arange(high // 4) / high
        chirp = np.sin(2 * np.pi * (100 * t + 0.5 * 40000 * t * t))  # 100 Hz -> 10.1 kHz in 0.25 s
        voice = sum(np.sin(2 * np.pi * 180 * k * t) / k for k in range(1, 40))
        out[f"chirp{high // 100}"] = ((0.3 * chirp + 0.1 * voice).astype(np.float32), high)
    return out


def _float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.mark.parametrize("name", ["speech16k", "speech8k", "chirp441", "chirp480"])
def test_resample_matches_torchaudio(golden, name) -> None:
    x, rate = inputs()[name]
    assert hashlib.sha256(x.tobytes()).hexdigest() == str(golden[name + "_sha256"]), "the test input changed"
    y = resample(_float(x), rate, 24000)
    assert y.dtype == np.float32 and len(y) == int(golden[name + "_len"])
    err = np.abs(y[::STRIDE] - golden[name]).max()
    assert err < 1e-4, f"{name}: max |ours - torchaudio| = {err:.2e}"


def test_soxr_differs_from_the_official_filter(golden) -> None:
    """What the input path used before: soxr VHQ, off by far more than the bound above."""
    import soxr

    x, rate = inputs()["speech16k"]
    y = soxr.resample(_float(x), rate, 24000, quality="VHQ")
    assert np.abs(y[::STRIDE][: len(golden["speech16k"])] - golden["speech16k"]).max() > 1e-3


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("rates", [(16000, 24000), (8000, 24000), (48000, 24000), (44100, 24000), (24000, 16000)])
def test_stream_equals_one_shot_in_any_chunking(rates, dtype) -> None:
    x, _ = inputs()["speech16k"]
    x = x if dtype == np.int16 else _float(x)
    want = resample(_float(x), *rates)
    if dtype == np.int16:
        want = np.clip(np.rint(want.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    rng = np.random.default_rng(sum(rates))
    for sizes in ([len(x)], [1] * 50 + [len(x)], list(rng.integers(0, 700, 60))):
        r = SincResampler(*rates, dtype=dtype)
        cuts = np.cumsum(sizes)
        parts = [r.process(piece) for piece in np.split(x, cuts[cuts < len(x)])]
        parts.append(r.flush())
        got = np.concatenate(parts)
        assert got.dtype == dtype and len(got) == len(want)
        np.testing.assert_array_equal(got, want)
    # after a flush it starts afresh
    again = SincResampler(*rates, dtype=dtype)
    first = np.concatenate([again.process(x[:500]), again.flush()])
    np.testing.assert_array_equal(np.concatenate([again.process(x[:500]), again.flush()]), first)


def test_odd_rate_pairs_do_not_build_a_dense_kernel() -> None:
    """44099 -> 24000 has gcd 1: 24000 phases of ~26 taps, not a 24000 x 44123 kernel."""
    x = np.sin(np.arange(44099) * 0.05).astype(np.float32)  # 351 Hz, well inside the pass band
    y = resample(x, 44099, 24000)
    assert len(y) == 24000
    tone = np.sin(np.arange(24000) * 0.05 * 44099 / 24000)
    np.testing.assert_allclose(y[100:-100], tone[100:-100], atol=2e-3)


def test_model_input_paths_use_it(tmp_path) -> None:
    """Files and arrays at another rate reach the tokenizer through the official filter."""
    from agent.codec.audio import write_wav

    x, rate = inputs()["speech16k"]
    np.testing.assert_array_equal(prepare_audio(x, rate, 24000), resample(_float(x), rate, 24000))
    write_wav(tmp_path / "in.wav", _float(x), rate)
    stored, stored_rate = read_audio_file(tmp_path / "in.wav")
    assert stored_rate == rate
    np.testing.assert_array_equal(load_wav(tmp_path / "in.wav"), resample(stored, rate, 24000))
