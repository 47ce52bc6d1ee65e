"""Host values to device tensors without a device sync.

``torch.tensor(values, device="cuda")`` copies from pageable memory and waits for the stream to
drain; in the decode loop that would stall the GPU queue every step. Small per-step inputs
(slot ids, flags) go through pinned memory with a non-blocking copy instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``values`` as a tensor on ``device``; asynchronous for CUDA."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
