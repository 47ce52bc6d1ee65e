"""The engine's memory plan: what ``max_sessions`` costs on its device, checked before allocating.

Computed at start-up from the config and the loaded weights, before the KV cache exists, so a
``--max-sessions`` that cannot fit is refused with the figures instead of failing later with an
out-of-memory error (or, on a CPU, swapping). Per session: its slot of the LM's KV cache and its
response's codec decoder KV cache (one bounded 60 s segment per stream); per engine: one more
slot for the CUDA-graph padding rows, and the activations of a decode step at ``max_batch`` rows
and of a prefill chunk. The weights are already loaded, so the memory they take is not counted
against what is available: on CUDA the available figure is ``torch.cuda.mem_get_info``'s free
memory (after the weights), on a CPU ``MemAvailable`` of ``/proc/meminfo``. ``limit_bytes``
replaces that figure (a share of a device, or a test's small machine).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from agent.lm.config import MiMoAudioConfig


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes the engine needs, and what the device has."""

    max_sessions: int
    weights_bytes: int  # LM and codec parameters and buffers, loaded already
    lm_kv_bytes_per_session: int  # one slot of the LM's KV cache
    codec_kv_bytes_per_session: int  # one codec decode stream's KV cache
    extra_slots: int  # KV slots besides the sessions' (the CUDA-graph scratch slot)
    max_batch: int  # rows of a decode step
    activation_bytes_per_row: int  # a decode step's working memory per row
    activation_bytes_fixed: int  # a prefill chunk's
    available_bytes: int  # free on the device now (after the weights), or the given limit
    limited: bool  # available_bytes is a given limit, not the device's figure
    device: str

    @property
    def per_session_bytes(self) -> int:
        return self.lm_kv_bytes_per_session + self.codec_kv_bytes_per_session

    def total_for(self, sessions: int) -> int:
        """What the engine allocates beyond the weights for ``sessions`` sessions."""
        activations = self.activation_bytes_fixed + min(self.max_batch, sessions) * self.activation_bytes_per_row
        return sessions * self.per_session_bytes + self.extra_slots * self.lm_kv_bytes_per_session + activations

    @property
    def activation_bytes(self) -> int:
        return self.activation_bytes_fixed + min(self.max_batch, self.max_sessions) * self.activation_bytes_per_row

    @property
    def total_bytes(self) -> int:
        return self.total_for(self.max_sessions)

    @property
    def fitting_sessions(self) -> int:
        """The most sessions the available memory holds (``total_for`` grows with the sessions)."""
        lo, hi = 0, self.available_bytes // max(1, self.per_session_bytes) + 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.total_for(mid) <= self.available_bytes else (lo, mid - 1)
        return lo

    def fits(self) -> bool:
        return self.total_bytes <= self.available_bytes

    def describe(self) -> str:
        mib = 2**20
        where = "the given limit" if self.limited else f"free on {self.device}"
        return (f"weights {self.weights_bytes / mib:,.1f} MiB (loaded); {self.max_sessions} sessions x "
                f"(LM KV {self.lm_kv_bytes_per_session / mib:,.1f} MiB + codec KV "
                f"{self.codec_kv_bytes_per_session / mib:,.1f} MiB) + {self.extra_slots} scratch slot(s) + "
                f"activations {self.activation_bytes / mib:,.1f} MiB = {self.total_bytes / mib:,.1f} MiB of "
                f"{self.available_bytes / mib:,.1f} MiB {where}")

    def check(self) -> None:
        """Raise a ``ValueError`` naming the figures when the sessions do not fit."""
        if not self.fits():
            raise ValueError(
                f"--max-sessions {self.max_sessions} does not fit: {self.describe()}. At most "
                f"{self.fitting_sessions} sessions fit; lower --max-sessions or --max-positions, or pass "
                "--ignore-memory-plan to start anyway")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_session_bytes": self.per_session_bytes, "total_bytes": self.total_bytes,
                "activation_bytes": self.activation_bytes, "fitting_sessions": self.fitting_sessions}


def module_bytes(*modules: Any) -> int:
    """Parameters and buffers of the modules (each tensor once)."""
    seen, total = set(), 0
    for m in modules:
        if not isinstance(m, nn.Module):
            continue
        for t in (*m.parameters(), *m.buffers()):
            key = (t.device, t.data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def kv_bytes_per_slot(config: MiMoAudioConfig, max_positions: int, dtype: torch.dtype) -> int:
    """One slot of the backbone's KV cache: keys and values of every layer at every position."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * max_positions * config.head_dim * itemsize


def activation_bytes(config: MiMoAudioConfig, dtype: torch.dtype, *, max_positions: int,
                     prefill_chunk: int) -> tuple[int, int]:
    """An upper estimate of the working memory of a decode step, per row, and of a prefill chunk.

    Per decode row: the text logits in fp32 and the sampler's copies of them (scores, sorted
    scores, probabilities, cumulative sums: 5 x 4 bytes) and its int64 order (8 bytes); the
    attention scores of every head over the context; the patch decoder's cache and logits.
    Per prefill chunk: the MLP's three intermediate activations and the attention scores of
    the chunk against the context, in the model's dtype."""
    item = torch.empty(0, dtype=dtype).element_size()
    heads = config.num_attention_heads
    decode_row = (28 * config.vocab_size + 4 * heads * max_positions
                  + 2 * config.local_layers * config.local_steps * config.local_dim * item
                  + 28 * sum(config.speech_vocab_sizes))
    chunk = min(prefill_chunk, max_positions)
    prefill = (3 * chunk * config.intermediate_size + heads * chunk * max_positions
               + 4 * chunk * config.hidden_size) * item
    return decode_row, prefill


def available_bytes(device: torch.device) -> int:
    """Memory free for new allocations on ``device``: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_memory(lm: Any, codec: Any, *, max_sessions: int, max_positions: int, max_batch: int, prefill_chunk: int,
                extra_slots: int, limit_bytes: int | None = None) -> MemoryPlan:
    """The plan for ``lm`` (loaded on its device) and ``codec``; see the module docstring."""
    config, device, dtype = lm.config, lm.device, lm.dtype
    codec_kv = int(codec.decode_cache_bytes()) if hasattr(codec, "decode_cache_bytes") else 0
    per_row, fixed = activation_bytes(config, dtype, max_positions=max_positions, prefill_chunk=prefill_chunk)
    return MemoryPlan(
        max_sessions=max_sessions,
        weights_bytes=module_bytes(lm, codec),
        lm_kv_bytes_per_session=kv_bytes_per_slot(config, max_positions, dtype),
        codec_kv_bytes_per_session=codec_kv,
        extra_slots=extra_slots,
        max_batch=max(1, max_batch),
        activation_bytes_per_row=per_row,
        activation_bytes_fixed=fixed,
        available_bytes=int(limit_bytes) if limit_bytes is not None else available_bytes(device),
        limited=limit_bytes is not None,
        device=str(device),
    )
