"""A session's conversation, rendered into patches for the KV cache.

The engine never edits the KV cache by hand. It keeps the conversation as a list of items
(system text, user audio or text, assistant responses with the exact patches the model produced)
and renders them into one run of patches in the official multi-turn spoken-dialogue layout (spec
2.9). The slot's cache holds a prefix of a previous rendering; before a response the engine rolls
the slot back to the longest common prefix of the cached and the new rendering and prefills the
rest. One mechanism then covers everything that changes history:

- a new user turn: the common prefix is the whole cache, only the new positions are prefilled;
- barge-in / ``conversation.item.truncate``: the assistant item keeps only the patches the
  listener heard, so the cache rolls back to that point;
- ``conversation.item.delete``, new instructions, context-limit truncation of the oldest turns:
  the cache rolls back to the first changed position and the suffix is re-prefilled.

Layout, per item (instructions go in the first user turn, as the official dialogue prompt does):

    voice prompt:  <|im_start|>system\\nYour voice should be:  A(voice)  <|im_end|>\\n
    system item:   <|im_start|>system\\n{text}<|im_end|>\\n
    user item:     <|im_start|>user\\n [instructions\\n\\n]  A(audio) | text  <|im_end|>\\n
    assistant:     <|im_start|>assistant\\n  <|sostm|> patches... <|eostm|>  <|im_end|>\\n   (audio)
                   <|im_start|>assistant\\n<think>\\n\\n</think>\\n  text... <|im_end|>\\n      (text only)

A(x) is ``<|sosp|>``, one speech patch per 4 frames, ``<|eosp|>``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from agent.lm.prompts import Prompt, PromptBuilder

#: milliseconds of audio in one speech patch (4 frames of 40 ms)
PATCH_MS = 160


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass
class Item:
    """One conversation item. User audio is kept as codes (T, 8); assistant items as patches."""

    item_id: str
    role: Role
    text: str | None = None
    codes: torch.Tensor | None = None  # user audio, (T, channels), T a multiple of 4 (None while being encoded)
    patches: Prompt | None = None  # assistant: the patches generated (stop patch included)
    audio_output: bool = True  # assistant: interleaved speech stream vs text-only answer
    complete: bool = False  # assistant: the response has ended


@dataclass
class Rendering:
    """A rendered conversation: the patches and where each item's patches start and end."""

    prompt: Prompt
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt)


class ConversationRenderer:
    """Renders items into patches with a :class:`PromptBuilder` (tokenizer + model config)."""

    def __init__(self, builder: PromptBuilder) -> None:
        self.builder = builder
        sp = builder.specials
        self.specials = sp
        # fixed pieces, tokenized once
        self._user_open = builder.text("<|im_start|>user\n")
        self._system_open = builder.text("<|im_start|>system\n")
        self._close = builder.text("<|im_end|>\n")
        self._assistant_audio_open = builder.text("<|im_start|>assistant\n") + builder.tokens([sp.sostm])
        self._assistant_text_open = builder.text("<|im_start|>assistant\n<think>\n\n</think>\n")
        self._eostm = builder.tokens([sp.eostm])
        self._newline = builder.text("\n")
        self._voice_open = builder.text("<|im_start|>system\n") + builder.text("Your voice should be:")

    def render(
        self,
        items: list[Item],
        *,
        instructions: str | None = None,
        voice_codes: torch.Tensor | None = None,
    ) -> Rendering:
        """Patches of the whole conversation, in order."""
        parts: list[Prompt] = []
        spans: dict[str, tuple[int, int]] = {}
        length = 0

        def add(p: Prompt) -> None:
            nonlocal length
            parts.append(p)
            length += len(p)

        if voice_codes is not None:
            add(self._voice_open + self.builder.audio(voice_codes) + self._close)
        first_user = True
        for item in items:
            start = length
            if item.role is Role.SYSTEM:
                add(self._system_open + self.builder.text(item.text or "") + self._close)
            elif item.role is Role.USER:
                add(self._user_open)
                if first_user and instructions:
                    add(self.builder.text(instructions) + self.builder.text("\n\n"))
                first_user = False
                if item.codes is not None:
                    add(self.builder.audio(item.codes))
                if item.text:
                    add(self.builder.text(item.text))
                add(self._close)
            else:
                add(self.assistant_open(item.audio_output))
                if item.patches is not None and len(item.patches):
                    add(item.patches)
                if item.complete:
                    add(self._assistant_close(item))
            spans[item.item_id] = (start, length)
        if not parts:
            empty = self.builder.tokens([])
            return Rendering(empty, spans)
        prompt = parts[0]
        if len(parts) > 1:
            prompt = Prompt(torch.cat([p.text_ids for p in parts]), torch.cat([p.codes for p in parts]))
        return Rendering(prompt, spans)

    def open_turn(
        self,
        items: list[Item],
        codes: torch.Tensor,
        *,
        instructions: str | None = None,
        voice_codes: torch.Tensor | None = None,
    ) -> Prompt:
        """The conversation followed by a user turn still being spoken, its speech so far ``codes``
        (T, channels): the rendering of ``items`` plus a user audio item of those codes, without
        its end (``<|eosp|>``, ``<|im_end|>\\n``), which comes when the turn does. A prefix of the
        rendering once the turn is committed with codes that start with these."""
        turn = Item("", Role.USER, codes=codes)
        prompt = self.render([*items, turn], instructions=instructions, voice_codes=voice_codes).prompt
        return prompt[: len(prompt) - 1 - len(self._close)]

    def assistant_open(self, audio_output: bool) -> Prompt:
        return self._assistant_audio_open if audio_output else self._assistant_text_open

    def _assistant_close(self, item: Item) -> Prompt:
        """What follows a finished response: the stream's end marker if the model did not write
        it (cancelled, truncated, out of budget), then ``<|im_end|>\\n``."""
        last = int(item.patches.text_ids[-1]) if item.patches is not None and len(item.patches) else None
        if item.audio_output:
            if last == self.specials.im_end:
                return self._newline
            if last == self.specials.eostm:
                return self._close
            return self._eostm + self._close
        return self._newline if last == self.specials.im_end else self._close

    def assistant_text(self, item: Item) -> str:
        """The transcript of an assistant item (text patches, specials hidden)."""
        if item.patches is None:
            return ""
        return self.builder.tokenizer.decode(int(t) for t in item.patches.text_ids)


def common_prefix(a: Prompt, b: Prompt) -> int:
    """Length of the longest common prefix of two patch runs (text ids and codes both equal)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    same = (a.text_ids[:n] == b.text_ids[:n]) & (a.codes[:n] == b.codes[:n]).flatten(1).all(dim=1)
    diff = (~same).nonzero()
    return n if diff.numel() == 0 else int(diff[0, 0])


def truncate_patches(patches: Prompt, empty_id: int, audio_end_ms: int) -> Prompt:
    """The patches of a response that the listener heard: speech patches up to ``audio_end_ms``
    (patch k covers [160k, 160k+160) ms) and the text patches written before the first unheard
    speech patch."""
    is_speech = patches.text_ids == empty_id
    heard = -(-audio_end_ms // PATCH_MS)  # speech patches at least partly heard
    speech_index = torch.cumsum(is_speech.long(), 0) - 1  # index among speech patches
    unheard = (is_speech & (speech_index >= heard)).nonzero()
    cut = len(patches) if unheard.numel() == 0 else int(unheard[0, 0])
    return patches[:cut]


def speech_ms(patches: Prompt | None, empty_id: int) -> int:
    """Milliseconds of audio in a run of patches."""
    if patches is None:
        return 0
    return int((patches.text_ids == empty_id).sum()) * PATCH_MS
