"""The fused rotary + cache write + attention kernel of the compiled tick (agent/lm/fused_attention.py)
against the unfused path it replaces: rotary, the cache write, and SDPA over each row's slot."""

from __future__ import annotations

import shutil

import pytest
import torch

from agent.lm import fused_attention
from agent.lm.transformer import RotaryTable, apply_rope, attend

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="the fused kernel is built with a C++ compiler (.ci/run installs g++)")


def _unfused(q, k, v, cos, sin, k_cache, v_cache, slots, positions):
    """What the layer and the attention functions do without the kernel, one row at a time."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B or 1, 1, 1, d)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = []
    for b in range(q.shape[0]):
        s = b if slots is None else int(slots[b])
        p = int(positions[0 if positions.numel() == 1 else b])
        k_cache[s, :, p] = k[b, :, 0]
        v_cache[s, :, p] = v[b, :, 0]
        out.append(attend(q[b : b + 1], k_cache[s : s + 1, :, : p + 1], v_cache[s : s + 1, :, : p + 1]))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ["scattered", "patch decoder"])
def test_the_kernel_rotates_writes_and_attends_as_the_unfused_path(dtype, rows) -> None:
    fused_attention.load()
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, d, slots_n, P = 3, 8, 2, 32, 6, 40  # grouped-query heads: 4 queries per key head

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = randn(B, H, 1, d), randn(B, Hkv, 1, d), randn(B, Hkv, 1, d)
    k_cache, v_cache = randn(slots_n, Hkv, P, d), randn(slots_n, Hkv, P, d)
    if rows == "scattered":  # the backbone: rows in any slots, each at its own length
        slots, positions = torch.tensor([4, 0, 2]), torch.tensor([17, 0, 39])
    else:  # the patch decoder: row b in slot b, every row at the same step
        slots, positions = None, torch.tensor([5])
    cos, sin = RotaryTable(d, 10000.0, P).at(positions.view(-1, 1), dtype)  # (B or 1, 1, d)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = _unfused(q, k, v, cos, sin, want_k, want_v, slots, positions)
    layers_k, layers_v = torch.stack([k_cache + 1, k_cache]), torch.stack([v_cache + 1, v_cache])  # layer 1 of 2
    other = layers_k[0].clone(), layers_v[0].clone()
    got = fused_attention.rope_attend(q, k, v, cos, sin, layers_k, layers_v, 1, slots, positions)
    assert torch.equal(layers_k[0], other[0]) and torch.equal(layers_v[0], other[1])  # the other layer untouched
    k_cache, v_cache = layers_k[1], layers_v[1]
    # bf16: the unfused path rounds x * cos before adding the rotated half; the kernel rounds once
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.02}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(k_cache, want_k, **tol)
    assert torch.equal(v_cache, want_v)


def test_the_kernel_names_what_it_cannot_run() -> None:
    fused_attention.load()
    q = torch.zeros(1, 2, 1, 8)
    cache = torch.zeros(1, 2, 1, 4, 8)
    rope = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        fused_attention.rope_attend(q.double(), q[:, :1].double(), q[:, :1].double(), rope.double(), rope.double(),
                                    cache.double(), cache.double(), 0, None, torch.tensor([0]))
    with pytest.raises(ValueError, match="int64 slots and positions"):
        fused_attention.rope_attend(q, q[:, :1], q[:, :1], rope, rope, cache, cache, 0, None, torch.tensor([0.0]))
    with pytest.raises(IndexError, match="outside the"):  # position 4 of a 4-position cache: nothing written
        fused_attention.rope_attend(q, q[:, :1], q[:, :1], rope, rope, cache, cache, 0, None, torch.tensor([4]))
    with pytest.raises(IndexError, match="outside the"):
        fused_attention.rope_attend(q, q[:, :1], q[:, :1], rope, rope, cache, cache, 0, torch.tensor([2]),
                                    torch.tensor([0]))
    with pytest.raises(IndexError, match="layer 1 of a 1-layer cache"):
        fused_attention.rope_attend(q, q[:, :1], q[:, :1], rope, rope, cache, cache, 1, None, torch.tensor([0]))
