"""Audio encoder (spec 1.3): 100 Hz log-mel -> 50 Hz transformer -> 25 Hz features -> RVQ codes.

A batch holds independent sequences padded to one length. Everything that could mix a padded
position into a real one is masked, so each sequence gets exactly what it would get alone (the
official packed batch does not quite: its convolutions and down-sampling see the padding of
shorter items, spec 1.3 step 7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AudioTokenizerConfig
from .rvq import ResidualVectorQuantizer
from .transformer import TransformerLayer, rope_cos_sin, sequence_mask


def _mask_time(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero x (B, T, C) beyond each row's length."""
    _, T, _ = x.shape
    valid = torch.arange(T, device=x.device)[None, :] < lengths[:, None]  # (B, T)
    return x.masked_fill(~valid[..., None], 0.0)


class AudioEncoder(nn.Module):
    def __init__(self, config: AudioTokenizerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.n_mels, d, kernel_size=config.kernel_size, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=config.kernel_size, stride=config.stride_size, padding=1)
        self.layers = nn.ModuleList(
            TransformerLayer(d, config.encoder_attention_heads, config.encoder_ffn_dim)
            for _ in range(config.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(d)
        self.down_sample_layer = nn.Sequential(
            nn.Conv1d(d, d, config.avg_pooler, config.avg_pooler, bias=False), nn.GELU()
        )
        self.down_sample_norm = nn.LayerNorm(d)
        self.quantizer = ResidualVectorQuantizer(d, config.codebook_size)

    @staticmethod
    def output_lengths(mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(50 Hz lengths, 25 Hz lengths) for mel lengths: ceil(L / 2), then ceil of that / 2."""
        half = (mel_lengths + 1) // 2
        return half, (half + 1) // 2

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, T_mel, n_mels) padded, lengths (B,) -> features (B, T25, d_model), lengths (B,).

        The features are those the RVQ quantises (after ``down_sample_norm``), in the model dtype.
        """
        B = mel.shape[0]
        cfg = self.config
        dtype = self.conv1.weight.dtype
        x = _mask_time(mel.to(dtype), lengths).transpose(1, 2)  # (B, n_mels, T)
        x = F.gelu(self.conv1(x))
        # conv2 must see zeros past the end, as it would for this sequence alone
        x = _mask_time(x.transpose(1, 2), lengths).transpose(1, 2)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T50, d)
        len50, len25 = self.output_lengths(lengths)
        T50 = x.shape[1]

        positions = torch.arange(T50, device=x.device)[None, :].expand(B, T50)
        rope = rope_cos_sin(positions, cfg.d_model // cfg.encoder_attention_heads, cfg.rope_theta, x.dtype)
        window = tuple(cfg.encoder_attn_window_size)
        mask = sequence_mask(len50, T50, causal=cfg.encoder_causal, window=window)
        skip = None
        for idx, layer in enumerate(self.layers):
            x = layer(x, rope, mask)
            if cfg.encoder_skip_layer_id is not None and idx == cfg.encoder_skip_layer_id - 1:
                skip = x
        if skip is not None:
            x = x + skip
        x = self.layer_norm(x)

        # down-sample by avg_pooler: zero-pad each sequence to a multiple of it, as done alone
        x = _mask_time(x, len50)
        pad = (-T50) % cfg.avg_pooler
        x = F.pad(x, (0, 0, 0, pad)).transpose(1, 2)  # (B, d, T50 + pad)
        x = self.down_sample_layer(x).transpose(1, 2)  # (B, T25, d)
        x = self.down_sample_norm(x)
        return x, len25

    @torch.no_grad()
    def encode(self, mel: torch.Tensor, lengths: torch.Tensor, n_q: int | None = None) -> list[torch.Tensor]:
        """mel (B, T_mel, n_mels) padded -> codes (T25_b, n_q) int64 per sequence (default: all codebooks)."""
        features, len25 = self.forward(mel, lengths)
        _, T, _ = features.shape
        valid = torch.arange(T, device=features.device)[None, :] < len25[:, None]
        codes = self.quantizer.encode(features[valid].float(), n_q)  # (sum T25_b, n_q)
        return list(codes.split(len25.tolist()))
