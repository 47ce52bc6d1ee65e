"""Resampling as the official MiMo-Audio pipeline does it (numpy only, no torchaudio).

Here, in the streaming layer, so that the standalone client SDK (``clients/python``) ships it;
``agent.codec`` uses it for files and arrays at other rates.

The official code brings every input to 24 kHz with ``torchaudio.functional.resample`` at its
defaults: band-limited interpolation with a Hann-windowed sinc (``lowpass_filter_width=6``,
``rolloff=0.99``, ``sinc_interp_hann``). That is the filter the tokenizer was trained behind, so
the model's input is resampled with the same one here; another good resampler (soxr) differs in
the stop band, enough to move log-mel bands above 8 kHz by several nats on 16 kHz input.

For rates reduced by their gcd to ``orig`` in and ``new`` out, output sample ``m`` is

    y[m] = sum_i x[i] * h(i / orig - m / new),
    h(u) = (base / orig) * sinc(pi * base * u) * cos^2(pi * base * u / (2 * width_zc))

for |base * u| <= width_zc (zero elsewhere), with ``base = min(orig, new) * rolloff``,
``width_zc = lowpass_filter_width`` zero crossings, and x zero outside the signal; there are
``ceil(new * len / orig)`` outputs. Output ``m = q * new + j`` (phase ``j``) reads the inputs
around ``q * orig + j * orig / new``; each phase has its own short row of taps, so an odd rate
pair (gcd 1) costs ``new`` rows of ~2 * width taps, not the dense ``new x orig`` kernel.

:class:`SincResampler` is the same filter on a stream: any chunking gives exactly the one-shot
output, a few samples late (the filter's half-width), the end zero-padded as the one-shot is.
"""

from __future__ import annotations

import math

import numpy as np

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99
#: outputs computed per block (bounds the gather's memory on long inputs)
_BLOCK = 1 << 15


class _Filter:
    """Taps of each output phase and where its input window starts."""

    def __init__(self, in_rate: int, out_rate: int, lowpass_filter_width: int = LOWPASS_FILTER_WIDTH,
                 rolloff: float = ROLLOFF) -> None:
        if in_rate <= 0 or out_rate <= 0 or int(in_rate) != in_rate or int(out_rate) != out_rate:
            raise ValueError(f"sample rates must be positive whole numbers, got {in_rate} -> {out_rate}")
        g = math.gcd(int(in_rate), int(out_rate))
        self.orig, self.new = int(in_rate) // g, int(out_rate) // g
        base = min(self.orig, self.new) * rolloff
        self.width = math.ceil(lowpass_filter_width * self.orig / base)
        j = np.arange(self.new)
        #: first input (relative to q * orig) of each phase's window, and the window length
        self.start = (j * self.orig) // self.new - self.width
        self.taps = 2 * self.width + 2
        i = self.start[:, None] + np.arange(self.taps)[None, :]  # (new, taps) input offsets
        t = (i / self.orig - j[:, None] / self.new) * base  # in zero crossings, float64
        inside = np.abs(t) < lowpass_filter_width
        window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
        sinc = np.sinc(t)  # sin(pi t) / (pi t), 1 at 0
        self.kernel = np.where(inside, sinc * window * (base / self.orig), 0.0)  # (new, taps)

    def output_length(self, n_in: int) -> int:
        return -(-self.new * n_in // self.orig)

    def first_input(self, m):
        """Index of the first input sample output(s) ``m`` read: ``q * orig + start[j]``."""
        return (m * self.orig) // self.new - self.width

    def ready(self, n_in: int) -> int:
        """How many outputs have their whole window inside the first ``n_in`` inputs."""
        limit = n_in - self.taps + self.width + 1  # first_input(m) < limit - width
        return max(0, (limit * self.new - 1) // self.orig + 1) if limit > 0 else 0

    def apply(self, x: np.ndarray, x_offset: int, m0: int, m1: int) -> np.ndarray:
        """Outputs [m0, m1) from ``x`` = inputs [x_offset, x_offset + len(x)), zero elsewhere."""
        out = np.empty(max(0, m1 - m0), np.float64)
        for b0 in range(m0, m1, _BLOCK):
            m = np.arange(b0, min(m1, b0 + _BLOCK))
            first = self.first_input(m) - x_offset  # (M,) into x
            lo, hi = int(first[0]), int(first[-1]) + self.taps
            pad_l, pad_r = max(0, -lo), max(0, hi - len(x))
            window = np.pad(x[max(0, lo) : min(len(x), hi)], (pad_l, pad_r))
            rows = window[(first - lo)[:, None] + np.arange(self.taps)[None, :]]  # (M, taps)
            out[b0 - m0 : b0 - m0 + len(m)] = (rows * self.kernel[m % self.new]).sum(axis=1)
        return out


def resample(x: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """float mono ``x`` from ``in_rate`` to ``out_rate`` with torchaudio's default windowed sinc
    (same filter and length as ``torchaudio.functional.resample``); float32 out."""
    x = np.asarray(x)
    if in_rate == out_rate:
        return x.astype(np.float32, copy=False)
    f = _Filter(in_rate, out_rate)
    return f.apply(x.astype(np.float64), 0, 0, f.output_length(len(x))).astype(np.float32)


class SincResampler:
    """:func:`resample` on a stream: ``process`` chunks, then ``flush`` for the end.

    The concatenated outputs equal :func:`resample` of the concatenated input. ``dtype`` (int16 or
    float32) is what goes in and comes out; int16 is scaled to [-1, 1) and back, rounded and
    clipped.
    """

    def __init__(self, in_rate: int, out_rate: int, dtype: type = np.int16) -> None:
        self.in_rate, self.out_rate, self.dtype = in_rate, out_rate, np.dtype(dtype)
        if self.dtype not in (np.dtype(np.int16), np.dtype(np.float32)):
            raise ValueError(f"SincResampler handles int16 or float32, not {self.dtype}")
        self._filter = None if in_rate == out_rate else _Filter(in_rate, out_rate)
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(0, np.float64)  # inputs [self._offset, self._offset + len)
        self._offset = 0
        self._seen = 0  # inputs received
        self._done = 0  # outputs produced

    def process(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=self.dtype)
        if self._filter is None:
            return x
        f = self._filter
        xf = x.astype(np.float64) / 32768.0 if self.dtype == np.int16 else x.astype(np.float64)
        self._buf = np.concatenate([self._buf, xf])
        self._seen += len(x)
        return self._emit(f.ready(self._seen))

    def flush(self) -> np.ndarray:
        """The rest of the output (the end zero-padded, as the one-shot does); then a fresh stream."""
        if self._filter is None:
            return np.zeros(0, self.dtype)
        out = self._emit(self._filter.output_length(self._seen))
        self.reset()
        return out

    def _emit(self, end: int) -> np.ndarray:
        f = self._filter
        y = f.apply(self._buf, self._offset, self._done, end) if end > self._done else np.zeros(0)
        self._done = max(self._done, end)
        keep = int(f.first_input(self._done)) - self._offset  # the next output reads from here on
        if keep > 0:
            self._buf, self._offset = self._buf[keep:], self._offset + keep
        y = y.astype(np.float32)  # as the one-shot output, then to pcm16 (exact: a power-of-two scale)
        if self.dtype == np.int16:
            return np.clip(np.rint(y * np.float32(32768.0)), -32768, 32767).astype(np.int16)
        return y
