"""Rotary, the cache write and decoding attention as one CPU kernel, for the compiled tick.

Compiled, a decoder layer is nine launches: two norms, the q/k/v, ``o_proj``, gate/up and
``down_proj`` matmuls, silu x mul, one kernel for rotary with the cache write, and attention.
Inductor cannot fuse rotary into attention (attention is a library call), so that pair stays two
kernels however the rest is fused. This is the pair as one kernel (flash-attn's
``flash_attn_with_kvcache`` is the same fusion on CUDA): each row's new query and key are rotated,
its key and value written at its position in its cache slot, and its query attends over that slot
up to the position, read where it lies (no gather of rows into a batch, no padded span, no mask).

The kernel is plain C++ (``rope_attend.cpp``), built once with the compiler inductor itself needs
on a CPU and called through ``ctypes``; ``mimo::rope_attend`` wraps it as a custom operator, so a
compiled region calls it as one opaque launch. It is used inside ``torch.compile`` on a CPU only
(:func:`enabled`): eager runs and the ONNX export keep the unfused path, which the compile tests
compare it with.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("rope_attend.cpp")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
_FUNCTIONS = {torch.float32: "rope_attend_f32", torch.bfloat16: "rope_attend_bf16"}

_lib: ctypes.CDLL | None = None


def load() -> None:
    """Build the kernel (once per source, compiler and flags; cached under the temp directory) and
    load it. Called before compiling a region: a traced function must find it loaded."""
    global _lib
    if _lib is not None:
        return
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("--compile on a CPU needs a C++ compiler (g++ or c++, or $CXX): none was found")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + compiler.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"mimo-agent-kernels-{os.getuid()}" / f"rope_attend-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} with {compiler} failed:\n{proc.stderr}")
        os.replace(tmp, out)  # atomic: concurrent builders each publish a whole library
    lib = ctypes.CDLL(str(out))
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 10 + [ctypes.POINTER(ctypes.c_int64), ctypes.c_float]
        fn.restype = ctypes.c_int
    _lib = lib


def enabled(device: torch.device) -> bool:
    """Whether attention runs fused here: inside ``torch.compile`` (not an export) on a CPU, once
    :func:`load` has run."""
    return (_lib is not None and device.type == "cpu" and torch.compiler.is_compiling()
            and not torch.compiler.is_exporting())


# a plain operator library, not ``torch.library.custom_op``: its Python wrapper cost 40-120 us a call,
# more than the kernel at the tiny sizes; the schema marks the caches as written
_OPS = torch.library.Library("mimo", "DEF")
_OPS.define("rope_attend(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
            "Tensor(b!) v_cache, int layer, Tensor? slots, Tensor positions) -> Tensor")


def _rope_attend_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, slots: torch.Tensor | None,
                     positions: torch.Tensor) -> torch.Tensor:
    """``mimo::rope_attend`` on a CPU. q (B, H, d), k and v (B, Hkv, d) of the new positions;
    cos/sin (B or 1, d); the caches of every layer (layers, slots, Hkv, positions, d), of which
    ``layer``'s is used (the whole tensors, not a layer's view: inductor regenerates a written
    view without its offset); ``slots`` (B,) each row's slot (None: row b is slot b);
    ``positions`` (B or 1,) where each row writes and up to which it attends -> (B, H, d)."""
    B, H, d = q.shape
    out = q.new_empty((B, H, d))
    tensors = (q, k, v, cos, sin, k_cache, v_cache)
    if any(t.stride(-1) != 1 for t in tensors) or k_cache.stride() != v_cache.stride():
        raise ValueError("rope_attend needs unit strides in the last dimension and caches of one layout")
    if q.dtype not in _FUNCTIONS or any(t.dtype != q.dtype for t in tensors):
        raise ValueError(f"rope_attend runs float32 or bfloat16 tensors of one dtype, got {q.dtype}")
    if positions.dtype != torch.int64 or any(t is not None and t.stride(-1) != 1 for t in (slots, positions)):
        raise ValueError("rope_attend takes contiguous int64 slots and positions")
    if not 0 <= layer < k_cache.shape[0]:
        raise IndexError(f"rope_attend: layer {layer} of a {k_cache.shape[0]}-layer cache")
    assert _lib is not None, "fused_attention.load() first"
    layer_offset = layer * k_cache.stride(0) * k_cache.element_size()
    refused = getattr(_lib, _FUNCTIONS[q.dtype])(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        k_cache.data_ptr() + layer_offset, v_cache.data_ptr() + layer_offset,
        None if slots is None else slots.data_ptr(), positions.data_ptr(), out.data_ptr(),
        (ctypes.c_int64 * 21)(
            # sizes: B, H, Hkv, d, positions, slots (0: row b is slot b), the caches' slots and positions
            B, H, k.shape[1], d, positions.numel(), 0 if slots is None else slots.numel(), k_cache.shape[1],
            k_cache.shape[3],
            # strides: q, k, v (row, head), cos, sin (row; 0 for one row), caches (slot, head, position), out
            *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], cos.stride(0) if cos.shape[0] > 1 else 0,
            sin.stride(0) if sin.shape[0] > 1 else 0, *k_cache.stride()[1:4], *out.stride()[:2]),
        d**-0.5)
    if refused:
        raise IndexError(f"rope_attend: a row's slot or position is outside the {k_cache.shape[1]} slots "
                         f"x {k_cache.shape[3]} positions of the cache")
    return out


_OPS.impl("rope_attend", _rope_attend_cpu, "CPU")


@torch.library.register_fake("mimo::rope_attend")
def _(q, k, v, cos, sin, k_cache, v_cache, layer, slots, positions):
    return q.new_empty(q.shape)


def rope_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, slots: torch.Tensor | None,
                positions: torch.Tensor) -> torch.Tensor:
    """``mimo::rope_attend`` on a layer's shapes: q (B, H, 1, d), k/v (B, Hkv, 1, d) unrotated,
    cos/sin (B or 1, 1, d) -> attention (B, H, 1, d)."""
    d = q.shape[-1]
    return torch.ops.mimo.rope_attend(q[:, :, 0], k[:, :, 0], v[:, :, 0], cos.reshape(-1, d), sin.reshape(-1, d),
                                      k_cache, v_cache, layer, slots, positions).unsqueeze(2)
