"""The backbone's KV cache: preallocated, one slot per session, explicit.

Keys and values live in two tensors ``[layers, slots, kv_heads, max_positions, head_dim]``. A
session owns a slot; its history is the prefix ``0..length(slot)-1`` of that slot, one position
per patch. Rolling back (barge-in, a cancelled turn) only changes the length: positions past it
are never read, because every query is masked to its slot's valid prefix.

Lengths are kept twice: a device tensor (read by the model without a host sync) and a host list
(read by scheduling logic: attention spans, capacity checks). Both are updated together by the
model's ``prefill``/``decode_step`` and by :meth:`rollback`/:meth:`reset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agent.lm.config import MiMoAudioConfig


class CacheFullError(RuntimeError):
    """A slot has no room for the positions asked for."""


@dataclass
class KVCache:
    """Preallocated keys/values for ``num_slots`` sessions of up to ``max_positions`` patches."""

    k: torch.Tensor  # (L, S, Hkv, T, d)
    v: torch.Tensor  # (L, S, Hkv, T, d)
    lengths: torch.Tensor  # (S,) int64 on the cache's device
    host_lengths: list[int]

    @classmethod
    def allocate(
        cls,
        config: MiMoAudioConfig,
        num_slots: int,
        max_positions: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """Zeroed cache for ``num_slots`` slots of ``max_positions`` patches each."""
        if num_slots < 1:
            raise ValueError(f"num_slots must be at least 1, got {num_slots}")
        if not 1 <= max_positions <= config.max_position_embeddings:
            raise ValueError(
                f"max_positions={max_positions} must be in 1..max_position_embeddings="
                f"{config.max_position_embeddings}"
            )
        shape = (
            config.num_hidden_layers,
            num_slots,
            config.num_key_value_heads,
            max_positions,
            config.head_dim,
        )
        return cls(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            lengths=torch.zeros(num_slots, dtype=torch.int64, device=device),
            host_lengths=[0] * num_slots,
        )

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_positions(self) -> int:
        return self.k.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def length(self, slot: int) -> int:
        """Valid positions in ``slot`` (host copy; no device sync)."""
        return self.host_lengths[self._check_slot(slot)]

    def free(self, slot: int) -> int:
        """Positions still available in ``slot``."""
        return self.max_positions - self.length(slot)

    def rollback(self, slot: int, length: int) -> None:
        """Forget everything in ``slot`` after its first ``length`` positions."""
        current = self.length(slot)
        if not 0 <= length <= current:
            raise ValueError(f"cannot roll slot {slot} back to {length}: it holds {current} positions")
        self.host_lengths[slot] = length
        self.lengths[slot] = length

    def reset(self, slot: int) -> None:
        """Empty ``slot`` for a new session."""
        self.rollback(slot, 0)

    def copy_slot(self, src: int, dst: int) -> None:
        """Make ``dst`` hold the same history as ``src`` (e.g. a shared system prompt)."""
        n = self.length(src)
        self._check_slot(dst)
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.host_lengths[dst] = n
        self.lengths[dst] = n

    # ------------------------------------------------------------------- used by the model
    def reserve(self, slots: Sequence[int], n: int) -> None:
        """Check that every slot in ``slots`` has room for ``n`` more positions."""
        for slot in slots:
            if self.length(slot) + n > self.max_positions:
                raise CacheFullError(
                    f"slot {slot} holds {self.length(slot)} of {self.max_positions} positions; "
                    f"{n} more do not fit"
                )

    def advance(self, slots: Sequence[int], slots_device: torch.Tensor, n: int) -> None:
        """Record ``n`` new positions written to each of ``slots``."""
        for slot in slots:
            self.host_lengths[slot] += n
        self.lengths.index_add_(0, slots_device, torch.full_like(slots_device, n))

    def _check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range: the cache has {self.num_slots} slots")
        return slot
