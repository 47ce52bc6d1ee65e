"""Vocoder (spec 1.6): 100 Hz coarse mel -> transformer with a sliding window -> ISTFT -> 24 kHz.

Each vocoder frame sees 40 frames back and 10 ahead per layer (16 layers: 6.4 s back, 1.6 s
ahead). The head predicts a log-magnitude and a phase per STFT bin; the waveform is the inverse
FFT of each frame, Hann-windowed, overlap-added with hop 240, trimmed by (n_fft - hop) / 2 on
each side ("same" padding) and divided by the summed squared window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AudioTokenizerConfig
from .transformer import TransformerLayer, rope_cos_sin, sequence_mask

#: The head clips magnitudes here (a safeguard of the official code against exp() overflow).
MAX_MAGNITUDE = 100.0


def overlap_add(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """frames (B, T, W) -> (B, (T - 1) * hop + W), frame t added at offset t * hop."""
    B, T, W = frames.shape
    size = (T - 1) * hop + W
    out = F.fold(frames.transpose(1, 2), output_size=(1, size), kernel_size=(1, W), stride=(1, hop))
    return out.view(B, size)


class ISTFT(nn.Module):
    """Inverse STFT with "same" padding: T frames -> T * hop samples. No weights: the window is a
    periodic Hann window computed on the fly in fp32 (the checkpoint's ``istft.window`` is not read)."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length

    def forward(self, spec: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """spec (B, n_fft // 2 + 1, T) complex -> (B, T * hop) fp32.

        With ``lengths``, row b is synthesised from its first ``lengths[b]`` frames only, exactly as
        if it were alone (later frames are ignored, its samples past ``lengths[b] * hop`` are zero).
        """
        T = spec.shape[2]
        window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float32, device=spec.device)
        pad = (self.n_fft - self.hop_length) // 2
        frames = torch.fft.irfft(spec, n=self.n_fft, dim=1) * window[None, :, None]  # (B, n_fft, T)
        frames = frames.transpose(1, 2)  # (B, T, n_fft)
        if lengths is not None:
            valid = torch.arange(T, device=spec.device)[None, :] < lengths[:, None]
            frames = frames * valid[..., None]
        y = overlap_add(frames, self.hop_length)[:, pad : pad + T * self.hop_length]
        envelope = self._envelope(window, T, pad, spec.device)  # (T * hop,)
        if lengths is None or bool((lengths == T).all()):
            return y / envelope
        # the envelope of a shorter row ends where its frames end (it is symmetric: mirror the start)
        out = torch.zeros_like(y)
        for n in lengths.unique().tolist():
            rows = lengths == n
            envelope = self._envelope(window, n, pad, spec.device)
            out[rows, : n * self.hop_length] = y[rows, : n * self.hop_length] / envelope
        return out

    def _envelope(self, window: torch.Tensor, T: int, pad: int, device: torch.device) -> torch.Tensor:
        squares = window.square()[None, None, :].expand(1, T, -1)
        env = overlap_add(squares, self.hop_length)[0, pad : pad + T * self.hop_length]
        if not bool((env > 1e-11).all()):  # cannot happen for a Hann window with hop <= n_fft / 2
            raise RuntimeError("ISTFT window envelope has zeros; n_fft/hop do not overlap enough")
        return env


class ISTFTHead(nn.Module):
    def __init__(self, dim: int, n_fft: int, hop_length: int):
        super().__init__()
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = ISTFT(n_fft, hop_length)

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim) -> complex spectrum (B, n_fft // 2 + 1, T), fp32."""
        x = self.out(x).transpose(1, 2)  # (B, n_fft + 2, T)
        log_mag, phase = x.chunk(2, dim=1)
        # exp, clip, cos and sin in the model dtype, the complex product in fp32: as the official head
        mag = torch.exp(log_mag).clamp(max=MAX_MAGNITUDE)
        return torch.complex(phase.cos().float(), phase.sin().float()) * mag.float()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.istft(self.spectrum(x), lengths)


class TransformerVocos(nn.Module):
    def __init__(self, config: AudioTokenizerConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Linear(config.n_mels, config.vocoder_dim, bias=False)
        dim = config.vocoder_dim
        self.layers = nn.ModuleList(
            TransformerLayer(dim, config.vocoder_attention_heads, config.vocoder_intermediate_dim)
            for _ in range(config.vocoder_num_layers)
        )
        self.layer_norm = nn.LayerNorm(config.vocoder_dim)
        self.head = ISTFTHead(config.vocoder_dim, config.nfft, config.hop_length)

    @property
    def lookahead_frames(self) -> int:
        """How many frames ahead the output of a frame depends on (10 per layer)."""
        return max(self.config.vocoder_attn_window_size[1], 0) * self.config.vocoder_num_layers

    @property
    def lookback_frames(self) -> int:
        return max(self.config.vocoder_attn_window_size[0], 0) * self.config.vocoder_num_layers

    def hidden(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Coarse mel (B, T, n_mels) -> final hidden states (B, T, vocoder_dim)."""
        B, T, _ = mel.shape
        cfg = self.config
        x = self.embeddings(mel.to(self.embeddings.weight.dtype))
        positions = torch.arange(T, device=x.device)[None, :].expand(B, T)
        head_dim = cfg.vocoder_dim // cfg.vocoder_attention_heads
        rope = rope_cos_sin(positions, head_dim, cfg.rope_theta, x.dtype)
        mask = sequence_mask(lengths, T, window=tuple(cfg.vocoder_attn_window_size))
        for layer in self.layers:
            x = layer(x, rope, mask)
        return self.layer_norm(x)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Coarse mel (B, T, n_mels) padded -> waveform (B, T * hop) fp32, zero past each row's end."""
        return self.head(self.hidden(mel, lengths), lengths)
