"""Log-mel front end, computed as the official pipeline does (spec 1.2).

The official code uses torchaudio's ``MelSpectrogram`` (``MimoAudio.wav2mel``): a centred STFT
with reflect padding and a periodic Hann window, the magnitude (power 1), HTK mel filters without
area normalisation, then ``log(clip(x, 1e-7))``. torchaudio is not a dependency here, so the same
computation is written with ``torch.stft`` and our own filterbank; the fidelity test compares it
with torchaudio's output.
"""

from __future__ import annotations

import math

import torch

from .config import AudioTokenizerConfig

LOG_FLOOR = 1e-7


def hz_to_mel_htk(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def mel_to_hz_htk(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def htk_mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> torch.Tensor:
    """Triangular HTK mel filters without normalisation, shape (n_fft // 2 + 1, n_mels), fp32.

    Filter m rises linearly from mel point m to m+1 and falls to m+2, the points being equally
    spaced on the HTK mel scale between ``fmin`` and ``fmax`` (default: Nyquist). The arithmetic is
    fp32 on purpose: the model was trained on filters computed that way (torchaudio), and fp64
    filters move the narrow low-frequency bands by up to 1.5e-5 in log-mel.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"mel band [{fmin}, {fmax}] Hz is not inside [0, {sample_rate / 2}] Hz")
    n_freqs = n_fft // 2 + 1
    # the STFT bins are spaced over [0, sample_rate // 2] (integer Nyquist), as torchaudio does
    bin_hz = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float32)
    mel_points = torch.linspace(hz_to_mel_htk(fmin), hz_to_mel_htk(fmax), n_mels + 2, dtype=torch.float32)
    hz_points = mel_to_hz_htk(mel_points)
    widths = hz_points[1:] - hz_points[:-1]  # (n_mels + 1,)
    offsets = hz_points[None, :] - bin_hz[:, None]  # (n_freqs, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class MelFrontEnd:
    """24 kHz mono waveform -> natural-log mel spectrogram (T_mel, n_mels), T_mel = 1 + N // hop.

    Always fp32, whatever the model dtype (the official pipeline keeps its mel module in fp32).
    Holds only constants (window, filterbank), kept per device.
    """

    def __init__(self, config: AudioTokenizerConfig):
        self.sample_rate = config.sampling_rate
        self.n_fft = config.nfft
        self.win_length = config.window_size
        self.hop_length = config.hop_length
        self.n_mels = config.n_mels
        # built on the CPU explicitly: the tokenizer may be constructed under a meta-device context
        with torch.device("cpu"):
            self._window = torch.hann_window(self.win_length, periodic=True, dtype=torch.float32)
            self._filters = htk_mel_filterbank(
                self.sample_rate, self.n_fft, self.n_mels, config.fmin, config.fmax
            )
        self._per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def min_samples(self) -> int:
        """Shortest input the centred reflect padding accepts (n_fft // 2 + 1 samples)."""
        return self.n_fft // 2 + 1

    def num_frames(self, num_samples: int) -> int:
        return 1 + max(num_samples, self.min_samples) // self.hop_length

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._per_device:
            self._per_device[device] = (self._window.to(device), self._filters.to(device))
        return self._per_device[device]

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav`` (N,) float at ``sample_rate`` -> log-mel (1 + N // hop, n_mels) fp32.

        Inputs shorter than ``min_samples`` are zero-padded up to it first: reflect padding needs
        more samples than half a window (the official code fails on them).
        """
        if wav.dim() != 1:
            raise ValueError(f"expected a 1-D waveform, got shape {tuple(wav.shape)}")
        wav = wav.to(torch.float32)
        if wav.numel() < self.min_samples:
            wav = torch.nn.functional.pad(wav, (0, self.min_samples - wav.numel()))
        window, filters = self._constants(wav.device)
        spec = torch.stft(
            wav,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=window,
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )  # (n_fft // 2 + 1, T_mel)
        mel = spec.abs().transpose(0, 1) @ filters  # (T_mel, n_mels)
        return torch.log(torch.clamp(mel, min=LOG_FLOOR))

    def __repr__(self) -> str:
        return (f"MelFrontEnd(sr={self.sample_rate}, n_fft={self.n_fft}, hop={self.hop_length}, "
                f"n_mels={self.n_mels}, fps={self.sample_rate / self.hop_length:g})")


def log_mel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two log-mel spectrograms (the fidelity measure of streaming)."""
    n = min(a.shape[0], b.shape[0])
    return float((a[:n] - b[:n]).abs().mean()) if n else 0.0


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``estimate`` against ``reference`` in dB (inf when equal)."""
    n = min(reference.numel(), estimate.numel())
    ref = reference[:n].double()
    noise = (estimate[:n].double() - ref).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.pow(2).sum().clamp_min(1e-30) / noise))
