"""Audio utilities: sample formats, base64, G.711 (bit-exact), resampling, framing, buffers."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from streaming import audio as A
from tests.streaming.helpers import DATA

RNG = np.random.default_rng(1234)


def test_pcm16_float_round_trip_and_clipping():
    pcm = np.array([-32768, -1, 0, 1, 32767], np.int16)
    f = A.pcm16_to_float32(pcm)
    assert f.dtype == np.float32 and f[0] == -1.0 and f[2] == 0.0 and f[-1] < 1.0
    assert np.array_equal(A.float32_to_pcm16(f), pcm)
    assert np.array_equal(A.float32_to_pcm16(np.array([2.0, -2.0])), [32767, -32768])  # clipped, not wrapped


def test_bytes_and_base64():
    pcm = RNG.integers(-32768, 32767, 1000).astype(np.int16)
    data = A.pcm16_to_bytes(pcm)
    assert data[:2] == int(pcm[0]).to_bytes(2, "little", signed=True)
    assert np.array_equal(A.pcm16_from_bytes(data), pcm)
    text = A.b64encode_audio(pcm)
    assert text == base64.b64encode(data).decode()
    assert A.b64decode_audio(text) == data
    with pytest.raises(A.InvalidBase64Error):
        A.b64decode_audio("abc$")
    with pytest.raises(A.InvalidBase64Error):
        A.b64decode_audio("abc")  # missing padding
    with pytest.raises(A.InvalidAudioLengthError, match="odd number of bytes"):
        A.pcm16_from_bytes(b"\x00\x01\x02")
    assert np.array_equal(A.as_pcm16(np.array([0.5, -0.5], np.float32)), [16384, -16384])
    with pytest.raises(ValueError, match="mono"):
        A.as_pcm16(np.zeros((2, 10), np.int16))


def test_g711_matches_the_reference_coder_on_every_value():
    ref = np.load(DATA / "g711_audioop_reference.npz")
    every = np.arange(-32768, 32768).astype(np.int16)
    assert np.array_equal(A.mulaw_encode(every), ref["ulaw_encode"])
    assert np.array_equal(A.alaw_encode(every), ref["alaw_encode"])
    codes = np.arange(256, dtype=np.uint8)
    assert np.array_equal(A.mulaw_decode(codes), ref["ulaw_decode"])
    assert np.array_equal(A.alaw_decode(codes), ref["alaw_decode"])


def test_g711_code_points_from_the_standard():
    # zero and the extremes (ITU-T G.711: mu-law 0 -> 0xFF, A-law 0 -> 0xD5 with even-bit inversion)
    assert A.mulaw_encode(np.array([0, 32767, -32768], np.int16)).tolist() == [0xFF, 0x80, 0x00]
    assert A.alaw_encode(np.array([0, 32767, -32768], np.int16)).tolist() == [0xD5, 0xAA, 0x2A]
    assert A.mulaw_decode(bytes([0x00, 0x80, 0xFF, 0x7F])).tolist() == [-32124, 32124, 0, 0]
    assert A.alaw_decode(bytes([0xD5, 0x55, 0xAA, 0x2A])).tolist() == [8, -8, 32256, -32256]


def test_g711_round_trip_error_is_within_quantisation():
    x = (np.sin(np.linspace(0, 200, 8000)) * 20000).astype(np.int16)
    for enc, dec in ((A.mulaw_encode, A.mulaw_decode), (A.alaw_encode, A.alaw_decode)):
        y = dec(enc(x)).astype(np.int32)
        big = np.abs(x.astype(np.int32)) >= 1024
        rel = np.abs(y - x)[big] / np.abs(x.astype(np.int32))[big]
        assert rel.max() <= 1 / 16  # 4-bit mantissa: half a step is at most 1/32 of the value, plus bias
        snr = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((y - x).astype(np.float64) ** 2))
        assert snr > 35


def test_resample_preserves_a_tone():
    t = np.arange(24000) / 24000
    x = A.float32_to_pcm16(0.5 * np.sin(2 * np.pi * 440 * t))
    y = A.resample(x, 24000, 16000)
    assert y.dtype == np.int16 and len(y) == 16000
    spectrum = np.abs(np.fft.rfft(y.astype(np.float32)))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins over one second
    assert abs(np.abs(y[1000:-1000]).max() - 16384) < 400


@pytest.mark.parametrize("chunk", [1, 2, 7, 160, 4801])
def test_stream_resampler_equals_one_shot(chunk):
    x = RNG.integers(-8000, 8000, 24000).astype(np.int16)
    stream = A.StreamResampler(24000, 16000)
    parts = [stream.process(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    parts.append(stream.flush())
    assert np.array_equal(np.concatenate(parts), A.resample(x, 24000, 16000))


def test_stream_resampler_is_time_aligned():
    # an impulse at 0.5 s lands at 0.5 s of the output: the filter delay is compensated
    x = np.zeros(24000, np.int16)
    x[12000] = 30000
    stream = A.StreamResampler(24000, 8000)
    y = np.concatenate([stream.process(x), stream.flush()])
    assert abs(int(np.argmax(y)) - 4000) <= 1


def test_framer_carries_the_remainder():
    framer = A.Framer(320)
    x = np.arange(1000).astype(np.int16)
    a = framer.push(x[:500])
    b = framer.push(x[500:])
    assert a.shape == (1, 320) and b.shape == (2, 320) and framer.pending == 40
    assert np.array_equal(np.concatenate([a.ravel(), b.ravel(), framer.flush()]), x)
    framer.push(x[:100])
    padded = framer.flush(pad=True)
    assert padded.shape == (1, 320) and np.array_equal(padded[0, :100], x[:100]) and not padded[0, 100:].any()


def test_pcm_buffer_drop_oldest_keeps_positions():
    buf = A.PcmBuffer(100)
    assert buf.write(np.arange(60, dtype=np.int16)) == 0
    assert buf.write(np.arange(60, 120, dtype=np.int16)) == 20  # the 20 oldest dropped
    assert (buf.start, buf.end, len(buf)) == (20, 120, 100)
    assert np.array_equal(buf.span(50, 70), np.arange(50, 70))
    assert np.array_equal(buf.read(10), np.arange(20, 30))
    buf.drop_before(100)
    assert np.array_equal(buf.span(0, 1000), np.arange(100, 120))
    assert buf.clear() == 20 and len(buf) == 0 and buf.start == 120


def test_pcm_buffer_refuse():
    buf = A.PcmBuffer(10, A.Overflow.REFUSE)
    buf.write(np.zeros(8, np.int16))
    with pytest.raises(A.BufferFullError, match="8 of 10"):
        buf.write(np.zeros(3, np.int16))
    assert len(buf) == 8  # nothing of the refused write was taken


@pytest.mark.parametrize("fmt", ["audio/pcmu", "audio/pcma"])
def test_wire_g711_round_trip(fmt):
    t = np.arange(24000) / 24000
    x = A.float32_to_pcm16(0.4 * np.sin(2 * np.pi * 300 * t))
    encoder, decoder = A.WireAudioEncoder(fmt), A.WireAudioDecoder(fmt)
    payload = b"".join(encoder.encode(x[i : i + 480]) for i in range(0, len(x), 480)) + encoder.flush()
    assert len(payload) == 8000  # one byte per 8 kHz sample
    y = np.concatenate([decoder.decode(payload[:3000]), decoder.decode(payload[3000:]), decoder.flush()])
    assert len(y) == len(x)
    err = A.pcm16_to_float32(y[2400:-2400]) - A.pcm16_to_float32(x[2400:-2400])
    assert np.sqrt(np.mean(err**2)) < 0.01  # G.711 (~38 dB SNR) plus two resamplings


def test_wire_pcm_is_identity():
    x = RNG.integers(-100, 100, 99).astype(np.int16)
    assert A.WireAudioEncoder("audio/pcm").encode(x) == A.pcm16_to_bytes(x)
    assert np.array_equal(A.WireAudioDecoder("audio/pcm").decode(A.pcm16_to_bytes(x)), x)
    with pytest.raises(A.InvalidAudioLengthError):
        A.WireAudioDecoder("audio/pcm").decode(b"\x00")
    with pytest.raises(ValueError, match="audio/opus"):
        A.WireAudioDecoder("audio/opus")


def test_test_audio_is_24k_mono_with_padding():
    pcm, rate = A.read_wav(DATA / "speech_hello_padded.wav")
    assert rate == 24000 and pcm.dtype == np.int16
    assert not pcm[: int(0.55 * rate)].any() and not pcm[-int(0.95 * rate) :].any()
    assert np.abs(pcm[int(0.7 * rate) : int(2.7 * rate)].astype(np.int32)).max() > 10000


@pytest.mark.parametrize("kind", ["audio/pcmu", "audio/pcma"])
def test_g711_input_is_upsampled_with_the_official_filter(kind):
    """G.711 input goes to the model: 8 -> 24 kHz with the official pipeline's filter, not soxr."""
    from streaming.resample import SincResampler

    yes, _ = A.read_wav(DATA / "speech_yes.wav")
    pcm8k = A.resample(yes, 24000, 8000)
    codes = A.mulaw_encode(pcm8k) if kind == "audio/pcmu" else A.alaw_encode(pcm8k)
    decoder = A.WireAudioDecoder(kind)
    got = np.concatenate([decoder.decode(codes[:999].tobytes()), decoder.decode(codes[999:].tobytes()),
                          decoder.flush()])
    law = A.mulaw_decode(codes) if kind == "audio/pcmu" else A.alaw_decode(codes)
    sinc = SincResampler(8000, 24000)
    assert np.array_equal(got, np.concatenate([sinc.process(law), sinc.flush()]))
