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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from agent.lm.config import MiMoAudioConfig
from agent.lm.sampling import SamplingBatch, SamplingParams, draw_uniform, sample
from agent.lm.transformer import attend

if TYPE_CHECKING:
    from agent.lm.model import MiMoAudioLM


class DelaySchedule:
    """Which channel and frame each patch-decoder step samples, and the per-step token masks."""

    def __init__(self, config: MiMoAudioConfig) -> None:
        self.steps = config.local_steps
        self.group_size = config.group_size
        self.vocab_sizes = config.speech_vocab_sizes
        self.empty_ids = config.speech_empty_ids
        self.max_vocab = max(self.vocab_sizes)
        delays = config.delays
        #: per step: the channels sampled and the frame each one fills
        self.channels: list[list[int]] = []
        self.frames: list[list[int]] = []
        #: per step: offset of its first code in the patch's flat list of sampled codes
        self.offsets: list[int] = []
        n = 0
        for t in range(self.steps):
            chans = [c for c, d in enumerate(delays) if d <= t < d + self.group_size]
            self.channels.append(chans)
            self.frames.append([t - delays[c] for c in chans])
            self.offsets.append(n)
            n += len(chans)
        self.num_codes = n  # 32 for the shipped config
        self._masks: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def masks(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per step (padding, empty): bool (n_t, max_vocab) masks of ids past each channel's vocab
        and of each channel's empty id."""
        if device not in self._masks:
            col = torch.arange(self.max_vocab)
            out = []
            for chans in self.channels:
                sizes = torch.tensor([self.vocab_sizes[c] for c in chans])
                empties = torch.tensor([self.empty_ids[c] for c in chans])
                out.append(((col >= sizes[:, None]).to(device), (col == empties[:, None]).to(device)))
            self._masks[device] = out
        return self._masks[device]


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
    mask = (torch.arange(S, device=x.device) <= step).view(1, 1, 1, S)
    for layer, k_l, v_l in zip(stack.layers, k_cache, v_cache, strict=True):
        q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
        k_l[:, :, step] = k[:, :, 0]
        v_l[:, :, step] = v[:, :, 0]
        x = x + layer.self_attn.out(attend(q, k_l, v_l, mask))
        x = layer.feed_forward(x)
    return stack.norm(x)[:, 0], k_cache, v_cache


def decode_patch(
    lm: MiMoAudioLM,
    h: torch.Tensor,
    speech_sampling: SamplingBatch | SamplingParams | Sequence[SamplingParams] | None,
    generators: Sequence[torch.Generator | None] | None,
) -> torch.Tensor:
    """Backbone hidden states (B, hidden) -> codes (B, group, channels), int64."""
    B, _ = h.shape
    sched = lm.schedule
    params = SamplingBatch.coerce(speech_sampling, B, h.device)
    per_count = {n: params.repeat_interleave(n) for n in {len(c) for c in sched.channels}}
    uniform = None
    if not params.all_greedy:  # all of the patch's noise at once: (B, 32, max_vocab)
        uniform = draw_uniform(generators, B, (sched.num_codes, sched.max_vocab), h.device)
    masks = sched.masks(h.device)
    k_cache, v_cache = new_local_cache(lm, B)
    codes = torch.zeros(B, sched.group_size, len(sched.vocab_sizes), dtype=torch.int64, device=h.device)
    V = sched.max_vocab

    x = lm.hidden_states_downcast(h).unsqueeze(1)  # (B, 1, D)
    for t, (chans, frames) in enumerate(zip(sched.channels, sched.frames, strict=True)):
        hidden, k_cache, v_cache = local_step(lm, x, t, k_cache, v_cache)
        n = len(chans)
        logits = torch.stack(
            [
                F.pad(lm.local_transformer_lm_heads[c](hidden).float(), (0, V - sched.vocab_sizes[c]))
                for c in chans
            ],
            dim=1,
        )  # (B, n, V): channels padded to the largest vocabulary
        padding, empty = masks[t]
        logits = logits.masked_fill(padding, float("-inf"))
        noise = (
            None if uniform is None else uniform[:, sched.offsets[t] : sched.offsets[t] + n].reshape(B * n, V)
        )
        removed = empty.unsqueeze(0).expand(B, n, V).reshape(B * n, V)
        tokens = sample(logits.view(B * n, V), per_count[n], noise, removed).view(B, n)
        codes[:, frames, chans] = tokens
        if t + 1 < sched.steps:
            x = sum(lm.speech_embeddings[c](tokens[:, i]) for i, c in enumerate(chans)).unsqueeze(1)
    return codes
