"""CUDA graphs for the two fixed-shape hot paths of decoding: the backbone decode step and the
patch decoder's 11-step loop.

At small batch a decode step is hundreds of small kernels, and the GPU waits on Python to launch
each; a captured graph replays them with one launch. Graphs need fixed shapes and fixed
addresses, so:

- rows: a batch of B rows runs in the graph of the next batch bucket (1, 2, 4, ... ``max_batch``);
  padding rows of the backbone step write to a scratch KV-cache slot that no session owns (the
  engine allocates one more slot when graphs are on), padding rows of the patch decoder repeat
  row 0; their outputs are dropped;
- keys: the backbone step attends over the next span bucket (multiples of 64 growing by at most
  20 %, up to ``max_positions``) above the longest row, masked per row. It reads them in place:
  its rows are the slots 0..W-1 of the next window bucket holding its sessions (rows of slots not
  in the batch write to the scratch slot, their results dropped), unless that window has more than
  twice the batch's rows; then its rows' keys are gathered (copied) into a batch bucket;
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
from agent.lm.model import slot_step
from agent.lm.sampling import GREEDY, SamplingBatch, SamplingParams, draw_uniform

if TYPE_CHECKING:
    from agent.lm.model import MiMoAudioLM

log = logging.getLogger(__name__)

MIN_SPAN = 64
SPAN_GROWTH = 1.2  # attention spans step by at most 20 %: keys read per row within 1.2x of its span
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


def span_buckets(limit: int, start: int = MIN_SPAN, growth: float = SPAN_GROWTH) -> list[int]:
    """Attention spans of the backbone graphs: multiples of ``start``, each at most ``growth`` times
    the one below (as far as the multiple allows), then ``limit``; a row's span is never padded
    more than that. 64, 128, 192, 256, 320, 384, 512, 640, 768, 960, ... for 64 and 1.2."""
    out, n = [], start
    while n < limit:
        out.append(n)
        n = max(n + start, -(-int(n * growth) // start) * start)
    return [*out, limit]


def static_decode_step(lm: MiMoAudioLM, cache: KVCache, slots: torch.Tensor, emb: torch.Tensor,
                       span: int, window: int | None = None) -> torch.Tensor:
    """:func:`agent.lm.model.slot_step` with fixed shapes and no host reads: emb (N, 1, hidden) at
    the slots' current lengths (device values), keys over the first ``span`` positions, masked per
    row, in place over slots 0..N-1 when ``window`` is 0, gathered otherwise. Does not advance the
    cache's lengths (the caller does, for the real rows)."""
    return slot_step(lm, cache, slots, emb, span, window=window, masked=True)


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
    module docstring). ``capture`` defaults to whether the model is on a CUDA device; ``compile``
    runs the patch decoder's step through ``torch.compile`` (:class:`CompiledLocalStep`)."""

    def __init__(self, lm: MiMoAudioLM, cache: KVCache, *, max_batch: int, scratch_slot: int,
                 capture: bool | None = None, compile: bool = False) -> None:
        device = lm.device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device}")
        if not 0 <= scratch_slot < cache.num_slots:
            raise ValueError(f"scratch slot {scratch_slot} is not a slot of a {cache.num_slots}-slot cache")
        if max_batch >= cache.num_slots:
            raise ValueError(f"max_batch {max_batch} leaves no scratch slot in a {cache.num_slots}-slot cache")
        self.lm, self.cache, self.scratch = lm, cache, scratch_slot
        # with compile, the patch decoder's step runs compiled (inside the graphs on CUDA)
        self._local_step = patch_decoder.CompiledLocalStep() if compile else patch_decoder.local_step
        self.batch_buckets = buckets(max_batch)
        # in place, a step runs one row per slot of the window 0..W-1 that holds its sessions
        self.window_buckets = buckets(cache.num_slots)
        self.span_buckets = span_buckets(cache.max_positions)
        hidden, codes = lm.config.hidden_size, lm.schedule.num_codes
        rows_of = {True: self.window_buckets, False: self.batch_buckets}
        self._emb = {(w, b): torch.zeros(b, 1, hidden, device=device, dtype=lm.dtype)
                     for w in (True, False) for b in rows_of[w]}
        self._slots = {(w, b): torch.full((b,), scratch_slot, dtype=torch.int64, device=device)
                       for w in (True, False) for b in rows_of[w]}
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
        span = bucket_of(max(cache.length(s) for s in slot_list) + 1, self.span_buckets)
        batch_rows = bucket_of(B, self.batch_buckets)
        window_rows = bucket_of(max(slot_list) + 1, self.window_buckets)
        # in place when the window's rows cost at most twice the batch's: reading W x span keys
        # where they lie beats copying B x span of them and reading the copy
        in_place = window_rows <= 2 * batch_rows
        rows = window_rows if in_place else batch_rows
        slots_dev = to_device(slot_list, cache.device)
        emb_buf, slots_buf = self._emb[(in_place, rows)], self._slots[(in_place, rows)]
        if in_place:  # row s of the window is slot s; the rows of other slots write to the scratch slot
            fill = [self.scratch] * rows
            for s in slot_list:
                fill[s] = s
            emb_buf.index_copy_(0, slots_dev, emb)
        else:
            fill = slot_list + [self.scratch] * (rows - B)
            emb_buf[:B].copy_(emb)
        slots_buf.copy_(to_device(fill, cache.device))
        out = self._replay(("step", in_place, rows, span), lambda: static_decode_step(
            self.lm, cache, slots_buf, emb_buf, span, 0 if in_place else None))
        cache.advance(slot_list, slots_dev, 1)
        return out.index_select(0, slots_dev) if in_place else out[:B]

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
            self.lm, buf.h, static, None, uniform=None if params.all_greedy else buf.uniform, step=self._local_step))
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
        for (in_place, rows), slots in self._slots.items():
            # the in-place family only where a batch can choose it (a window at most twice its rows)
            if in_place and rows > 2 * self.batch_buckets[-1]:
                continue
            slots.fill_(self.scratch)
            self._emb[(in_place, rows)].zero_()
            for span in self.span_buckets:
                key = ("step", in_place, rows, span)
                if key not in self._graphs:
                    self._capture(key, lambda r=rows, s=span, w=in_place: static_decode_step(
                        self.lm, self.cache, self._slots[(w, r)], self._emb[(w, r)], s, 0 if w else None))
        for rows in self.batch_buckets:
            h = torch.zeros(rows, hidden, device=device, dtype=self.lm.dtype)
            for params in (GREEDY, *speech_sampling):
                # greedy or sampled, at one set of flags: one call captures its graph
                self.decode_patch(h, [params] * rows, None)
        self.cache.reset(self.scratch)
        torch.cuda.synchronize()
        return time.perf_counter() - t
