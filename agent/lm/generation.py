"""Generation controls: what a session's next patch may be, and when its response ends.

Each generated patch is either a text patch (its text token is anything but ``<|empty|>``) or a
speech patch (text token ``<|empty|>``, codes from the patch decoder). The controls constrain
that choice by masking the text logits before sampling:

- ``free``: the model decides (the real Instruct model emits about 5 text patches, then 5 speech
  patches, repeatedly);
- ``interleave`` N:M: N text patches, then M speech patches, repeatedly; once the model has
  written ``<|eot|>`` (its text is complete) only speech patches follow;
- ``audio``: speech patches only; ``text``: text patches only.

Stop tokens are always allowed (except before ``min_patches``); a response ends on a stop token
or after ``max_patches`` patches, counted as the official ``max_new_tokens``. The stop-token
patch is produced (as the official loop appends it) but carries no content.

:class:`ControlState` is the small per-session state; :func:`mask_text_logits` applies the
states of a batch of sessions to their rows of text logits at once.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from agent.lm.host import to_device
from agent.lm.tokenizer import SpecialTokens


class Mode(enum.StrEnum):
    FREE = "free"
    INTERLEAVE = "interleave"
    AUDIO = "audio"
    TEXT = "text"


class PatchKind(enum.IntEnum):
    """What the next patch is allowed to be."""

    ANY = 0
    TEXT = 1  # anything but <|empty|>
    SPEECH = 2  # <|empty|> or a stop token


def parse_interleave(spec: str) -> tuple[int, int]:
    """``"N:M"`` -> (N, M), both positive."""
    try:
        n, m = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"interleave must look like N:M (e.g. 5:5), got {spec!r}") from None
    if n < 1 or m < 1:
        raise ValueError(f"interleave N:M needs N >= 1 and M >= 1, got {spec!r}")
    return n, m


#: official stop tokens per task (spec 2.9): names of :class:`SpecialTokens` fields
TASK_STOPS: dict[str, tuple[str, ...]] = {
    "asr": ("eos", "im_end"),
    "tts": ("eos", "eostm", "im_end"),
    "spoken_dialogue": ("eos", "eostm", "im_end"),
    "speech_to_text_dialogue": ("eos", "im_end"),
    "audio_understanding": ("eos", "im_end"),
    "text_chat": ("eos", "im_end"),
    "in_context_learning_s2s": ("eos", "eostm"),
    "continuation": ("eos", "eosp", "eostm"),
}


def task_stop_ids(task: str, specials: SpecialTokens) -> tuple[int, ...]:
    """The official stop-token ids of ``task``."""
    try:
        names = TASK_STOPS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_STOPS)}") from None
    return tuple(sorted({getattr(specials, n) for n in names}))


@dataclass(frozen=True)
class GenerationControls:
    """Per-response settings; see the module docstring."""

    mode: Mode = Mode.FREE
    text_patches: int = 5  # N of interleave N:M
    speech_patches: int = 5  # M of interleave N:M
    stop_ids: tuple[int, ...] = ()
    max_patches: int = 8192
    min_patches: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))
        if self.max_patches < 1:
            raise ValueError(f"max_patches must be >= 1, got {self.max_patches}")
        if not 0 <= self.min_patches <= self.max_patches:
            raise ValueError(f"min_patches must be in 0..max_patches, got {self.min_patches}")
        if self.text_patches < 1 or self.speech_patches < 1:
            raise ValueError("interleave N:M needs N >= 1 and M >= 1")

    @classmethod
    def interleave(cls, spec: str, **kwargs) -> GenerationControls:
        n, m = parse_interleave(spec)
        return cls(mode=Mode.INTERLEAVE, text_patches=n, speech_patches=m, **kwargs)


@dataclass
class ControlState:
    """Where one session's response stands: patches made, interleave phase, finished or not."""

    controls: GenerationControls
    eot_id: int
    generated: int = 0
    text_done: bool = False  # <|eot|> seen: the model's text is complete
    finished: bool = False
    stop_reason: str | None = None  # "stop_token", "max_patches" or "cancelled"
    history: list[int] = field(default_factory=list, repr=False)  # text ids of this response

    def kind(self) -> PatchKind:
        """What the next patch may be."""
        mode = self.controls.mode
        if mode is Mode.AUDIO:
            return PatchKind.SPEECH
        if mode is Mode.TEXT:
            return PatchKind.TEXT
        if mode is Mode.INTERLEAVE:
            if self.text_done:
                return PatchKind.SPEECH
            n, m = self.controls.text_patches, self.controls.speech_patches
            return PatchKind.TEXT if self.generated % (n + m) < n else PatchKind.SPEECH
        return PatchKind.ANY

    def stops_banned(self) -> bool:
        """Before ``min_patches`` the stop tokens are removed (official min_length)."""
        return self.generated < self.controls.min_patches

    def advance(self, text_id: int) -> bool:
        """Record the sampled text token of the patch just made; return whether the response ended."""
        if self.finished:
            raise RuntimeError("the response has already finished")
        self.generated += 1
        self.history.append(text_id)
        if text_id == self.eot_id:
            self.text_done = True
        if text_id in self.controls.stop_ids:
            self.finished, self.stop_reason = True, "stop_token"
        elif self.generated >= self.controls.max_patches:
            self.finished, self.stop_reason = True, "max_patches"
        return self.finished

    def cancel(self) -> None:
        if not self.finished:
            self.finished, self.stop_reason = True, "cancelled"


def mask_text_logits(logits: torch.Tensor, states: Sequence[ControlState], empty_id: int) -> torch.Tensor:
    """Apply each row's controls to a batch of text logits (B, V): banned tokens become -inf."""
    banned = text_bans(states, logits.shape, empty_id, logits.device)
    return logits if banned is None else logits.masked_fill(banned, float("-inf"))


def text_bans(states: Sequence[ControlState], shape: tuple[int, int], empty_id: int, device: torch.device
              ) -> torch.Tensor | None:
    """The text tokens each row's controls forbid, a bool (B, V) mask; None when no row bans any."""
    B, V = shape
    if len(states) != B:
        raise ValueError(f"{len(states)} control states for {B} rows of logits")
    kinds = [s.kind() for s in states]
    ban_stops = [s.stops_banned() for s in states]
    if all(k is PatchKind.ANY for k in kinds) and not any(ban_stops):
        return None
    rows = [b for b, s in enumerate(states) for _ in s.controls.stop_ids]
    cols = [i for s in states for i in s.controls.stop_ids]
    stops = torch.zeros(B, V, dtype=torch.bool, device=device)
    if rows:
        stops[to_device(rows, device), to_device(cols, device)] = True
    empty = torch.zeros(1, V, dtype=torch.bool, device=device)
    empty[0, empty_id] = True
    flags = to_device(
        [[k is PatchKind.SPEECH, k is PatchKind.TEXT, ban] for k, ban in zip(kinds, ban_stops, strict=True)],
        device,
        torch.bool,
    )  # (B, 3)
    speech, text, ban = flags[:, 0:1], flags[:, 1:2], flags[:, 2:3]
    return (speech & ~(empty | stops)) | (text & empty) | (ban & stops)
