"""Token sampling: temperature, top-k, top-p and greedy, batched with per-row settings.

Semantics follow the official ``MiMoSampler`` (spec 2.8): scale by the temperature, keep the top
k, then remove the sorted-ascending tokens whose cumulative probability is <= 1 - top_p (always
keeping the most likely one), then remove the caller's banned tokens (``removed``; the patch
decoder bans each channel's empty id, exactly as the official loop does), then sample or take
the argmax. A row whose filters leave nothing falls back to its logits minus the banned tokens.

Sampling draws from a per-session seeded ``torch.Generator`` (one per row) with the Gumbel-max
trick: ``argmax(scores - log(-log(u)))`` with u uniform is an exact sample of
``softmax(scores)``, and needs one uniform tensor per row, drawn from that row's generator, so a
session's tokens do not depend on which other sessions share its batch. Nothing here reads a
device value on the host.

Settings come in two channel groups, text (the backbone's text token) and speech (the patch
decoder's codes); :data:`TASK_SAMPLING` has the official per-task defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Settings of one channel group for one session. ``top_k=0`` and ``top_p=1`` are off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


GREEDY = SamplingParams(greedy=True)


@dataclass(frozen=True)
class ChannelSampling:
    """Sampling settings per channel group: the text token and the speech codes."""

    text: SamplingParams = GREEDY
    speech: SamplingParams = GREEDY


#: the official ``task_sampler_configs`` of ``mimo_audio.py`` (none sets top_k).
TASK_SAMPLING: dict[str, ChannelSampling] = {
    "asr": ChannelSampling(GREEDY, SamplingParams(0.9, top_p=0.95)),
    "tts": ChannelSampling(SamplingParams(0.6, top_p=1.0), SamplingParams(0.9, top_p=0.95)),
    "spoken_dialogue": ChannelSampling(SamplingParams(0.6, top_p=0.95), SamplingParams(0.9, top_p=0.95)),
    "audio_understanding": ChannelSampling(SamplingParams(0.3, top_p=0.95), SamplingParams(0.9, top_p=0.95)),
    "text_chat": ChannelSampling(SamplingParams(0.4, top_p=0.95), SamplingParams(0.9, top_p=0.95)),
    "in_context_learning_s2s": ChannelSampling(GREEDY, SamplingParams(0.9, top_p=0.95)),
}

#: the official fallback for other tasks (speech continuation, say).
DEFAULT_SAMPLING = ChannelSampling(
    SamplingParams(0.6, top_k=50, top_p=0.95), SamplingParams(0.9, top_k=50, top_p=0.95)
)


def task_sampling(task: str | None) -> ChannelSampling:
    """The official sampling defaults of ``task`` (the fallback for unknown tasks)."""
    return TASK_SAMPLING.get(task or "", DEFAULT_SAMPLING)


@dataclass
class SamplingBatch:
    """Per-row :class:`SamplingParams` as device tensors, plus host flags for the fast paths."""

    temperature: torch.Tensor  # (N,) float32
    top_k: torch.Tensor  # (N,) int64, 0 = off
    top_p: torch.Tensor  # (N,) float32, 1 = off
    greedy: torch.Tensor  # (N,) bool
    params: tuple[SamplingParams, ...]

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu"
    ) -> SamplingBatch:
        params = tuple(params)
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            params=params,
        )

    @classmethod
    def coerce(
        cls,
        value: SamplingBatch | SamplingParams | Sequence[SamplingParams] | None,
        n: int,
        device: torch.device,
    ) -> SamplingBatch:
        """Accept one setting for every row (None = greedy), a list per row, or a batch."""
        if isinstance(value, SamplingBatch):
            if len(value) != n:
                raise ValueError(f"sampling settings for {len(value)} rows, but the batch has {n}")
            return value
        if value is None:
            value = GREEDY
        if isinstance(value, SamplingParams):
            value = [value] * n
        if len(value) != n:
            raise ValueError(f"sampling settings for {len(value)} rows, but the batch has {n}")
        return cls.from_params(value, device)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)

    @property
    def any_filter(self) -> bool:
        """Whether any sampled row uses top-k or top-p."""
        return any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in self.params)

    def repeat_interleave(self, n: int) -> SamplingBatch:
        """Each row repeated ``n`` times in place (row b -> rows b*n .. b*n+n-1)."""
        return SamplingBatch(
            temperature=self.temperature.repeat_interleave(n),
            top_k=self.top_k.repeat_interleave(n),
            top_p=self.top_p.repeat_interleave(n),
            greedy=self.greedy.repeat_interleave(n),
            params=tuple(p for p in self.params for _ in range(n)),
        )


def draw_uniform(
    generators: Sequence[torch.Generator | None] | None, n: int, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Uniform noise (n, *shape): row b from ``generators[b]`` (torch's default generator if None)."""
    if generators is None:
        return torch.rand((n, *shape), device=device)
    if len(generators) != n:
        raise ValueError(f"{len(generators)} generators for {n} rows")
    return torch.stack([torch.rand(shape, generator=g, device=device) for g in generators])


def filter_logits(scores: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Temperature, top-k and top-p of each row (N, V); removed tokens become -inf."""
    scores = scores / params.temperature.unsqueeze(-1)
    if not params.any_filter:
        return scores
    V = scores.shape[-1]
    sorted_scores, order = scores.sort(dim=-1)  # ascending, as the official top-p
    # top-k: keep scores >= the k-th largest (ties kept, as `scores < topk(...)[-1]` removes)
    k = params.top_k.clamp(max=V)
    kth = sorted_scores.gather(1, (V - k).clamp(max=V - 1).unsqueeze(-1))  # (N, 1)
    kth = torch.where(k.unsqueeze(-1) > 0, kth, torch.full_like(kth, float("-inf")))
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))
    # top-p: remove the low tail whose cumulative probability is <= 1 - top_p; keep the top token
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    tail = cumulative <= (1 - params.top_p).unsqueeze(-1)
    tail[:, -1] = False
    sorted_scores = sorted_scores.masked_fill(tail, float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, sorted_scores)


def sample(
    logits: torch.Tensor,
    params: SamplingBatch,
    uniform: torch.Tensor | None = None,
    removed: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` (N, V) -> (N,) int64.

    ``uniform`` (N, V) is the rows' noise (needed unless every row is greedy); ``removed`` is a
    bool mask broadcastable to (N, V) of tokens banned after filtering (official
    ``removed_tokens``).
    """
    logits = logits.float()
    if params.all_greedy:
        return (logits if removed is None else logits.masked_fill(removed, float("-inf"))).argmax(dim=-1)
    scores = filter_logits(logits, params)
    if removed is not None:
        scores = scores.masked_fill(removed, float("-inf"))
        empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
        scores = torch.where(empty, logits.masked_fill(removed, float("-inf")), scores)
    if uniform is None:
        raise ValueError("sampling (non-greedy rows) needs uniform noise from the rows' generators")
    gumbel = -torch.log(-torch.log(uniform))
    sampled = (scores + gumbel).argmax(dim=-1)
    return torch.where(params.greedy, scores.argmax(dim=-1), sampled)
