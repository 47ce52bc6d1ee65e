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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from agent.lm.config import MiMoAudioConfig
from agent.lm.sampling import SamplingBatch, SamplingParams, draw_uniform, sample
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
        self._tensors: dict[tuple[torch.device, int, int], tuple[torch.Tensor, ...]] = {}

    def group_tensors(self, step: int, index: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(frames, channels, empty mask) of a group on ``device``: index tensors (n,) for writing
        its codes, and the bool (n, vocab) mask of each channel's empty id, which is never emitted.
        Built once, so the loop launches no host-to-device copies."""
        key = (torch.device(device), step, index)
        if key not in self._tensors:
            g = self.groups[step][index]
            empties = torch.tensor([self.empty_ids[c] for c in g.channels])
            self._tensors[key] = tuple(
                t.to(device)
                for t in (
                    torch.tensor(g.frames),
                    torch.tensor(g.channels),
                    torch.arange(g.vocab_size) == empties[:, None],
                )
            )
        return self._tensors[key]


def new_local_cache(lm: MiMoAudioLM, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed keys and values (layers, B, heads, steps, head_dim) for one patch of ``batch`` rows."""
    cfg = lm.local_transformer.cfg
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, lm.config.local_steps, cfg.head_dim)
    return (
        torch.zeros(shape, device=lm.device, dtype=lm.dtype),
        torch.zeros(shape, device=lm.device, dtype=lm.dtype),
    )


def local_step(
    lm: MiMoAudioLM, x: torch.Tensor, step: int, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One patch-decoder position: x (B, 1, D) at position ``step`` -> (hidden (B, D), k_cache, v_cache).

    Writes this position's keys and values into the caches (layers, B, H, steps, d) and attends to
    positions 0..step of them.
    """
    stack = lm.local_transformer
    S = k_cache.shape[3]
    pos = torch.full((1, 1), step, dtype=torch.int64, device=x.device)
    cos, sin = stack.rope.at(pos, x.dtype)  # (1, 1, d)
    mask = attention_bias((torch.arange(S, device=x.device) <= step).view(1, 1, 1, S), x.dtype)

    def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache[i].select(2, step).copy_(k[:, :, 0])  # one copy (an int index would add scalar tensors)
        v_cache[i].select(2, step).copy_(v[:, :, 0])
        return attend(q, k_cache[i], v_cache[i], mask)

    return stack.run(x, cos, sin, attention)[:, 0], k_cache, v_cache


def decode_patch(
    lm: MiMoAudioLM,
    h: torch.Tensor,
    speech_sampling: SamplingBatch | SamplingParams | Sequence[SamplingParams] | None,
    generators: Sequence[torch.Generator | None] | None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backbone hidden states (B, hidden) -> codes (B, group, channels), int64.

    ``uniform`` (B, 32): the draws, when the caller made them from the rows' generators already
    (a CUDA graph replays with its noise copied in); otherwise they are drawn here."""
    B, _ = h.shape
    sched = lm.schedule
    params = SamplingBatch.coerce(speech_sampling, B, h.device)
    # one uniform number per code to draw, the whole patch at once: (B, 32)
    if uniform is None and not params.all_greedy:
        uniform = draw_uniform(generators, B, (sched.num_codes,), h.device)
    k_cache, v_cache = new_local_cache(lm, B)
    codes = torch.zeros(B, sched.group_size, len(sched.vocab_sizes), dtype=torch.int64, device=h.device)

    x = lm.hidden_states_downcast(h).unsqueeze(1)  # (B, 1, D)
    for t in range(sched.steps):
        hidden, k_cache, v_cache = local_step(lm, x, t, k_cache, v_cache)
        x = None
        for i, g in enumerate(sched.groups[t]):
            n = len(g.channels)
            frames, channels, empty = sched.group_tensors(t, i, h.device)
            heads = [lm.local_transformer_lm_heads[c](hidden) for c in g.channels]
            logits = torch.stack(heads, dim=1)  # (B, n, V)
            noise = None if uniform is None else uniform[:, g.offset : g.offset + n]
            tokens = sample(logits, params, noise, removed=empty)  # (B, n)
            codes[:, frames, channels] = tokens
            for j, c in enumerate(g.channels):
                emb = lm.speech_embeddings[c](tokens[:, j])
                x = emb if x is None else x + emb
        assert x is not None
        x = x.unsqueeze(1)  # the input of step t+1 (unused after the last step)
    return codes
