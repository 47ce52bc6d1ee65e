"""Residual vector quantizer (spec 1.4): 20 Euclidean codebooks, no projections.

Module paths follow the official checkpoint: ``quantizer.vq.layers.N._codebook.embed`` [K_N, D].
The codebooks are always fp32, whatever dtype the rest of the model is cast to (the official code
calls ``quantizer.float()`` before every use); encoding and decoding run in fp32.
"""

from __future__ import annotations

import torch
from torch import nn


class EuclideanCodebook(nn.Module):
    """One codebook ``embed`` [K, D]. Device moves apply to it; dtype casts do not."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.register_buffer("embed", torch.zeros(codebook_size, dim, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # ``model.to(bf16)`` must not round the codebooks: probe where ``fn`` sends an fp32 tensor
        # and follow it to that device only.
        probe = fn(torch.zeros((), dtype=torch.float32, device=self.embed.device))
        if self.embed.is_meta and probe.device.type != "meta":  # ``to_empty`` after a meta build
            self.embed = torch.empty(self.embed.shape, dtype=torch.float32, device=probe.device)
        else:
            self.embed = self.embed.to(device=probe.device, dtype=torch.float32)
        return self

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest entry (L2) for each row of x (N, D) fp32."""
        embed = self.embed
        # the same expression (and so the same rounding) as the official code
        dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ embed.t() + embed.t().pow(2).sum(0, keepdim=True))
        return dist.max(dim=-1).indices


class VectorQuantization(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self._codebook = EuclideanCodebook(codebook_size, dim)


class ResidualVectorQuantization(nn.Module):
    def __init__(self, codebook_sizes: list[int], dim: int):
        super().__init__()
        self.layers = nn.ModuleList(VectorQuantization(size, dim) for size in codebook_sizes)


class ResidualVectorQuantizer(nn.Module):
    """``encode``: (N, D) -> codes (N, n_q); ``decode``: codes (N, n) -> sum of the n selected entries."""

    def __init__(self, dim: int, codebook_sizes: list[int]):
        super().__init__()
        self.dim = dim
        self.codebook_sizes = list(codebook_sizes)
        self.vq = ResidualVectorQuantization(self.codebook_sizes, dim)

    @property
    def num_quantizers(self) -> int:
        return len(self.codebook_sizes)

    def codebook(self, index: int) -> torch.Tensor:
        return self.vq.layers[index]._codebook.embed

    @torch.no_grad()
    def encode(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """Greedy residual quantisation of x (N, D) with the first ``n_q`` codebooks -> (N, n_q) int64."""
        n_q = self.num_quantizers if n_q is None else n_q
        if not 1 <= n_q <= self.num_quantizers:
            raise ValueError(f"n_q={n_q} is outside 1..{self.num_quantizers}")
        residual = x.float()
        codes = []
        for layer in self.vq.layers[:n_q]:
            book = layer._codebook
            idx = book.quantize(residual)
            residual = residual - book.embed[idx]
            codes.append(idx)
        return torch.stack(codes, dim=1) if codes else residual.new_zeros(x.shape[0], 0, dtype=torch.long)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., n) with n <= num_quantizers -> fp32 (..., D), the sum of the selected entries."""
        n = codes.shape[-1]
        if n > self.num_quantizers:
            raise ValueError(f"codes have {n} codebooks but the quantizer has {self.num_quantizers}")
        out = torch.zeros(*codes.shape[:-1], self.dim, dtype=torch.float32, device=self.codebook(0).device)
        for i in range(n):
            out = out + self.codebook(i)[codes[..., i]]
        return out

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise ValueError naming the first codebook whose codes fall outside its size."""
        if codes.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.shape[-1] > self.num_quantizers:
            raise ValueError(
                f"codes have {codes.shape[-1]} codebooks but the quantizer has {self.num_quantizers}"
            )
        if codes.numel() == 0:
            return
        low = codes.amin(dim=tuple(range(codes.dim() - 1)))
        high = codes.amax(dim=tuple(range(codes.dim() - 1)))
        for i in range(codes.shape[-1]):
            if low[i] < 0 or high[i] >= self.codebook_sizes[i]:
                raise ValueError(
                    f"codes for codebook {i} span {int(low[i])}..{int(high[i])}, "
                    f"outside 0..{self.codebook_sizes[i] - 1}"
                )
