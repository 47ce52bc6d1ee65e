"""Qwen2 transformer blocks, shared by the backbone, the patch decoder and the patch encoder.

RMSNorm, RoPE (rotate-half, theta from the config), grouped-query attention with q/k/v bias and
no o_proj bias, SwiGLU MLP: numerically the Qwen2 of transformers 4.49 (norms in fp32, RoPE
tables computed in fp32 and cast to the activation dtype). Attribute names are the official
checkpoint key names (``self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm`` ...).

The blocks hold weights only, and the decoder-layer loop exists once, :meth:`TransformerStack.run`:
every user of a stack (the backbone's prefill and decode step with its slot KV cache, the CUDA-graph
step, the patch decoder with its 11-step cache, the patch encoder with no cache, and the ONNX
graphs built from them) passes it an attention function that decides where keys live and which
positions a query may see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from agent.lm.config import StackConfig


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, scale in the activation dtype. ``F.rms_norm`` is one fused
    kernel on CUDA (its decomposition on a CPU); in fp32 it takes the weight too."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), shape, eps=self.eps).to(x.dtype)


class RotaryTable:
    """cos/sin tables of rotate-half RoPE for positions ``0..max_positions-1``.

    Not a module buffer: the tables are derived constants that must stay fp32 whatever dtype the
    weights are cast to; they are built once per device on first use.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each fp32 [max_positions, head_dim]; the first half of ``sin`` is negated
        (see :func:`apply_rope`)."""
        device = torch.device(device)
        if device not in self._tables:
            d = self.head_dim
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
            pos = torch.arange(self.max_positions, dtype=torch.int64).float()
            freqs = pos[:, None] * inv_freq[None, :]  # (T, d/2), one fp32 product as in HF
            emb = torch.cat([freqs, freqs], dim=-1)  # (T, d)
            sin = emb.sin()
            sin[:, : d // 2] *= -1  # rotate_half's sign, folded into the table
            self._tables[device] = (emb.cos().to(device), sin.to(device))
        return self._tables[device]

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for ``positions`` (any shape), cast to ``dtype``: shape positions.shape + (d,)."""
        cos, sin = self.get(positions.device)
        return cos[positions].to(dtype), sin[positions].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, ``x * cos + rotate_half(x) * sin``; ``cos``/``sin`` broadcast against ``x``
    (..., head_dim), ``sin`` with its first half negated (:meth:`RotaryTable.get`), so
    ``rotate_half(x) * sin`` is the halves of x swapped (one roll) times that table: three kernels."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class FusedLinear:
    """Linear layers that read the same input, run as one matmul (q/k/v; gate/up).

    The layers keep their official parameters (so a checkpoint loads, saves and fingerprints as
    it is), but each parameter is a view of one concatenated weight (and bias): loading copies
    into the views, so the concatenation is made once, when the weights are placed, and never
    per step; no weight is held twice. A move to another device or dtype copies each parameter
    on its own, so the owner calls :meth:`refuse` after one. Not a module (its tensors are no
    buffers: moves and state dicts see the layers' parameters only).

    The single matmul is used for inference (parameters without grad); a layer whose weights
    train (``requires_grad``) and the ONNX export (whose graphs keep the official three
    projections, so exported graphs do not change) run the layers one by one.
    """

    def __init__(self, *layers: nn.Linear) -> None:
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.refuse()

    def refuse(self) -> None:
        """Concatenate the layers' current parameters and make each a view of the result."""
        def fuse(name: str) -> torch.Tensor | None:
            params = [getattr(layer, name) for layer in self.layers]
            if params[0] is None:
                return None
            whole = torch.cat([p.detach() for p in params])
            start = 0
            for layer, p, n in zip(self.layers, params, self.sizes, strict=True):
                setattr(layer, name, nn.Parameter(whole[start : start + n], requires_grad=p.requires_grad))
                start += n
            return whole

        self.weight, self.bias = fuse("weight"), fuse("bias")
        self.views = self.layers[0].weight  # a parameter set afresh (a load with assign=True) is no view


    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each layer's output for x (..., in): views of one matmul's result, or the layers' own."""
        return self.select(x, range(len(self.layers)))

    def select(self, x: torch.Tensor, which: Sequence[int]) -> list[torch.Tensor]:
        """The outputs of layers ``which`` only. Fused, one matmul over the weight rows of the layers
        from the first to the last of ``which`` (a contiguous slice: the patch decoder's steps take
        consecutive heads), else those layers run alone."""
        first = self.layers[0].weight
        if first.requires_grad or first is not self.views or torch.compiler.is_exporting():
            return [self.layers[i](x) for i in which]
        lo, hi = min(which), max(which) + 1
        start, end = sum(self.sizes[:lo]), sum(self.sizes[:hi])
        bias = None if self.bias is None else self.bias[start:end]
        outs = F.linear(x, self.weight[start:end], bias).split(self.sizes[lo:hi], dim=-1)
        return [outs[i - lo] for i in which]


class Attention(nn.Module):
    """Projections of Qwen2 grouped-query attention; the attention itself is :func:`attend`."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.fused = FusedLinear(self.q_proj, self.k_proj, self.v_proj)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.fused.refuse()  # a dtype or device move copies each projection on its own
        return out

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and rotate: x (B, T, C), cos/sin (B or 1, T, d) -> q (B, H, T, d), k/v (B, Hkv, T, d).
        cos None: q and k come unrotated (the attention function rotates them in its fused kernel)."""
        B, T, _ = x.shape
        q, k, v = self.fused(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        if cos is None or sin is None:
            return q, k, v
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + o_proj(attn): attn (B, H, T, d), residual (B, T, C) -> (B, T, C)."""
        B, H, T, d = attn.shape
        return add_linear(residual, attn.transpose(1, 2).reshape(B, T, H * d), self.o_proj.weight)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may attend) as the additive bias SDPA turns it into: built once per
    step by the caller instead of once per layer inside SDPA (three kernels a layer)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads, without repeating keys.

    q (B, H, T, d); k, v (B, Hkv, S, d); mask (B or 1, 1, T, S) bool, True = may attend, or its
    :func:`attention_bias`;
    ``causal`` (without a mask) aligns query i with key i. For one query position (decoding) the
    H query heads are folded onto their Hkv key heads as extra query rows, so each key head is
    read once per group and one mask row serves them all; longer queries (prefill) use SDPA's
    grouped-query mode.
    """
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    is_causal = causal and mask is None
    if Hkv == H or T > 1:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=Hkv != H
        )
    qg = q.reshape(B, Hkv, H // Hkv, d)  # (B, Hkv, G, d): the G heads of a group as query rows
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).reshape(B, H, T, d)


def add_linear(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``residual + x @ weight.T`` as one matmul that accumulates onto the residual (``addmm``):
    the residual add rides in the matmul's epilogue instead of a kernel of its own."""
    C = residual.shape[-1]
    return torch.addmm(residual.reshape(-1, C), x.reshape(-1, x.shape[-1]), weight.t()).view(residual.shape)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = FusedLinear(self.gate_proj, self.up_proj)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.fused.refuse()
        return out

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + down(silu(gate(x)) * up(x))."""
        gate, up = self.fused(x)
        return add_linear(residual, F.silu(gate) * up, self.down_proj.weight)


#: (layer index, q (B, H, T, d), k, v (B, Hkv, T, d) of the new positions) -> attention (B, H, T, d).
#: The callable stores the new keys and values where its user keeps them and attends to them.
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DecoderLayer(nn.Module):
    """One pre-norm Qwen2 layer; :meth:`TransformerStack.run` chains them."""

    def __init__(self, cfg: StackConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, index: int,
                attention: AttentionFn) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); ``attention(index, q, k, v)`` sees the new positions' q, k, v."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), cos, sin)
        x = self.self_attn.out(attention(index, q, k, v), residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class TransformerStack(nn.Module):
    """``layers.N`` and a final ``norm`` (plus ``embed_tokens`` for the backbone), official names."""

    def __init__(self, cfg: StackConfig, *, max_positions: int, vocab_size: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        if vocab_size is not None:
            self.embed_tokens = nn.Embedding(vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryTable(cfg.head_dim, cfg.rope_theta, max_positions)

    def run(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
            attention: AttentionFn) -> torch.Tensor:
        """The decoder-layer loop: x (B, T, C) at the rotary angles cos/sin (B or 1, T, d) through
        every layer, then the final norm. ``attention`` keeps each layer's keys and values; with
        cos/sin None it is given q and k unrotated and rotates them itself
        (:mod:`agent.lm.fused_attention`)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, attention)
        return self.norm(x)

    def forward(self, x: torch.Tensor, *, causal: bool) -> torch.Tensor:
        """All T positions of x (B, T, C) at positions 0..T-1, no cache (the patch encoder)."""
        _, T, _ = x.shape
        cos, sin = self.rope.at(torch.arange(T, device=x.device), x.dtype)
        return self.run(x, cos.unsqueeze(0), sin.unsqueeze(0), lambda _, q, k, v: attend(q, k, v, causal=causal))
