"""The transformer layer shared by the tokenizer's encoder, decoder and vocoder.

Pre-LN: ``x + attn(LN(x))`` then ``x + fc2(gelu(fc1(LN(x))))``; attention with ``q/v/out``
biases and an unbiased ``k_proj``; rotary embeddings (NeoX rotate-half over the full head_dim).
The official code packs variable-length sequences and calls flash-attn's varlen kernel; here
sequences are padded into a batch and an explicit mask keeps each one to its own keys, which gives
the same result per sequence. The vocoder's sliding window (40 back, 10 ahead) is computed in
blocks so memory stays linear in the length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, head_dim) for NeoX rotary embeddings.

    Computed in fp32 and then cast to the activation dtype, as the official code does.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (..., head_dim / 2)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@dataclass
class AttentionMask:
    """Which keys each query may see.

    ``dense``: boolean (B or 1, 1, Tq, Tk), True where allowed, or None for "everything" (or,
    with ``causal``, "keys up to the query": exact for padded rows too, as a real query never
    reaches the padding after it).
    ``window``: (left, right) for the blockwise sliding-window path (query i sees keys
    i-left..i+right among the first ``lengths[b]``), used instead of ``dense``.
    """

    dense: torch.Tensor | None = None
    causal: bool = False
    window: tuple[int, int] | None = None
    lengths: torch.Tensor | None = None


def sequence_mask(
    lengths: torch.Tensor,
    max_len: int,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
) -> AttentionMask:
    """Mask for a padded batch of independent sequences (the packed-varlen semantics).

    ``window`` follows flash-attn: (left, right), -1 meaning unbounded. A bounded window with no
    causal flag takes the blockwise path; the rest builds a dense mask (None when nothing is masked).
    """
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0 and right >= 0 and not causal:
        return AttentionMask(window=(left, right), lengths=lengths)
    B = lengths.shape[0]
    if left < 0 and causal:
        return AttentionMask(causal=True)
    if left < 0 and right < 0:
        if bool((lengths == max_len).all()):
            return AttentionMask()
        keys = torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]  # (B, Tk)
        return AttentionMask(dense=keys[:, None, None, :])  # the same for every query
    pos = torch.arange(max_len, device=lengths.device)
    i, j = pos[:, None], pos[None, :]
    allowed = (j[None] < lengths[:, None, None]).expand(B, max_len, max_len)  # (B, Tq, Tk)
    if right >= 0:
        allowed = allowed & (j <= i + right)
    if left >= 0:
        allowed = allowed & (j >= i - left)
    # padded query rows may have nothing left to see; let them see everything (their output is dropped)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return AttentionMask(dense=allowed[:, None])


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    left: int,
    right: int,
    lengths: torch.Tensor | None = None,
    block: int = 32,
) -> torch.Tensor:
    """Exact attention where query i sees keys i-left..i+right (and < lengths[b]); (B, H, T, D).

    Queries are cut into blocks; each block attends to its own slice of keys, so the work and
    memory are O(T * (block + left + right)) instead of O(T^2).
    """
    B, H, T, D = q.shape
    if T == 0:
        return q.clone()
    block = min(block, T)
    n_blocks = -(-T // block)
    T_pad = n_blocks * block
    span = block + left + right
    q = F.pad(q, (0, 0, 0, T_pad - T)).view(B, H, n_blocks, block, D)
    k = F.pad(k, (0, 0, left, T_pad - T + right)).unfold(2, span, block).transpose(-1, -2)  # (B,H,nb,span,D)
    v = F.pad(v, (0, 0, left, T_pad - T + right)).unfold(2, span, block).transpose(-1, -2)
    start = torch.arange(n_blocks, device=q.device)[:, None, None] * block
    qi = start + torch.arange(block, device=q.device)[None, :, None]  # (nb, block, 1) query index
    kj = start - left + torch.arange(span, device=q.device)[None, None, :]  # (nb, 1, span) key index
    lengths = torch.full((B,), T, device=q.device) if lengths is None else lengths
    allowed = (kj >= qi - left) & (kj <= qi + right) & (kj >= 0)  # (nb, block, span)
    allowed = allowed[None] & (kj[None] < lengths[:, None, None, None])  # (B, nb, block, span)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k.contiguous(), v.contiguous(), attn_mask=allowed[:, None])
    return out.reshape(B, H, T_pad, D)[:, :, :T]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Scaled dot-product attention (softmax scale 1/sqrt(head_dim)) under ``mask``."""
    if mask.window is not None:
        return sliding_window_attention(q, k, v, mask.window[0], mask.window[1], mask.lengths)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, is_causal=mask.causal)


class LayerKV:
    """Keys and values one attention layer has seen so far, for one or more sequences.

    ``k``/``v``: (B, H, P, D) with RoPE already applied. :class:`Attention` calls :meth:`append`
    with a layer's new keys/values, then attends to ``k``/``v``. This base grows by concatenation
    (the export graphs and one-off uses); the streaming decoder uses :class:`BoundedKV`. Owned by
    a per-stream state object, never by the module.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    @property
    def slots(self) -> int:
        """Cache slots before the next append (the mask's P)."""
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = torch.cat([self.k, k], dim=2)
        self.v = torch.cat([self.v, v], dim=2)


class BoundedKV(LayerKV):
    """A :class:`LayerKV` for one sequence in preallocated storage: ``k``/``v`` are views of the
    first ``length`` slots of ``k_store``/``v_store`` (1, H, capacity, D); appends write in place
    and never reallocate. Appending beyond the capacity is an error (the caller sizes it to what
    the decoder can attend to)."""

    def __init__(self, k_store: torch.Tensor, v_store: torch.Tensor) -> None:
        self.k_store, self.v_store = k_store, v_store
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k_store.shape[2]

    @property
    def k(self) -> torch.Tensor:  # type: ignore[override]
        return self.k_store[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor:  # type: ignore[override]
        return self.v_store[:, :, : self.length]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV cache full: {self.length} + {n} frames exceed its capacity {self.capacity}")
        self.k_store[:, :, self.length : self.length + n] = k
        self.v_store[:, :, self.length : self.length + n] = v
        self.length += n


class Attention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        kv: LayerKV | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); with ``kv`` the new keys/values are appended to it and attention covers
        the cached ones too (``mask`` then spans (Tq, P + T))."""
        B, T, C = x.shape
        cos, sin = rope
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            kv.append(k, v)
            k, v = kv.k, kv.v
        out = attend(q, k, v, mask)  # (B, H, T, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class TransformerLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = Attention(d_model, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        kv: LayerKV | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), rope, mask, kv)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype in (torch.float16, torch.bfloat16):
            # The official layer clamps half-precision overflow to +-(max - 1000); doing it always
            # (instead of after a host-synchronising inf check) changes no finite value.
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x
