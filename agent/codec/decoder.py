"""Audio decoder (spec 1.5): 25 Hz RVQ embeddings -> 50 Hz causal transformer -> 100 Hz coarse mel
-> vocoder -> waveform (960 samples per token).

Both up-samplers are ``CausalConvTranspose1d``: a transposed convolution, GroupNorm with one group
(statistics over all channels and the whole sequence, the frame dropped by the right trim
included), then the right trim of max(0, k - s) frames. Those sequence-wide statistics are what
makes the decoder non-causal although its attention is causal. The pieces are exposed separately
(``upsample``, ``transform``, ``coarse_mel``) for the streaming decoder, which runs them chunk by
chunk with its own normalisation statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AudioTokenizerConfig
from .transformer import AttentionMask, LayerKV, TransformerLayer, rope_cos_sin, sequence_mask
from .vocoder import TransformerVocos


def valid_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) True where the position is inside its row."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def group_norm_moments(y: torch.Tensor, lengths: torch.Tensor) -> Moments:
    """(count, sum, sum of squares) over channels and valid frames of y (B, T, C), per row, fp64."""
    _, T, C = y.shape
    valid = valid_mask(lengths, T)[..., None]
    y = y.double() * valid
    return lengths.double() * C, y.sum(dim=(1, 2)), y.square().sum(dim=(1, 2))


def apply_group_norm(
    y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, norm: nn.GroupNorm
) -> torch.Tensor:
    """Normalise y (B, T, C) with per-row mean/var (B,) and the affine of a GroupNorm(1, C)."""
    rstd = torch.rsqrt(var.float() + norm.eps)
    out = (y.float() - mean.float()[:, None, None]) * rstd[:, None, None]
    return (out * norm.weight.float() + norm.bias.float()).to(y.dtype)


def moments_to_stats(count, total, squares) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance from accumulated fp64 moments."""
    mean = total / count
    return mean, (squares / count - mean.square()).clamp_min(0.0)


class CausalConvTranspose1d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        self.norm = nn.GroupNorm(1, out_channels)

    @property
    def kernel_size(self) -> int:
        return self.conv.kernel_size[0]

    @property
    def stride(self) -> int:
        return self.conv.stride[0]

    @property
    def right_trim(self) -> int:
        return max(0, self.kernel_size - self.stride)

    def upsample(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C_in) -> transposed conv before norm and trim (B, (T-1)*s + k, C_out), full lengths."""
        _, T, _ = x.shape
        x = x.masked_fill(~valid_mask(lengths, T)[..., None], 0.0)
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return y, (lengths - 1).clamp_min(0) * self.stride + self.kernel_size

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C_in) -> (B, T * s, C_out) normalised over each row, trimmed; output lengths."""
        y, full = self.upsample(x, lengths)
        mean, var = moments_to_stats(*group_norm_moments(y, full))
        y = apply_group_norm(y, mean, var, self.norm)
        out_lengths = full - self.right_trim
        y = y[:, : y.shape[1] - self.right_trim]
        return y.masked_fill(~valid_mask(out_lengths, y.shape[1])[..., None], 0.0), out_lengths


class AudioDecoder(nn.Module):
    def __init__(self, config: AudioTokenizerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.dconv1 = CausalConvTranspose1d(d, d, config.avg_pooler, config.avg_pooler)
        self.layers = nn.ModuleList(
            TransformerLayer(d, config.decoder_attention_heads, config.decoder_ffn_dim)
            for _ in range(config.decoder_layers)
        )
        self.layer_norm = nn.LayerNorm(d)
        self.dconv2 = CausalConvTranspose1d(
            d, config.n_mels, config.decoder_kernel_size, config.decoder_stride_size
        )
        self.vocoder = TransformerVocos(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.layer_norm.weight.dtype

    def transform(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        caches: list[LayerKV] | None = None,
        past_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The 50 Hz transformer and final LayerNorm: x (B, T, d) -> (B, T, d).

        With ``caches`` (one :class:`LayerKV` per layer, (B, H, P, D), row b valid on its first
        ``past_lengths[b]`` entries) the new frames continue those sequences: they see the cached
        frames and each other causally, RoPE positions start at ``past_lengths[b]``, and the new
        keys/values are appended to the caches (at [P, P + T)).
        """
        _, T, _ = x.shape
        cfg = self.config
        offset = torch.zeros_like(lengths) if past_lengths is None else past_lengths
        positions = offset[:, None] + torch.arange(T, device=x.device)[None, :]
        rope = rope_cos_sin(positions, cfg.d_model // cfg.decoder_attention_heads, cfg.rope_theta, x.dtype)
        window = tuple(cfg.decoder_attn_window_size)
        if caches is None:
            mask = sequence_mask(lengths, T, causal=cfg.decoder_causal, window=window)
        else:
            mask = self._cached_mask(lengths, offset, caches[0].slots, T)
        for layer, kv in zip(self.layers, caches or [None] * len(self.layers), strict=True):
            x = layer(x, rope, mask, kv)
        return self.layer_norm(x)

    def _cached_mask(self, lengths: torch.Tensor, past: torch.Tensor, P: int, T: int) -> AttentionMask:
        """Queries (new frames) against [cache (P, row b valid below past[b]) | new (T)] keys."""
        if not self.config.decoder_causal:
            raise ValueError("cached decoding needs a causal decoder (decoder_causal=true)")
        left = self.config.decoder_attn_window_size[0]
        i = torch.arange(T, device=lengths.device)[None, :, None]  # (1, T, 1) new query index
        j = torch.arange(P + T, device=lengths.device)[None, None, :]  # (1, 1, P + T) key slot
        in_cache = (j < P) & (j < past[:, None, None])
        in_new = (j >= P) & (j - P <= i) & (j - P < lengths[:, None, None])
        allowed = in_cache | in_new  # (B, T, P + T)
        if left >= 0:
            key_pos = torch.where(j < P, j, past[:, None, None] + j - P)  # absolute positions
            allowed = allowed & (key_pos >= past[:, None, None] + i - left)
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        return AttentionMask(dense=allowed[:, None])

    def forward(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RVQ embeddings (B, T, d) padded -> waveform (B, T * 960) fp32, sample lengths (B,).

        Each row is decoded as if alone (official semantics for one sequence)."""
        x, len50 = self.dconv1(embeddings.to(self.dtype), lengths)
        x = self.transform(x, len50)
        mel, len100 = self.dconv2(x, len50)
        wav = self.vocoder(mel, len100)
        return wav, len100 * self.config.hop_length
