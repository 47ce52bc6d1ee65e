"""The public API: encode/decode shapes, batching without leakage, segmenting, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import soxr
import torch

from agent.codec import AudioError, load_wav, pad_codes_to_group
from streaming.resample import resample

from .conftest import DATA


@pytest.fixture(scope="module")
def speech():
    return load_wav(DATA / "speech_en.wav")


def _expected_tokens(n_samples: int) -> int:
    mel = 1 + max(n_samples, 481) // 240
    half = (mel + 1) // 2
    return (half + 1) // 2


@pytest.mark.parametrize("n", [1, 479, 480, 481, 959, 960, 961, 3 * 960 + 17, 24000 + 1])
def test_round_trip_shapes_for_odd_lengths(tiny, n):
    wav = np.random.default_rng(n).uniform(-0.5, 0.5, n).astype(np.float32)
    assert tiny.mel(wav).shape == (1 + max(n, 481) // 240, 128)
    raw = tiny.encode(wav, pad_to_group=False)
    assert raw.shape == (_expected_tokens(n), 8) and raw.dtype == torch.long
    codes = tiny.encode(wav)
    assert codes.shape[0] % 4 == 0 and codes.shape[0] - raw.shape[0] < 4
    out = tiny.decode(codes)
    assert out.shape == (960 * codes.shape[0],) and out.dtype == np.float32


def test_codes_are_inside_the_codebooks(tiny, speech):
    codes = tiny.encode(speech, n_q=20)
    assert codes.shape[1] == 20
    sizes = torch.tensor(tiny.config.codebook_size)
    assert (codes >= 0).all() and (codes < sizes).all()
    assert len(set(codes[:, 0].tolist())) > 5  # speech uses many codes
    assert torch.equal(codes[:, :8], tiny.encode(speech))  # greedy RVQ: the first 8 do not depend on n_q


def test_empty_input(tiny):
    assert tiny.encode(np.zeros(0, np.float32)).shape == (0, 8)
    assert tiny.decode(torch.zeros(0, 8, dtype=torch.long)).shape == (0,)
    assert [c.shape for c in tiny.encode_batch([np.zeros(0, np.float32), np.zeros(960, np.float32)])] == [
        (0, 8),
        (4, 8),
    ]


def test_silence_and_clipping(tiny):
    silence = np.zeros(24000, np.float32)
    mel = tiny.mel(silence)
    assert torch.allclose(mel, torch.full_like(mel, float(np.log(1e-7))))  # the log floor
    codes = tiny.encode(silence)
    assert codes.shape == (28, 8)
    assert np.isfinite(tiny.decode(codes)).all()
    t = np.arange(24000) / 24000
    clipped = np.clip(3 * np.sin(2 * np.pi * 200 * t), -1, 1).astype(np.float32)  # saturated
    loud = (8 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)  # beyond full scale: accepted as is
    for wav in (clipped, loud):
        codes = tiny.encode(wav)
        assert codes.shape == (28, 8) and np.isfinite(tiny.decode(codes)).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(tiny, bad):
    wav = np.zeros(4800, np.float32)
    wav[100] = bad
    with pytest.raises(AudioError, match="1 NaN or infinite sample"):
        tiny.encode(wav)


def test_other_rates_and_channels_are_resampled_and_downmixed(tiny, speech):
    at16 = soxr.resample(speech, 24000, 16000, quality="VHQ")
    want = tiny.encode(resample(at16, 16000, 24000))  # the official filter (tests/agent/test_resample.py)
    assert torch.equal(tiny.encode(at16, sample_rate=16000), want)
    stereo = np.stack([speech, 0.5 * speech], axis=1)  # (samples, channels)
    assert torch.equal(tiny.encode(stereo, sample_rate=24000), tiny.encode(0.75 * speech))
    pcm16 = (speech * 32767).astype(np.int16)
    assert torch.equal(tiny.encode(pcm16), tiny.encode(pcm16.astype(np.float32) / 32768))
    assert torch.equal(tiny.encode(torch.from_numpy(speech)), tiny.encode(speech))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 0}, "sample rate 0 Hz is outside"),
        ({"sample_rate": -16000}, "outside"),
        ({"sample_rate": 16000.5}, "whole number of Hz"),
        ({"sample_rate": 10**7}, "outside"),
    ],
)
def test_invalid_sample_rates_are_refused(tiny, kwargs, message):
    with pytest.raises(AudioError, match=message):
        tiny.encode(np.zeros(4800, np.float32), **kwargs)


@pytest.mark.parametrize(
    ("wav", "message"),
    [
        (np.zeros((2, 4800), np.float32), "channels-first"),
        (np.zeros((4800, 0), np.float32), "no channels"),
        (np.zeros((2, 3, 4800), np.float32), "must be 1-D"),
        (np.zeros(4800, np.int32), "float samples"),
    ],
)
def test_invalid_shapes_and_dtypes_are_refused(tiny, wav, message):
    with pytest.raises(AudioError, match=message):
        tiny.encode(wav)


def test_batched_encode_equals_one_by_one(tiny, speech):
    rng = np.random.default_rng(0)
    wavs = [speech, speech[:12345], rng.uniform(-0.3, 0.3, 999).astype(np.float32), speech[7:30001]]
    batched = tiny.encode_batch(wavs)
    for wav, codes in zip(wavs, batched, strict=True):
        assert torch.equal(codes, tiny.encode(wav))


def test_long_turns_are_encoded_in_independent_60s_segments(tiny):
    wav = np.random.default_rng(1).uniform(-0.2, 0.2, 61 * 24000 + 100).astype(np.float32)
    codes = tiny.encode(wav, pad_to_group=False)
    mel = tiny.mel(wav)
    first = tiny.encoder.encode(mel[None, :6000], torch.tensor([6000]), 8)[0]
    rest = tiny.encoder.encode(mel[None, 6000:], torch.tensor([mel.shape[0] - 6000]), 8)[0]
    assert first.shape[0] == 1500
    assert torch.equal(codes, torch.cat([first, rest]))
    # batched with a short turn, the long one is unchanged
    assert torch.equal(tiny.encode_batch([wav[:5000], wav], pad_to_group=False)[1], codes)


def test_batched_decode_equals_one_by_one(tiny, speech):
    codes = tiny.encode(speech)
    parts = [codes, codes[:9], codes[5:12], codes[:1]]
    batched = tiny.decode_sequences(parts)
    for part, wav in zip(parts, batched, strict=True):
        np.testing.assert_allclose(wav, tiny.decode(part), rtol=0, atol=2e-6)
        assert wav.shape == (960 * part.shape[0],)


def test_decode_segments_at_1500_tokens(tiny):
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, n, (1503,), generator=g) for n in tiny.config.codebook_size[:8]], 1)
    whole = tiny.decode(codes)
    np.testing.assert_allclose(whole[: 1500 * 960], tiny.decode(codes[:1500]), atol=2e-6, rtol=0)
    np.testing.assert_allclose(whole[1500 * 960 :], tiny.decode(codes[1500:]), atol=2e-6, rtol=0)


def test_decode_uses_the_given_number_of_codebooks(tiny, speech):
    codes = tiny.encode(speech, n_q=20)
    assert tiny.decode(codes[:, :1]).shape == tiny.decode(codes).shape
    assert not np.allclose(tiny.decode(codes[:, :8]), tiny.decode(codes[:, :2]))


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (torch.zeros(5, dtype=torch.long), r"shape \(T, n_codebooks\)"),
        (torch.zeros(5, 21, dtype=torch.long), "21 codebooks but the quantizer has 20"),
        (torch.zeros(5, 8), "must be integers"),
        (torch.tensor([[0] * 8, [0] * 7 + [128]]), r"codebook 7 span 0\.\.128, outside 0\.\.127"),
        (torch.tensor([[-1] + [0] * 7]), "codebook 0 span -1"),
    ],
)
def test_bad_codes_are_refused(tiny, codes, message):
    with pytest.raises(ValueError, match=message):
        tiny.decode(codes)


def test_pad_codes_to_group_repeats_the_last_frame():
    codes = torch.arange(10).view(5, 2)
    padded = pad_codes_to_group(codes)
    assert padded.shape == (8, 2) and (padded[5:] == codes[-1]).all()
    assert pad_codes_to_group(codes[:4]).shape == (4, 2)
