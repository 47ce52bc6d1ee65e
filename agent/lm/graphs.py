"""CUDA graphs for the three fixed-shape regions of a decoding tick: the patch encoder with the
backbone decode step, the text head with its sampler, and the patch decoder's 11-step loop with its
heads and samplers.

At small batch a decode step is hundreds of small kernels, and the GPU waits on Python to launch
each; a captured graph replays them with one launch. Graphs need fixed shapes and fixed
addresses, so:

- rows: a batch of B rows runs in the graph of the next batch bucket (1, 2, 4, ... ``max_batch``);
  padding rows of the backbone step write to a scratch KV-cache slot that no session owns (the
  engine allocates one more slot when graphs are on), padding rows of the sampling regions repeat
  row 0; their outputs are dropped;
- keys: the backbone step attends over the next span bucket (multiples of 64 growing by at most
  20 %, up to ``max_positions``) above the longest row, masked per row. It reads them in place:
  its rows are the slots 0..W-1 of the next window bucket holding its sessions (rows of slots not
  in the batch write to the scratch slot, their results dropped), unless that window has more than
  twice the batch's rows; then its rows' keys are gathered (copied) into a batch bucket
  (:meth:`DecodeGraphs.kv_read` counts what a step reads against what it attends). Compiled on a
  CPU, attention is one fused kernel (:mod:`agent.lm.fused_attention`) in which each row reads its
  own slot up to its own length: rows are then the batch bucket's, and nothing is gathered;
- sampling: the sampler's host flags (all greedy, top-k, top-p, some greedy) choose its code
  path, so the sampling regions' graphs are keyed by them too: the greedy path and the server's
  default text and speech sampling are captured at start, other settings on first use;
- random numbers are drawn outside the graph from each row's own generator and copied into it,
  so seeded sessions stay reproducible and equal to the eager path.

With ``compile`` each region runs through ``torch.compile`` (:mod:`agent.lm.compiled`), inside
the graph on CUDA: the graph replays the fused kernels.

Every input lives in a static buffer that is filled before a replay; outputs are cloned after it
(graphs share one memory pool). On a CPU nothing is captured: the same padded static-shape
functions run eagerly, which is how the tests check them against the model's own ``decode_step``
and ``decode_patch``. :class:`DecodeGraphs` is what the engine calls instead of those.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from agent.lm import fused_attention, patch_decoder
from agent.lm.compiled import Compiled
from agent.lm.host import to_device
from agent.lm.kv_cache import KVCache
from agent.lm.model import slot_step
from agent.lm.patch_encoder import embed_patches
from agent.lm.sampling import GREEDY, SamplingBatch, SamplingParams, draw_uniform, sample_tokens

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


def embed_step(lm: MiMoAudioLM, cache: KVCache, slots: torch.Tensor, text_ids: torch.Tensor, codes: torch.Tensor,
               span: int, window: int | None = None) -> torch.Tensor:
    """The patch encoder and :func:`static_decode_step` in one: text_ids (N, 1), codes (N, 1, 4, 8)
    -> hidden (N, hidden). The backbone half of a tick, one compiled region and one graph."""
    return static_decode_step(lm, cache, slots, embed_patches(lm, text_ids, codes), span, window)


def text_tokens(lm: MiMoAudioLM, hidden: torch.Tensor, banned: torch.Tensor | None, uniform: torch.Tensor | None,
                temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, greedy: torch.Tensor, *,
                all_greedy: bool, any_filter: bool, any_top_k: bool, any_greedy: bool) -> torch.Tensor:
    """The text head and its sampler: hidden (N, hidden) -> text tokens (N,). ``banned`` (N, vocab)
    bool: tokens the rows' controls forbid (:func:`agent.lm.generation.text_bans`), removed before
    sampling; the settings are :meth:`SamplingBatch.tensors` and ``flags``; ``uniform`` (N,) the
    draws (None when every row is greedy)."""
    logits = lm.lm_head(hidden).float()
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    return sample_tokens(logits, uniform, temperature, top_k, top_p, greedy, None, all_greedy=all_greedy,
                         any_filter=any_filter, any_top_k=any_top_k, any_greedy=any_greedy)


def sample_text(lm: MiMoAudioLM, hidden: torch.Tensor, banned: torch.Tensor | None, params: SamplingBatch,
                generators: Sequence[torch.Generator | None] | None) -> torch.Tensor:
    """:func:`text_tokens` for B rows, eagerly: hidden (B, hidden) -> tokens (B,), row b drawn from
    ``generators[b]`` (torch's default generator when None)."""
    B = hidden.shape[0]
    uniform = None if params.all_greedy else draw_uniform(generators, B, (), hidden.device)
    return text_tokens(lm, hidden, banned, uniform, *params.tensors(), **params.flags())


#: the compiled regions of a tick (``--compile``), shared by every engine of the process
COMPILED = {"step": Compiled(embed_step, "step"), "emb_step": Compiled(static_decode_step, "step"),
            "text": Compiled(text_tokens, "text"), "patch": Compiled(patch_decoder.sampled_patch, "patch")}
EAGER = {"step": embed_step, "emb_step": static_decode_step, "text": text_tokens,
         "patch": patch_decoder.sampled_patch}


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph, or None when running eagerly
    output: torch.Tensor | None
    run: Callable[[], torch.Tensor]


@dataclass
class _RowInputs:
    """Static inputs of a sampling region (text head or patch decoder) for one batch bucket."""

    h: torch.Tensor  # (B, hidden)
    uniform: torch.Tensor  # (B, draws per row)
    temperature: torch.Tensor  # (B,)
    top_k: torch.Tensor
    top_p: torch.Tensor
    greedy: torch.Tensor
    banned: torch.Tensor | None = None  # (B, vocab) bool, the text region's
    settings: tuple = ()  # the rows' settings now in the tensors: unchanged settings are not copied again

    @classmethod
    def allocate(cls, rows: int, hidden: int, draws: tuple[int, ...], lm: MiMoAudioLM, vocab: int | None = None
                 ) -> _RowInputs:
        device = lm.device
        return cls(h=torch.zeros(rows, hidden, device=device, dtype=lm.dtype),
                   uniform=torch.full((rows, *draws), 0.5, device=device),
                   temperature=torch.ones(rows, device=device),
                   top_k=torch.zeros(rows, dtype=torch.int64, device=device),
                   top_p=torch.ones(rows, device=device), greedy=torch.ones(rows, dtype=torch.bool, device=device),
                   banned=None if vocab is None else torch.zeros(rows, vocab, dtype=torch.bool, device=device))

    def fill(self, h: torch.Tensor, params: SamplingBatch, index: torch.Tensor,
             draw: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Rows ``index`` of ``h`` and the settings (padding rows repeat row 0), and the draws, made
        in place by ``draw(rows)`` (padding rows keep old draws: their results are dropped)."""
        padded = index.shape[0] != h.shape[0]

        def rows(x: torch.Tensor) -> torch.Tensor:
            return x.index_select(0, index) if padded else x

        self.h.copy_(rows(h))
        if self.settings != params.params:
            for name, value in zip(("temperature", "top_k", "top_p", "greedy"), params.tensors(), strict=True):
                getattr(self, name).copy_(rows(value))
            self.settings = params.params
        if not params.all_greedy:
            draw(self.uniform[: h.shape[0]])

    def args(self, params: SamplingBatch) -> tuple:
        return (self.h, None if params.all_greedy else self.uniform, self.temperature, self.top_k, self.top_p,
                self.greedy)


class DecodeGraphs:
    """Graph-replayed backbone step, text head and patch decoder for one model and KV cache (see
    the module docstring). ``capture`` defaults to whether the model is on a CUDA device;
    ``compile`` runs each region through ``torch.compile`` (:data:`COMPILED`; inside the graphs on
    CUDA)."""

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
        self.compiled = compile
        self._fns = COMPILED if compile else EAGER
        # compiled on a CPU, attention is one fused kernel reading each row's slot where it lies
        # (agent.lm.fused_attention): rows are the batch's, never a window of slots, and nothing is gathered
        self.fused = compile and device.type == "cpu"
        if self.fused:
            fused_attention.load()  # built before any region is traced
        patch_decoder.warm_tables(lm, device)  # built eagerly: a compiled region reads them as inputs
        self.batch_buckets = buckets(max_batch)
        # in place, a step runs one row per slot of the window 0..W-1 that holds its sessions
        self.window_buckets = buckets(cache.num_slots)
        self.span_buckets = span_buckets(cache.max_positions)
        rows_of = {True: self.window_buckets, False: self.batch_buckets}
        self._slots = {(w, b): torch.full((b,), scratch_slot, dtype=torch.int64, device=device)
                       for w in (True, False) for b in rows_of[w]}
        self._inputs: dict[tuple, Any] = {}  # static inputs by (region, ...): allocated on first use
        self._slot_tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._filled: dict[tuple[bool, int], torch.Tensor | None] = {}  # what each slots buffer holds
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.captures = 0
        self.capture_s = 0.0

    # --------------------------------------------------------------------------- backbone step
    @torch.inference_mode()
    def decode_step(self, cache: KVCache, slots: torch.Tensor | Sequence[int], emb: torch.Tensor) -> torch.Tensor:
        """Same contract as :meth:`MiMoAudioLM.decode_step` (on this object's cache)."""
        return self._step("emb_step", cache, slots, (emb,))

    @torch.inference_mode()
    def step_patches(self, cache: KVCache, slots: torch.Tensor | Sequence[int], text_ids: torch.Tensor,
                     codes: torch.Tensor) -> torch.Tensor:
        """``decode_step(cache, slots, embed_patches(text_ids, codes))`` as one region: text_ids (B, 1),
        codes (B, 1, 4, 8) int64 -> hidden (B, hidden)."""
        return self._step("step", cache, slots, (text_ids, codes))

    def _step(self, region: str, cache: KVCache, slots: torch.Tensor | Sequence[int],
              inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if cache is not self.cache:
            raise ValueError("these graphs were built for another KV cache")
        slot_list = [int(s) for s in (slots.tolist() if isinstance(slots, torch.Tensor) else slots)]
        B = len(slot_list)
        first = inputs[0]
        if first.shape[0] != B or first.shape[1] != 1:
            raise ValueError(f"decode_step takes B = len(slots) = {B} patches of one position each; got "
                             f"{tuple(first.shape)}")
        if len(set(slot_list)) != B or self.scratch in slot_list:
            raise ValueError(f"decode_step slots must be distinct session slots, got {slot_list}")
        cache.reserve(slot_list, 1)
        in_place, rows, span = self.layout(slot_list)
        slots_dev, fill = self._slot_rows(slot_list, in_place, rows)
        slots_buf = self._slots[(in_place, rows)]
        bufs = self._step_inputs(region, in_place, rows, inputs)
        for buf, x in zip(bufs, inputs, strict=True):
            if in_place:
                buf.index_copy_(0, slots_dev, x)
            else:
                buf[:B].copy_(x)
        if self._filled.get((in_place, rows)) is not fill:  # the rows' slots, copied when they change
            slots_buf.copy_(fill)
            self._filled[(in_place, rows)] = fill
        fn = self._fns[region]
        out = self._replay((region, in_place, rows, span),
                           lambda: fn(self.lm, cache, slots_buf, *bufs, span, 0 if in_place else None))
        cache.advance(slot_list, slots_dev, 1)
        return out.index_select(0, slots_dev) if in_place else out[:B]

    def layout(self, slot_list: Sequence[int]) -> tuple[bool, int, int]:
        """(in place, rows, span) of a backbone step over these slots at their current lengths."""
        span = bucket_of(max(self.cache.length(s) for s in slot_list) + 1, self.span_buckets)
        batch_rows = bucket_of(len(slot_list), self.batch_buckets)
        window_rows = bucket_of(max(slot_list) + 1, self.window_buckets)
        if self.fused:
            return False, batch_rows, span
        # in place when the window's rows cost at most twice the batch's: reading W x span keys
        # where they lie beats copying B x span of them and reading the copy
        in_place = window_rows <= 2 * batch_rows
        return in_place, window_rows if in_place else batch_rows, span

    def kv_read(self, slot_list: Sequence[int]) -> tuple[int, int]:
        """(positions of keys and values read, positions attended) by a backbone step over these
        slots: in place, every row of the window reads the span; gathered, the batch's rows are
        read twice (copied, then attended); fused, each row reads its own history and new position
        (padding rows the scratch slot's). Attended: each row's history and its new position."""
        in_place, rows, span = self.layout(slot_list)
        attended = sum(self.cache.length(s) + 1 for s in slot_list)
        if self.fused:
            return attended + (rows - len(slot_list)) * (self.cache.length(self.scratch) + 1), attended
        return (rows if in_place else 2 * len(slot_list)) * span, attended

    def _slot_rows(self, slot_list: list[int], in_place: bool, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's slots and the slot of each of the bucket's rows, on the device; made once
        for each batch (the engine steps the same sessions tick after tick)."""
        key = (*slot_list, in_place, rows)
        if key not in self._slot_tensors:
            if len(self._slot_tensors) >= 256:
                self._slot_tensors.clear()
            if in_place:  # row s of the window is slot s; the rows of other slots write to the scratch slot
                fill = [self.scratch] * rows
                for s in slot_list:
                    fill[s] = s
            else:
                fill = slot_list + [self.scratch] * (rows - len(slot_list))
            device = self.cache.device
            self._slot_tensors[key] = (to_device(slot_list, device), to_device(fill, device))
        return self._slot_tensors[key]

    def _step_inputs(self, region: str, in_place: bool, rows: int, like: tuple[torch.Tensor, ...]
                     ) -> tuple[torch.Tensor, ...]:
        """The static inputs of a backbone region's bucket: zeros shaped as ``like``'s rows."""
        return self._static((region, in_place, rows), lambda: tuple(
            torch.zeros(rows, *x.shape[1:], device=x.device, dtype=x.dtype) for x in like))

    def _static(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._inputs:
            self._inputs[key] = make()
        return self._inputs[key]

    # ------------------------------------------------------------------------- sampling regions
    def _rows(self, B: int, region: str, draws: tuple[int, ...], vocab: int | None = None
              ) -> tuple[_RowInputs, torch.Tensor, int]:
        """The static inputs of ``region`` for B rows' bucket, and the row index that pads B to it."""
        rows = bucket_of(B, self.batch_buckets)
        buf = self._static((region, rows), lambda: _RowInputs.allocate(
            rows, self.lm.config.hidden_size, draws, self.lm, vocab))
        # padding rows repeat row 0
        index = self._static(("index", B), lambda: to_device(list(range(B)) + [0] * (rows - B), self.lm.device))
        return buf, index, rows

    @torch.inference_mode()
    def sample_text(self, hidden: torch.Tensor, banned: torch.Tensor | None, params: SamplingBatch,
                    generators: Sequence[torch.Generator | None] | None) -> torch.Tensor:
        """Same contract as :func:`sample_text`."""
        B = hidden.shape[0]
        buf, index, rows = self._rows(B, "text", (), self.lm.config.vocab_size)
        buf.fill(hidden, params, index, lambda out: draw_uniform(generators, B, (), hidden.device, out))
        if banned is not None:
            buf.banned.copy_(banned.index_select(0, index))
        flags = params.flags()
        fn = self._fns["text"]
        out = self._replay(("text", rows, *flags.values(), banned is not None), lambda: fn(
            self.lm, buf.h, None if banned is None else buf.banned, *buf.args(params)[1:], **flags))
        return out[:B]

    @torch.inference_mode()
    def decode_patch(self, h: torch.Tensor,
                     speech_sampling: SamplingBatch | SamplingParams | Sequence[SamplingParams] | None = None,
                     generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
        """Same contract as :meth:`MiMoAudioLM.decode_patch`."""
        B = h.shape[0]
        params = SamplingBatch.coerce(speech_sampling, B, h.device)
        codes = self.lm.schedule.num_codes
        buf, index, rows = self._rows(B, "patch", (codes,))
        buf.fill(h, params, index, lambda out: draw_uniform(generators, B, (codes,), h.device, out))
        flags = params.flags()
        fn = self._fns["patch"]
        out = self._replay(("patch", rows, *flags.values()), lambda: fn(self.lm, *buf.args(params), **flags))
        return out[:B]

    # ----------------------------------------------------------------------------------- graphs
    def _replay(self, key: tuple, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self.capture:
            return run()  # a fresh result: only a replayed graph's output lives in memory reused later
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
    def capture_all(self, speech_sampling: Sequence[SamplingParams] = (),
                    text_sampling: Sequence[SamplingParams] = ()) -> float:
        """Capture every backbone bucket, and the text head's and the patch decoder's greedy path plus
        ``text_sampling`` / ``speech_sampling`` (one graph per distinct set of sampler flags); return
        the seconds it took. Run it before sessions exist: the warm-up passes write to the scratch
        slot only."""
        if not self.capture:
            return 0.0
        t = time.perf_counter()
        cfg, device = self.lm.config, self.lm.device
        patch = (torch.zeros(1, 1, dtype=torch.int64, device=device),
                 torch.zeros(1, 1, cfg.group_size, cfg.audio_channels, dtype=torch.int64, device=device))
        for (in_place, rows), slots in self._slots.items():
            # the in-place family only where a batch can choose it (a window at most twice its rows)
            if in_place and rows > 2 * self.batch_buckets[-1]:
                continue
            slots.fill_(self.scratch)
            self._filled[(in_place, rows)] = None
            bufs = self._step_inputs("step", in_place, rows, patch)
            for span in self.span_buckets:
                key = ("step", in_place, rows, span)
                if key not in self._graphs:
                    self._capture(key, lambda s=span, w=in_place, b=bufs, n=slots: self._fns["step"](
                        self.lm, self.cache, n, *b, s, 0 if w else None))
        for rows in self.batch_buckets:
            h = torch.zeros(rows, cfg.hidden_size, device=device, dtype=self.lm.dtype)
            for params in (GREEDY, *text_sampling):
                batch = SamplingBatch.from_params([params] * rows, device)
                for banned in (None, torch.zeros(rows, cfg.vocab_size, dtype=torch.bool, device=device)):
                    self.sample_text(h, banned, batch, None)
            for params in (GREEDY, *speech_sampling):
                # greedy or sampled, at one set of flags: one call captures its graph
                self.decode_patch(h, [params] * rows, None)
        self.cache.reset(self.scratch)
        torch.cuda.synchronize()
        return time.perf_counter() - t
