"""CUDA graphs for the two fixed-shape hot paths of decoding: the backbone decode step and the
patch decoder's 11-step loop.

At small batch a decode step is hundreds of small kernels, and the GPU waits on Python to launch
each; a captured graph replays them with one launch. Graphs need fixed shapes and fixed
addresses, so:

- rows: a batch of B rows runs in the graph of the next batch bucket (1, 2, 4, ... ``max_batch``);
  padding rows of the backbone step write to a scratch KV-cache slot that no session owns (the
  engine allocates one more slot when graphs are on), padding rows of the patch decoder repeat
  row 0; their outputs are dropped;
- keys: the backbone step attends over the next span bucket (64, 128, ... ``max_positions``)
  above the longest row, masked per row, and gathers its rows' keys from the cache there;
- sampling: the sampler's host flags (all greedy, top-k, top-p, some greedy) choose its code
  path, so patch-decoder graphs are keyed by them too: the greedy path and the server's default
  speech sampling are captured at start, other settings on first use;
- random numbers are drawn outside the graph from each row's own generator and copied into it,
  so seeded sessions stay reproducible and equal to the eager path.

Every input lives in a static buffer that is filled before a replay; outputs are cloned after it
(graphs share one memory pool). On a CPU nothing is captured: the same padded static-shape
functions run eagerly, which is how the tests check them against the model's own ``decode_step``
and ``decode_patch``. :class:`DecodeGraphs` is what the engine calls instead of those two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from agent.lm import patch_decoder
from agent.lm.host import to_device
from agent.lm.kv_cache import KVCache
from agent.lm.sampling import GREEDY, SamplingBatch, SamplingParams, draw_uniform
from agent.lm.transformer import attend

if TYPE_CHECKING:
    from agent.lm.model import MiMoAudioLM

log = logging.getLogger(__name__)

MIN_SPAN = 64
WARMUP_RUNS = 2  # eager runs on a side stream before each capture


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from ``start`` below ``limit``, then ``limit``: 1, 2, 4, ..., limit."""
    out, n = [], start
    while n < limit:
        out.append(n)
        n *= 2
    return [*out, limit]


def bucket_of(n: int, sizes: Sequence[int]) -> int:
    for size in sizes:
        if n <= size:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


def static_decode_step(lm: MiMoAudioLM, cache: KVCache, slots: torch.Tensor, emb: torch.Tensor,
                       span: int) -> torch.Tensor:
    """:meth:`MiMoAudioLM.decode_step` with fixed shapes and no host reads: emb (B, 1, hidden) at the
    slots' current lengths (device values), keys over the first ``span`` positions, masked per row.
    Does not advance the cache's lengths (the caller does, for the real rows)."""
    B, _, _ = emb.shape
    pos = cache.lengths.index_select(0, slots)  # (B,)
    cos, sin = lm.model.rope.at(pos.view(B, 1), emb.dtype)  # (B, 1, d)
    mask = (torch.arange(span, device=emb.device) <= pos[:, None]).view(B, 1, 1, span)
    x = emb
    for layer, k_cache, v_cache in zip(lm.model.layers, cache.k, cache.v, strict=True):
        q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
        k_cache[slots, :, pos] = k[:, :, 0]
        v_cache[slots, :, pos] = v[:, :, 0]
        keys = k_cache[:, :, :span].index_select(0, slots)  # (B, Hkv, span, d)
        values = v_cache[:, :, :span].index_select(0, slots)
        x = x + layer.self_attn.out(attend(q, keys, values, mask))
        x = layer.feed_forward(x)
    return lm.model.norm(x[:, -1])


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph, or None when running eagerly
    output: torch.Tensor | None
    run: Callable[[], torch.Tensor]


@dataclass
class _PatchInputs:
    h: torch.Tensor  # (B, hidden)
    uniform: torch.Tensor  # (B, num_codes)
    temperature: torch.Tensor  # (B,)
    top_k: torch.Tensor
    top_p: torch.Tensor
    greedy: torch.Tensor


class DecodeGraphs:
    """Graph-replayed ``decode_step`` and ``decode_patch`` for one model and KV cache (see the
    module docstring). ``capture`` defaults to whether the model is on a CUDA device."""

    def __init__(self, lm: MiMoAudioLM, cache: KVCache, *, max_batch: int, scratch_slot: int,
                 capture: bool | None = None) -> None:
        device = lm.device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device}")
        if not 0 <= scratch_slot < cache.num_slots:
            raise ValueError(f"scratch slot {scratch_slot} is not a slot of a {cache.num_slots}-slot cache")
        if max_batch >= cache.num_slots:
            raise ValueError(f"max_batch {max_batch} leaves no scratch slot in a {cache.num_slots}-slot cache")
        self.lm, self.cache, self.scratch = lm, cache, scratch_slot
        self.batch_buckets = buckets(max_batch)
        self.span_buckets = [s for s in buckets(cache.max_positions, MIN_SPAN) if s <= cache.max_positions]
        hidden, codes = lm.config.hidden_size, lm.schedule.num_codes
        self._emb = {b: torch.zeros(b, 1, hidden, device=device, dtype=lm.dtype) for b in self.batch_buckets}
        self._slots = {b: torch.full((b,), scratch_slot, dtype=torch.int64, device=device)
                       for b in self.batch_buckets}
        self._patch = {b: _PatchInputs(
            h=torch.zeros(b, hidden, device=device, dtype=lm.dtype),
            uniform=torch.full((b, codes), 0.5, device=device),
            temperature=torch.ones(b, device=device), top_k=torch.zeros(b, dtype=torch.int64, device=device),
            top_p=torch.ones(b, device=device), greedy=torch.ones(b, dtype=torch.bool, device=device),
        ) for b in self.batch_buckets}
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.captures = 0
        self.capture_s = 0.0

    # --------------------------------------------------------------------------- backbone step
    @torch.inference_mode()
    def decode_step(self, cache: KVCache, slots: torch.Tensor | Sequence[int], emb: torch.Tensor) -> torch.Tensor:
        """Same contract as :meth:`MiMoAudioLM.decode_step` (on this object's cache)."""
        if cache is not self.cache:
            raise ValueError("these graphs were built for another KV cache")
        slot_list = [int(s) for s in (slots.tolist() if isinstance(slots, torch.Tensor) else slots)]
        B = len(slot_list)
        if emb.shape[0] != B or emb.shape[1] != 1:
            raise ValueError(f"decode_step takes emb (B, 1, hidden) with B = len(slots) = {B}; got {tuple(emb.shape)}")
        if len(set(slot_list)) != B or self.scratch in slot_list:
            raise ValueError(f"decode_step slots must be distinct session slots, got {slot_list}")
        cache.reserve(slot_list, 1)
        rows = bucket_of(B, self.batch_buckets)
        span = bucket_of(max(cache.length(s) for s in slot_list) + 1, self.span_buckets)
        self._emb[rows][:B].copy_(emb)
        self._slots[rows].copy_(to_device(slot_list + [self.scratch] * (rows - B), cache.device))
        out = self._replay(("step", rows, span), lambda: static_decode_step(
            self.lm, cache, self._slots[rows], self._emb[rows], span))
        cache.advance(slot_list, to_device(slot_list, cache.device), 1)
        return out[:B]

    # --------------------------------------------------------------------------- patch decoder
    @torch.inference_mode()
    def decode_patch(self, h: torch.Tensor,
                     speech_sampling: SamplingBatch | SamplingParams | Sequence[SamplingParams] | None = None,
                     generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
        """Same contract as :meth:`MiMoAudioLM.decode_patch`."""
        B = h.shape[0]
        device = h.device
        params = SamplingBatch.coerce(speech_sampling, B, device)
        rows = bucket_of(B, self.batch_buckets)
        buf = self._patch[rows]
        pad = [0] * (rows - B)  # padding rows repeat row 0: valid inputs, same sampler flags
        index = to_device(list(range(B)) + pad, device)
        buf.h.copy_(h.index_select(0, index))
        for name in ("temperature", "top_k", "top_p", "greedy"):
            getattr(buf, name).copy_(getattr(params, name).index_select(0, index))
        if not params.all_greedy:
            buf.uniform.copy_(draw_uniform(generators, B, (self.lm.schedule.num_codes,), device).index_select(0, index))
        static = SamplingBatch(temperature=buf.temperature, top_k=buf.top_k, top_p=buf.top_p, greedy=buf.greedy,
                               params=params.params + tuple(params.params[0] for _ in pad))
        flags = (params.all_greedy, params.any_filter, params.any_top_k, params.any_greedy)
        out = self._replay(("patch", rows, flags), lambda: patch_decoder.decode_patch(
            self.lm, buf.h, static, None, uniform=None if params.all_greedy else buf.uniform))
        return out[:B]

    # ----------------------------------------------------------------------------------- graphs
    def _replay(self, key: tuple, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self.capture:
            return run().clone()
        g = self._graphs.get(key)
        if g is None:
            g = self._capture(key, run)
        g.graph.replay()
        return g.output.clone()  # the next replay of any graph may reuse the pool's memory

    def _capture(self, key: tuple, run: Callable[[], torch.Tensor]) -> _Graph:
        t = time.perf_counter()
        # eager warm-up runs (lazy tables, cuBLAS workspaces); a step's writes land at the rows' next
        # positions, which the replay writes again with the same values
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = run()
        g = self._graphs[key] = _Graph(graph, output, run)
        self.captures += 1
        self.capture_s += time.perf_counter() - t
        log.debug("captured %s in %.1f ms", key, (time.perf_counter() - t) * 1000)
        return g

    @torch.inference_mode()
    def capture_all(self, speech_sampling: Sequence[SamplingParams] = ()) -> float:
        """Capture every backbone bucket and the patch decoder's greedy path plus ``speech_sampling``
        (one graph per distinct set of sampler flags); return the seconds it took. Run it before
        sessions exist: the warm-up passes write to the scratch slot only."""
        if not self.capture:
            return 0.0
        t = time.perf_counter()
        hidden = self.lm.config.hidden_size
        device = self.lm.device
        for rows in self.batch_buckets:
            slots = [self.scratch] * rows
            self._slots[rows].copy_(torch.tensor(slots, device=device))
            self._emb[rows].zero_()
            for span in self.span_buckets:
                key = ("step", rows, span)
                if key not in self._graphs:
                    self._capture(key, lambda r=rows, s=span: static_decode_step(
                        self.lm, self.cache, self._slots[r], self._emb[r], s))
            h = torch.zeros(rows, hidden, device=device, dtype=self.lm.dtype)
            for params in (GREEDY, *speech_sampling):
                # greedy or sampled, at one set of flags: one call captures its graph
                self.decode_patch(h, [params] * rows, None)
        self.cache.reset(self.scratch)
        torch.cuda.synchronize()
        return time.perf_counter() - t
