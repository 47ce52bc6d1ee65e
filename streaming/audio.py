"""Audio utilities for the streaming layer (numpy and soxr only).

- pcm16 <-> float32, little-endian bytes, base64 with validation;
- G.711 mu-law and A-law (ITU-T G.711, bit-exact with the classic reference coder that Python's
  former ``audioop`` module used);
- resampling with soxr, one-shot and streaming (chunking does not change the output); audio on its
  way to the model (G.711 input here, WebRTC and SDK input elsewhere) goes through
  :class:`SincResampler` (:mod:`.resample`) instead: the official pipeline's filter;
- fixed-size framing with a remainder carry;
- :class:`PcmBuffer`, a bounded sample FIFO with absolute positions that either drops the oldest
  samples (real-time output) or refuses writes (input that must not be lost silently);
- :class:`WireAudioDecoder` / :class:`WireAudioEncoder` between the Realtime wire formats
  (``audio/pcm`` 24 kHz, ``audio/pcmu`` and ``audio/pcma`` 8 kHz) and pcm16 at 24 kHz.
"""

from __future__ import annotations

import base64
import binascii
import collections
import enum
import wave
from pathlib import Path

import numpy as np
import soxr

from .resample import SincResampler

SAMPLE_RATE = 24000  # the session's internal rate (and the only audio/pcm rate on the wire)
G711_RATE = 8000


class AudioFormatError(ValueError):
    """Audio bytes that cannot be what they claim to be."""


class InvalidBase64Error(AudioFormatError):
    pass


class InvalidAudioLengthError(AudioFormatError):
    pass


class BufferFullError(RuntimeError):
    """A write to a :class:`PcmBuffer` with ``Overflow.REFUSE`` would exceed its capacity."""


# ---------------------------------------------------------------------------------------------
# sample formats


def pcm16_to_float32(pcm: np.ndarray) -> np.ndarray:
    """int16 -> float32 in [-1, 1)."""
    return np.asarray(pcm, dtype=np.int16).astype(np.float32) / 32768.0


def float32_to_pcm16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> int16, rounded and clipped (no wrap-around on overload)."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float32) * 32768.0), -32768, 32767).astype(np.int16)


def pcm16_from_bytes(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Little-endian pcm16 bytes -> int16 array (a copy, so the caller may keep it)."""
    if len(data) % 2:
        raise InvalidAudioLengthError(
            f"audio has an odd number of bytes ({len(data)}); pcm16 needs 2 bytes per sample"
        )
    return np.frombuffer(bytes(data), dtype="<i2").astype(np.int16)


def pcm16_to_bytes(pcm: np.ndarray) -> bytes:
    return np.asarray(pcm, dtype=np.int16).astype("<i2", copy=False).tobytes()


def as_pcm16(audio: np.ndarray | bytes | bytearray) -> np.ndarray:
    """Accept int16 samples, float samples in [-1, 1], or pcm16 bytes; return mono int16."""
    if isinstance(audio, bytes | bytearray | memoryview):
        return pcm16_from_bytes(audio)
    arr = np.asarray(audio)
    if arr.ndim != 1:
        raise ValueError(f"expected mono audio of shape (samples,), got shape {arr.shape}")
    if arr.dtype == np.int16:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return float32_to_pcm16(arr)
    raise ValueError(f"expected int16 or float samples, got dtype {arr.dtype}")


def b64encode_audio(audio: bytes | np.ndarray) -> str:
    data = pcm16_to_bytes(audio) if isinstance(audio, np.ndarray) else bytes(audio)
    return base64.b64encode(data).decode("ascii")


def b64decode_audio(text: str) -> bytes:
    """Strict base64 (standard alphabet, padding required; whitespace is not allowed)."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64Error(f"audio is not valid base64 ({exc})") from None


# ---------------------------------------------------------------------------------------------
# G.711. The encoders follow the reference coder: mu-law works on the 14-bit sample (x >> 2),
# A-law on the 13-bit sample (x >> 3), with the segment end points below.

_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)
_ULAW_BIAS = 0x84
_ULAW_CLIP14 = 8159


def _ulaw_encode(pcm: np.ndarray) -> np.ndarray:
    x = np.asarray(pcm, dtype=np.int16).astype(np.int32) >> 2
    negative = x < 0
    mask = np.where(negative, 0x7F, 0xFF)
    mag = np.minimum(np.where(negative, -x, x), _ULAW_CLIP14) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, mag, side="left")  # first segment whose end >= mag
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))  # past the last segment
    return (code ^ mask).astype(np.uint8)


def _alaw_encode(pcm: np.ndarray) -> np.ndarray:
    x = np.asarray(pcm, dtype=np.int16).astype(np.int32) >> 3
    negative = x < 0
    mask = np.where(negative, 0x55, 0xD5)
    mag = np.where(negative, -x - 1, x)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")
    over = seg >= 8
    seg_c = np.minimum(seg, 7)
    code = (seg_c << 4) | ((mag >> np.maximum(seg_c, 1)) & 0x0F)
    code = np.where(over, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ULAW_DECODE = _ulaw_table()
_ALAW_DECODE = _alaw_table()


def mulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> G.711 mu-law bytes (uint8)."""
    return _ulaw_encode(pcm)


def mulaw_decode(codes: np.ndarray | bytes) -> np.ndarray:
    """G.711 mu-law bytes -> int16 samples."""
    return _ULAW_DECODE[
        np.frombuffer(codes, dtype=np.uint8) if isinstance(codes, bytes | bytearray) else codes
    ]


def alaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> G.711 A-law bytes (uint8)."""
    return _alaw_encode(pcm)


def alaw_decode(codes: np.ndarray | bytes) -> np.ndarray:
    """G.711 A-law bytes -> int16 samples."""
    return _ALAW_DECODE[
        np.frombuffer(codes, dtype=np.uint8) if isinstance(codes, bytes | bytearray) else codes
    ]


# ---------------------------------------------------------------------------------------------
# resampling


def resample(x: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """One-shot soxr resampling (HQ). int16 in, int16 out; float in, float32 out.

    int16 goes through float32 (soxr's own int16 path rounds differently depending on how the
    stream is chunked), so this equals :class:`StreamResampler` sample for sample."""
    x = np.asarray(x)
    if in_rate == out_rate:
        return x
    if x.dtype == np.int16:
        return float32_to_pcm16(soxr.resample(pcm16_to_float32(x), in_rate, out_rate, quality="HQ"))
    return soxr.resample(x.astype(np.float32, copy=False), in_rate, out_rate, quality="HQ")


class StreamResampler:
    """soxr's streaming resampler: feeding a signal in any chunking gives exactly the samples of
    :func:`resample` on the whole signal, delivered as soon as the filter allows (a few ms late).
    ``dtype`` (int16 or float32) is what goes in and comes out; the filter runs in float32."""

    def __init__(self, in_rate: int, out_rate: int, dtype: type = np.int16) -> None:
        self.in_rate, self.out_rate, self.dtype = in_rate, out_rate, np.dtype(dtype)
        if self.dtype not in (np.dtype(np.int16), np.dtype(np.float32)):
            raise ValueError(f"StreamResampler handles int16 or float32, not {self.dtype}")
        self._stream = self._new_stream()

    def _new_stream(self) -> soxr.ResampleStream | None:
        if self.in_rate == self.out_rate:
            return None
        return soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality="HQ")

    def _run(self, x: np.ndarray, last: bool) -> np.ndarray:
        xf = pcm16_to_float32(x) if self.dtype == np.int16 else np.ascontiguousarray(x, np.float32)
        y = self._stream.resample_chunk(xf, last=last)
        return float32_to_pcm16(y) if self.dtype == np.int16 else y

    def process(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=self.dtype)
        if self._stream is None:
            return x
        return self._run(x, last=False)

    def flush(self) -> np.ndarray:
        """Emit the filter's tail and start a fresh stream."""
        if self._stream is None:
            return np.zeros(0, self.dtype)
        tail = self._run(np.zeros(0, self.dtype), last=True)
        self._stream = self._new_stream()
        return tail

    def reset(self) -> None:
        self._stream = self._new_stream()


# ---------------------------------------------------------------------------------------------
# framing and buffering


class Framer:
    """Cut a stream into fixed frames of ``frame_samples``; the remainder waits for the next push."""

    def __init__(self, frame_samples: int, dtype: type = np.int16) -> None:
        if frame_samples < 1:
            raise ValueError(f"frame_samples must be positive, got {frame_samples}")
        self.frame_samples = frame_samples
        self._carry = np.zeros(0, dtype)

    @property
    def pending(self) -> int:
        return len(self._carry)

    def push(self, x: np.ndarray) -> np.ndarray:
        """Returns the complete frames, shape (n_frames, frame_samples)."""
        data = np.concatenate([self._carry, np.asarray(x, self._carry.dtype)]) if len(self._carry) else x
        data = np.asarray(data, self._carry.dtype)
        n = len(data) // self.frame_samples
        cut = n * self.frame_samples
        self._carry = data[cut:].copy()
        return data[:cut].reshape(n, self.frame_samples)  # (n_frames, frame_samples)

    def flush(self, pad: bool = False) -> np.ndarray:
        """The remainder: zero-padded into one last frame when ``pad``, else as a 1-D array."""
        rest, self._carry = self._carry, np.zeros(0, self._carry.dtype)
        if not pad:
            return rest
        if not len(rest):
            return np.zeros((0, self.frame_samples), rest.dtype)
        frame = np.zeros((1, self.frame_samples), rest.dtype)
        frame[0, : len(rest)] = rest
        return frame

    def reset(self) -> None:
        self._carry = np.zeros(0, self._carry.dtype)


class Overflow(enum.Enum):
    DROP_OLDEST = "drop_oldest"  # real-time output: stale audio is worth less than fresh audio
    REFUSE = "refuse"  # input: the writer must learn that its audio was not taken


class PcmBuffer:
    """A bounded FIFO of int16 samples that knows each sample's absolute position in the stream
    (samples written since creation, counting dropped ones)."""

    def __init__(self, max_samples: int, overflow: Overflow = Overflow.DROP_OLDEST) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        self.max_samples = max_samples
        self.overflow = overflow
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._len = 0
        self.start = 0  # absolute position of the oldest buffered sample

    def __len__(self) -> int:
        return self._len

    @property
    def end(self) -> int:
        """Absolute position just after the newest sample."""
        return self.start + self._len

    def write(self, pcm: np.ndarray) -> int:
        """Append samples; returns how many old samples were dropped to make room."""
        pcm = np.asarray(pcm, np.int16)
        if not len(pcm):
            return 0
        if self._len + len(pcm) > self.max_samples and self.overflow is Overflow.REFUSE:
            raise BufferFullError(
                f"buffer holds {self._len} of {self.max_samples} samples; {len(pcm)} more do not fit"
            )
        self._chunks.append(pcm.copy())
        self._len += len(pcm)
        excess = self._len - self.max_samples
        if excess > 0:
            self.drop(excess)
        return max(excess, 0)

    def read(self, n: int) -> np.ndarray:
        """Remove and return up to ``n`` of the oldest samples."""
        out = self._take(min(n, self._len))
        return out

    def drop(self, n: int) -> None:
        """Discard the ``n`` oldest samples."""
        self._take(min(n, self._len))

    def drop_before(self, position: int) -> None:
        """Discard every sample whose absolute position is below ``position``."""
        if position > self.start:
            self.drop(position - self.start)

    def span(self, begin: int, end: int) -> np.ndarray:
        """A copy of the samples at absolute positions [begin, end), clipped to what is buffered."""
        begin, end = max(begin, self.start), min(end, self.end)
        if end <= begin:
            return np.zeros(0, np.int16)
        parts, pos = [], self.start
        for chunk in self._chunks:
            lo, hi = max(begin, pos), min(end, pos + len(chunk))
            if lo < hi:
                parts.append(chunk[lo - pos : hi - pos])
            pos += len(chunk)
            if pos >= end:
                break
        return np.concatenate(parts)

    def clear(self) -> int:
        """Drop everything; returns how many samples were dropped."""
        n = self._len
        self._take(n)
        return n

    def _take(self, n: int) -> np.ndarray:
        parts = []
        need = n
        while need > 0:
            head = self._chunks[0]
            if len(head) <= need:
                parts.append(self._chunks.popleft())
                need -= len(head)
            else:
                parts.append(head[:need])
                self._chunks[0] = head[need:]
                need = 0
        self._len -= n
        self.start += n
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)


# ---------------------------------------------------------------------------------------------
# wire formats


WIRE_FORMATS = ("audio/pcm", "audio/pcmu", "audio/pcma")


class WireAudioDecoder:
    """Client audio payloads (already base64-decoded) in one wire format -> pcm16 at 24 kHz.
    G.711 is upsampled with a streaming resampler, so consecutive appends join seamlessly; it
    feeds the model, so it is the official pipeline's filter (:class:`SincResampler`)."""

    def __init__(self, format_type: str) -> None:
        if format_type not in WIRE_FORMATS:
            raise ValueError(
                f"unsupported audio format {format_type!r}; supported: {', '.join(WIRE_FORMATS)}"
            )
        self.format_type = format_type
        self._resampler = None if format_type == "audio/pcm" else SincResampler(G711_RATE, SAMPLE_RATE)

    def decode(self, payload: bytes) -> np.ndarray:
        if self.format_type == "audio/pcm":
            return pcm16_from_bytes(payload)
        codes = np.frombuffer(payload, dtype=np.uint8)
        pcm8k = mulaw_decode(codes) if self.format_type == "audio/pcmu" else alaw_decode(codes)
        return self._resampler.process(pcm8k)

    def flush(self) -> np.ndarray:
        return np.zeros(0, np.int16) if self._resampler is None else self._resampler.flush()


class WireAudioEncoder:
    """pcm16 at 24 kHz -> payload bytes in one wire format (G.711: streaming downsample to 8 kHz)."""

    def __init__(self, format_type: str) -> None:
        if format_type not in WIRE_FORMATS:
            raise ValueError(
                f"unsupported audio format {format_type!r}; supported: {', '.join(WIRE_FORMATS)}"
            )
        self.format_type = format_type
        self._resampler = None if format_type == "audio/pcm" else StreamResampler(SAMPLE_RATE, G711_RATE)

    def _g711(self, pcm8k: np.ndarray) -> bytes:
        codes = mulaw_encode(pcm8k) if self.format_type == "audio/pcmu" else alaw_encode(pcm8k)
        return codes.tobytes()

    def encode(self, pcm16: np.ndarray) -> bytes:
        if self.format_type == "audio/pcm":
            return pcm16_to_bytes(pcm16)
        return self._g711(self._resampler.process(pcm16))

    def flush(self) -> bytes:
        """The resampler's tail at the end of a response (empty for audio/pcm)."""
        if self._resampler is None:
            return b""
        return self._g711(self._resampler.flush())


# ---------------------------------------------------------------------------------------------
# files


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV file -> (mono int16 samples, sample rate). Channels are averaged."""
    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise AudioFormatError(f"{path}: expected 16-bit PCM, got {8 * f.getsampwidth()}-bit samples")
        channels, rate = f.getnchannels(), f.getframerate()
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.int16)
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1).round().astype(np.int16)  # (frames, channels) -> mono
    return pcm, rate


def write_wav(path: str | Path, pcm: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm16_to_bytes(pcm))
