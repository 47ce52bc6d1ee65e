"""Token sampling: temperature, top-k, top-p and greedy, batched with per-row settings.

Semantics follow the official ``MiMoSampler`` (spec 2.8): scale by the temperature, keep the top
k, then remove the sorted-ascending tokens whose cumulative probability is <= 1 - top_p (always
keeping the most likely one), then remove the caller's banned tokens (``removed``; the patch
decoder bans each channel's empty id, exactly as the official loop does), then sample or take
the argmax. A row whose filters leave nothing falls back to its logits minus the banned tokens.

Sampling inverts the cumulative distribution of the filtered probabilities at one uniform
number per token, drawn from the session's seeded ``torch.Generator`` (one per row), so a
session's tokens do not depend on which other sessions share its batch. Nothing here reads a
device value on the host.

Settings come in two channel groups, text (the backbone's text token) and speech (the patch
decoder's codes); :data:`TASK_SAMPLING` has the official per-task defaults.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agent.lm.host import to_device


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
        device = torch.device(device)
        return cls(
            temperature=to_device([p.temperature for p in params], device, torch.float32),
            top_k=to_device([p.top_k for p in params], device, torch.int64),
            top_p=to_device([p.top_p for p in params], device, torch.float32),
            greedy=to_device([p.greedy for p in params], device, torch.bool),
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
    def any_greedy(self) -> bool:
        return any(p.greedy for p in self.params)

    @property
    def any_top_k(self) -> bool:
        return any(p.top_k > 0 for p in self.params)

    @property
    def any_filter(self) -> bool:
        """Whether any sampled row uses top-k or top-p."""
        return any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in self.params)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(temperature, top_k, top_p, greedy): the per-row inputs of :func:`sample_tokens`."""
        return self.temperature, self.top_k, self.top_p, self.greedy

    def flags(self) -> dict[str, bool]:
        """The host flags that choose :func:`sample_tokens`' code path (keyword arguments)."""
        return {"all_greedy": self.all_greedy, "any_filter": self.any_filter, "any_top_k": self.any_top_k,
                "any_greedy": self.any_greedy}


def draw_uniform(
    generators: Sequence[torch.Generator | None] | None, n: int, shape: tuple[int, ...], device: torch.device,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniform noise (n, *shape): row b from ``generators[b]`` (torch's default generator if None).
    Each row is drawn into its place in ``out`` (a new tensor if None): one kernel a row, no
    stack, and no copy when ``out`` is where the draws are read (a graph's static input)."""
    if generators is None:
        return torch.rand((n, *shape), device=device, out=out)
    if len(generators) != n:
        raise ValueError(f"{len(generators)} generators for {n} rows")
    if out is None:
        return torch.stack([torch.rand(shape, generator=g, device=device) for g in generators])
    for row, g in zip(out, generators, strict=True):
        torch.rand(shape, generator=g, device=device, out=row)
    return out


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) settings shaped to broadcast over ``like`` (N, ..., V)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _branch(flag: bool | torch.Tensor, if_true: Callable, if_false: Callable, operands: tuple) -> torch.Tensor:
    """A host flag picks the branch in Python; a tensor flag (an exported graph's input, see
    :class:`export.graphs.PatchDecoder`) becomes ``torch.cond`` (ONNX ``If``), both branches traced.
    So the sampler is written once for eager, CUDA-graph and exported use."""
    if isinstance(flag, torch.Tensor):
        return torch.cond(flag, if_true, if_false, operands)
    return (if_true if flag else if_false)(*operands)


def _filter_sorted(
    sorted_scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, any_top_k: bool = True
) -> torch.Tensor:
    """Top-k then top-p on ascending-sorted scores (N, ..., V); removed entries become -inf.
    ``any_top_k`` False skips top-k (no row uses it); a row with k = 0 keeps everything anyway."""
    V = sorted_scores.shape[-1]
    if any_top_k:
        # top-k: keep scores >= the k-th largest (ties kept, as the official `scores < topk(...)[-1]`)
        k = _per_row(top_k, sorted_scores).clamp(max=V)
        kth = sorted_scores.gather(-1, (V - k).clamp(max=V - 1).expand(*sorted_scores.shape[:-1], 1))
        kth = kth.masked_fill(k == 0, float("-inf"))
        sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))
    # top-p: remove the low tail whose cumulative probability is <= 1 - top_p; keep the top token
    # (the last sorted entry: the tail is computed over the others and the top appended as kept)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    tail = F.pad(cumulative[..., :-1] <= 1 - _per_row(top_p, sorted_scores), (0, 1), value=False)
    return sorted_scores.masked_fill(tail, float("-inf"))


def filter_logits(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Temperature, top-k and top-p of each row of ``logits`` (N, ..., V); removed tokens are -inf."""
    scores = logits.float() / _per_row(params.temperature, logits)
    if not params.any_filter:
        return scores
    sorted_scores, order = scores.sort(dim=-1)  # ascending, as the official top-p
    filtered = _filter_sorted(sorted_scores, params.top_k, params.top_p, params.any_top_k)
    return torch.empty_like(scores).scatter_(-1, order, filtered)


def _banned(scores: torch.Tensor, removed: torch.Tensor | None) -> torch.Tensor:
    return scores if removed is None else scores.masked_fill(removed, float("-inf"))


def _invert_cdf(filtered: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token whose cumulative probability first exceeds ``uniform`` x total: the count of cdf
    entries <= the target (the cdf never decreases, so this is ``searchsorted(right=True)``, in
    operators ONNX can express)."""
    cdf = filtered.softmax(dim=-1).cumsum(dim=-1)
    target = (uniform.float() * cdf[..., -1]).unsqueeze(-1)
    return (cdf <= target).sum(dim=-1).clamp(max=cdf.shape[-1] - 1)


def _greedy_tokens(logits, removed, uniform, temperature, top_k, top_p, greedy, any_filter) -> torch.Tensor:
    """Every row greedy: the argmax of the logits minus the banned tokens, no temperature or filter."""
    return _banned(logits, removed).argmax(dim=-1)


def _draw_plain(scores, removed, uniform, top_k, top_p) -> torch.Tensor:
    return _invert_cdf(_banned(scores, removed), uniform)


def _draw_filtered(scores, removed, uniform, top_k, top_p, any_top_k: bool = True) -> torch.Tensor:
    sorted_scores, order = scores.sort(dim=-1)  # ascending, as the official top-p
    filtered = _filter_sorted(sorted_scores, top_k, top_p, any_top_k)
    if removed is not None:
        removed_sorted = removed.expand_as(scores).gather(-1, order)
        filtered = filtered.masked_fill(removed_sorted, float("-inf"))
        # a row the filters and the ban empty falls back to its scores minus the banned tokens
        nothing = torch.isneginf(filtered).all(dim=-1, keepdim=True)
        filtered = torch.where(nothing, sorted_scores.masked_fill(removed_sorted, float("-inf")), filtered)
    pick = _invert_cdf(filtered, uniform)
    return order.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def _sampled_tokens(
    logits, removed, uniform, temperature, top_k, top_p, greedy, any_filter, *, any_top_k: bool = True,
    any_greedy: bool = True,
) -> torch.Tensor:
    """Temperature, then the draw (filtered in sorted order when ``any_filter``), then the argmax
    for the greedy rows. The keyword flags skip work no row needs (host values only)."""
    scores = logits / _per_row(temperature, logits)
    filtered = functools.partial(_draw_filtered, any_top_k=any_top_k)
    drawn = _branch(any_filter, filtered, _draw_plain, (scores, removed, uniform, top_k, top_p))
    if not any_greedy:
        return drawn
    return torch.where(_per_row(greedy, drawn), _banned(logits, removed).argmax(dim=-1), drawn)


def sample_tokens(
    logits: torch.Tensor,
    uniform: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    greedy: torch.Tensor,
    removed: torch.Tensor | None,
    *,
    all_greedy: bool | torch.Tensor,
    any_filter: bool | torch.Tensor,
    any_top_k: bool = True,
    any_greedy: bool = True,
) -> torch.Tensor:
    """The sampler on per-row setting tensors (N,): logits (N, ..., V) -> tokens (N, ...) int64.

    ``all_greedy`` and ``any_filter`` choose the code path: host bools (eager, CUDA graphs keyed
    by them) or 0-d bool tensors (the exported graph, where both paths are traced). ``uniform``
    is read only on the sampled path.
    """
    logits = logits.float()
    sampled = functools.partial(_sampled_tokens, any_top_k=any_top_k, any_greedy=any_greedy)
    operands = (logits, removed, uniform, temperature, top_k, top_p, greedy, any_filter)
    return _branch(all_greedy, _greedy_tokens, sampled, operands)


def sample(
    logits: torch.Tensor,
    params: SamplingBatch,
    uniform: torch.Tensor | None = None,
    removed: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per distribution: logits (N, ..., V) -> tokens (N, ...) int64.

    Row n of ``params`` applies to ``logits[n]``. ``uniform`` (N, ...) holds one uniform number
    per token to draw (needed unless every row is greedy): the token is found by inverting the
    cumulative distribution of the filtered probabilities, an exact draw. ``removed`` is a bool
    mask broadcastable to the logits of tokens banned after filtering (official ``removed_tokens``).
    """
    if not params.all_greedy and (uniform is None or uniform.shape != logits.shape[:-1]):
        raise ValueError(
            f"sampling (non-greedy rows) needs one uniform number per token, shape "
            f"{tuple(logits.shape[:-1])}; got {None if uniform is None else tuple(uniform.shape)}"
        )
    return sample_tokens(logits, uniform, *params.tensors(), removed, **params.flags())
