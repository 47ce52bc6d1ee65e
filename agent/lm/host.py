"""Host values to device tensors without a device sync.

``torch.tensor(values, device="cuda")`` copies from pageable memory and waits for the stream to
drain; in the decode loop that would stall the GPU queue every step. Small per-step inputs
(slot ids, flags) go through pinned memory with a non-blocking copy instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(values: Sequence, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``values`` as a tensor on ``device``; asynchronous for CUDA."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class HostReader:
    """Device values the host must see, read as one copy: the tensors are flattened into one
    int64 device buffer, copied without blocking into a pinned host buffer (kept and grown, not
    allocated per read), and an event after the copy is waited for. That wait is the read's only
    synchronisation; it comes after everything queued before it, so one read per tick is the
    most the decode loop stalls. On a CPU the copy is a plain host copy."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.buffer = torch.empty(0, dtype=torch.int64)
        self.reads = 0  # copies made (what a test counts per tick)

    def read(self, *tensors: torch.Tensor) -> list[np.ndarray]:
        """The values of ``tensors`` (integer, any shapes) as int64 host arrays, in one copy."""
        flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])
        n = flat.shape[0]
        if self.buffer.shape[0] < n:
            self.buffer = torch.empty(max(n, 2 * self.buffer.shape[0], 64), dtype=torch.int64,
                                      pin_memory=self.device.type == "cuda")
        host = self.buffer[:n]
        host.copy_(flat, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            event.synchronize()
        self.reads += 1
        values = host.numpy()  # host memory, after the event: no device access
        out, at = [], 0
        for t in tensors:
            out.append(values[at : at + t.numel()].reshape(tuple(t.shape)).copy())
            at += t.numel()
        return out
