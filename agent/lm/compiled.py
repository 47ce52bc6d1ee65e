"""``--compile``: the hot path's functions under ``torch.compile`` (inductor).

At small batch a step costs its launches: eager, a 7B layer is ~30 kernels (norms in parts,
rotary, cache writes, bias adds ...); compiled, inductor fuses the pointwise work around each
matmul and attention into a few kernels (gpt-fast's approach; on a CPU rotary, the cache write and
attention are one hand-fused kernel, :mod:`agent.lm.fused_attention`). Three regions cover a tick
(:mod:`agent.lm.graphs`): the patch encoder with the backbone step, the text head with its sampler,
and the whole patch decoder (11 steps, heads, samplers). They are separate because the host reads
the text tokens between them (they decide which rows speak) and rows fresh from prefill join at
the head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.utils._python_dispatch import _disable_current_modes

# one graph per model, sampler-flag combination and region family: more than dynamo's default 8
RECOMPILE_LIMIT = 64


class Compiled:
    """``fn`` under ``torch.compile``: one whole graph (``fullgraph``: a graph break is an error, not
    a silent fallback to eager) with symbolic sizes (``dynamic``: every batch bucket, attention
    span and window shares it), compiled on first call. The host values ``fn`` branches on
    (sampler flags, gathered or in-place attention) are guarded: one graph for each combination.
    Instances are module-level, so every engine of a process shares the compiled code."""

    #: the region running now, while :func:`agent.lm.kernels.count_kernels` counts
    active: ClassVar[str | None] = None

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn, self.name = fn, name
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            self._compiled = torch.compile(self.fn, fullgraph=True, dynamic=True)
        if torch.autograd.profiler._is_profiler_enabled:  # counted on CUDA: the region's kernels by name
            with torch.profiler.record_function(f"region:{self.name}"):
                return self._compiled(*args, **kwargs)
        if not torch._C._len_torch_dispatch_stack():
            return self._compiled(*args, **kwargs)
        # a dispatch mode (the kernel counter) is on: dynamo would run fn eagerly under it, so the
        # mode steps aside and the counter reads the launches of the compiled code instead
        with _disable_current_modes():
            Compiled.active = self.name
            try:
                return self._compiled(*args, **kwargs)
            finally:
                Compiled.active = None
