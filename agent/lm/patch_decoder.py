"""The patch decoder: a patch's 4 x 8 codes from the backbone's hidden state (spec 2.6).

``local_transformer`` runs ``group_size + max(delay)`` = 11 sequential single-position steps with
its own small KV cache. Channel c is sampled at steps ``delay[c] .. delay[c] + 3`` (frame
``t - delay[c]`` at step t), so step t samples {c0}, {c0,c1}, ..., {c7}: 32 codes in all. Step 0's
input is ``hidden_states_downcast`` of the backbone state; step t+1's input is the sum of the
``speech_embeddings`` of the codes sampled at step t (the input made at the last step is never
used). Each channel's empty id is banned. The codes come out already de-delayed: (B, frame,
channel).

Every step has the same shapes (the cache always spans all 11 positions, masked), and
:func:`local_step` is a pure function of (input, step, cache tensors), so one step or the whole
loop can be captured as a CUDA graph or exported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from agent.lm import fused_attention
from agent.lm.config import MiMoAudioConfig
from agent.lm.sampling import SamplingBatch, SamplingParams, draw_uniform, sample_tokens
from agent.lm.transformer import attend, attention_bias

if TYPE_CHECKING:
    from agent.lm.model import MiMoAudioLM


@dataclass(frozen=True)
class StepGroup:
    """Channels sampled together at one step: those with the same vocabulary size."""

    channels: tuple[int, ...]
    frames: tuple[int, ...]  # the frame each channel fills
    vocab_size: int
    offset: int  # index of its first code in the patch's flat list of sampled codes


class DelaySchedule:
    """Which channels and frames each patch-decoder step samples, grouped by vocabulary size."""

    def __init__(self, config: MiMoAudioConfig) -> None:
        self.steps = config.local_steps
        self.group_size = config.group_size
        self.vocab_sizes = config.speech_vocab_sizes
        self.empty_ids = config.speech_empty_ids
        delays = config.delays
        #: per step: the channels sampled and the frame each one fills
        self.channels: list[list[int]] = []
        self.frames: list[list[int]] = []
        #: per step: the channels split by vocabulary size, so each group samples at its own width
        self.groups: list[list[StepGroup]] = []
        n = 0
        for t in range(self.steps):
            chans = [c for c, d in enumerate(delays) if d <= t < d + self.group_size]
            self.channels.append(chans)
            self.frames.append([t - delays[c] for c in chans])
            groups = []
            for size in sorted({self.vocab_sizes[c] for c in chans}, reverse=True):
                members = tuple(c for c in chans if self.vocab_sizes[c] == size)
                groups.append(StepGroup(members, tuple(t - delays[c] for c in members), size, n))
                n += len(members)
            self.groups.append(groups)
        self.num_codes = n  # 32 for the shipped config
        self._tensors: dict[tuple[torch.device, int, int], torch.Tensor] = {}
        self.tables: dict[tuple[torch.device, torch.dtype], StepTables] = {}  # see StepTables.of

    def banned(self, step: int, index: int, device: torch.device) -> torch.Tensor:
        """The bool (n, vocab) mask of each channel's empty id in a group, which is never emitted.
        Built once per device, so the loop launches no host-to-device copies."""
        key = (torch.device(device), step, index)
        if key not in self._tensors:
            g = self.groups[step][index]
            empties = torch.tensor([self.empty_ids[c] for c in g.channels])
            self._tensors[key] = (torch.arange(g.vocab_size) == empties[:, None]).to(device)
        return self._tensors[key]


def new_local_cache(lm: MiMoAudioLM, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed keys and values (layers, B, heads, steps, head_dim) for one patch of ``batch`` rows."""
    cfg = lm.local_transformer.cfg
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, lm.config.local_steps, cfg.head_dim)
    return (
        torch.zeros(shape, device=lm.device, dtype=lm.dtype),
        torch.zeros(shape, device=lm.device, dtype=lm.dtype),
    )


class StepTables:
    """Per-step constants of the patch decoder on one device and dtype, built once: the rotary
    rows, the attention bias (position t sees 0..t) and the cache index of each step. A step
    reads its row (a view for a host step, an index for a traced one), so the loop launches no
    kernels to make them."""

    def __init__(self, lm: MiMoAudioLM, device: torch.device, dtype: torch.dtype) -> None:
        S = lm.config.local_steps
        steps = torch.arange(S, device=device)
        cos, sin = lm.local_transformer.rope.at(steps, dtype)  # (S, d)
        self.cos, self.sin = cos, sin
        self.bias = attention_bias(steps[None, :] <= steps[:, None], dtype)  # (S, S): row t sees 0..t
        # a host step's row, each its own allocation: SDPA takes it as the bias, and CUDA's
        # memory-efficient kernel reads the bias in aligned vectors (a view of row t of the packed
        # table, t x S elements in, faulted with "misaligned address" on a GPU)
        self.bias_rows = tuple(row.clone() for row in self.bias.split(1))  # S x (1, S)
        self.index = steps  # (S,) int64: step t's cache position

    @staticmethod
    def of(lm: MiMoAudioLM, device: torch.device, dtype: torch.dtype) -> StepTables:
        """The model's tables for ``device`` and ``dtype`` (cached on the model's schedule)."""
        cache = lm.schedule.tables
        key = (torch.device(device), dtype)
        if key not in cache:
            cache[key] = StepTables(lm, device, dtype)
        return cache[key]


def warm_tables(lm: MiMoAudioLM, device: torch.device) -> None:
    """Build every table the model's steps read (rotary rows, step tables, banned ids) on ``device``:
    a compiled or traced step reads them as inputs and must never create (and cache) them."""
    for stack in (lm.model, lm.local_transformer, lm.input_local_transformer):
        stack.rope.get(device)
    StepTables.of(lm, device, lm.dtype)
    for t, groups in enumerate(lm.schedule.groups):
        for i in range(len(groups)):
            lm.schedule.banned(t, i, device)


def local_step(
    lm: MiMoAudioLM, x: torch.Tensor, step: int | torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One patch-decoder position: x (B, 1, D) at position ``step`` -> (hidden (B, D), k_cache, v_cache).

    Writes this position's keys and values into the caches (layers, B, H, steps, d) in place and
    attends to positions 0..step of them. ``step`` is a host int, or a 0-d int64 tensor in the
    exported single-step graph.
    """
    tables = StepTables.of(lm, x.device, x.dtype)
    if isinstance(step, torch.Tensor):  # exported or compiled: one-row gathers at a device index
        index = step.view(1)
        cos, sin, mask = (t.index_select(0, index) for t in (tables.cos, tables.sin, tables.bias))
    else:  # a host step: views of its rows, and the bias row of its own
        index = tables.index[step : step + 1]
        cos, sin, mask = tables.cos[step : step + 1], tables.sin[step : step + 1], tables.bias_rows[step]
    cos, sin, mask = cos.unsqueeze(0), sin.unsqueeze(0), mask.view(1, 1, 1, -1)  # (1, 1, d), (1, 1, 1, S)
    fused = fused_attention.enabled(x.device)

    def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if fused:  # rotary, the cache write and attention over positions 0..step: one kernel
            return fused_attention.rope_attend(q, k, v, cos, sin, k_cache, v_cache, i, None, index)
        k_cache[i].index_copy_(2, index, k)  # one copy per cache, at a device index
        v_cache[i].index_copy_(2, index, v)
        return attend(q, k_cache[i], v_cache[i], mask)

    rotary = (None, None) if fused else (cos, sin)
    return lm.local_transformer.run(x, *rotary, attention)[:, 0], k_cache, v_cache


def step_logits(lm: MiMoAudioLM, hidden: torch.Tensor, t: int) -> list[torch.Tensor]:
    """The logits of each group step ``t`` samples: hidden (B, D) -> [(B, n, V) per group]. The
    heads run as one matmul (:attr:`MiMoAudioLM.speech_heads`), or the step's heads alone where
    they are not fused (the exported graphs)."""
    groups = lm.schedule.groups[t]
    channels = [c for g in groups for c in g.channels]
    logits = dict(zip(channels, lm.speech_heads.select(hidden, channels), strict=True))
    return [torch.stack([logits[c] for c in g.channels], dim=1) for g in groups]


#: (step, group index, group, logits (B, n, V), its draws (B, n) or None) -> tokens (B, n) int64.
GroupSampler = Callable[[int, int, StepGroup, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def run_patch(lm: MiMoAudioLM, h: torch.Tensor, sampler: GroupSampler, uniform: torch.Tensor | None) -> torch.Tensor:
    """The patch-decoder loop, shared by :func:`decode_patch`, its compiled and CUDA-graph forms and
    the exported ``patch_decoder`` graph (which differ only in how ``sampler`` reads the settings):
    h (B, hidden) -> codes (B, group, channels). ``uniform`` (B, codes per patch) or None (greedy)."""
    B, _ = h.shape
    sched = lm.schedule
    k_cache, v_cache = new_local_cache(lm, B)
    tokens_at: dict[tuple[int, int], torch.Tensor] = {}  # (frame, channel) -> (B,)
    x = lm.hidden_states_downcast(h).unsqueeze(1)  # (B, 1, D)
    for t in range(sched.steps):
        hidden, k_cache, v_cache = local_step(lm, x, t, k_cache, v_cache)
        x = None
        for i, (g, logits) in enumerate(zip(sched.groups[t], step_logits(lm, hidden, t), strict=True)):
            noise = None if uniform is None else uniform[:, g.offset : g.offset + len(g.channels)]
            tokens = sampler(t, i, g, logits, noise)  # (B, n)
            for j, (c, f) in enumerate(zip(g.channels, g.frames, strict=True)):
                tokens_at[(f, c)] = tokens[:, j]
                emb = lm.speech_embeddings[c](tokens[:, j])
                x = emb if x is None else x + emb
        assert x is not None
        x = x.unsqueeze(1)  # the input of step t+1 (unused after the last step)
    G, C = sched.group_size, len(sched.vocab_sizes)
    # one copy of the 32 (B,) token views, in (frame, channel) order
    return torch.stack([tokens_at[(f, c)] for f in range(G) for c in range(C)], dim=1).view(B, G, C)


def decode_patch(
    lm: MiMoAudioLM,
    h: torch.Tensor,
    speech_sampling: SamplingBatch | SamplingParams | Sequence[SamplingParams] | None,
    generators: Sequence[torch.Generator | None] | None,
) -> torch.Tensor:
    """Backbone hidden states (B, hidden) -> codes (B, group, channels), int64."""
    B, _ = h.shape
    params = SamplingBatch.coerce(speech_sampling, B, h.device)
    # one uniform number per code to draw, the whole patch at once: (B, 32)
    uniform = None if params.all_greedy else draw_uniform(generators, B, (lm.schedule.num_codes,), h.device)
    return sampled_patch(lm, h, uniform, *params.tensors(), **params.flags())


def sampled_patch(lm: MiMoAudioLM, h: torch.Tensor, uniform: torch.Tensor | None, temperature: torch.Tensor,
                  top_k: torch.Tensor, top_p: torch.Tensor, greedy: torch.Tensor, *, all_greedy: bool,
                  any_filter: bool, any_top_k: bool, any_greedy: bool) -> torch.Tensor:
    """:func:`decode_patch` on the rows' settings as tensors (B,) and the batch's host flags
    (:meth:`SamplingBatch.flags`), with the draws ``uniform`` (B, 32) made already (None when every
    row is greedy): a function of tensors and flags only, which ``--compile`` compiles whole (the
    loop, the heads and the samplers) and a CUDA graph captures."""
    sched = lm.schedule

    def sampler(t: int, i: int, g: StepGroup, logits: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return sample_tokens(logits, noise, temperature, top_k, top_p, greedy, sched.banned(t, i, h.device),
                             all_greedy=all_greedy, any_filter=any_filter, any_top_k=any_top_k,
                             any_greedy=any_greedy)

    return run_patch(lm, h, sampler, None if all_greedy else uniform)
