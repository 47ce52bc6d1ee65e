"""Conversation bookkeeping for one session: items in order, their content, the user audio kept
for ``conversation.item.retrieve``, and the audio length of each assistant item (for truncation).

Bounded: at most ``max_items`` items, and at most ``max_retained_audio_ms`` of user audio kept
across items (the oldest item's audio is released first; the item itself stays).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from streaming.audio import SAMPLE_RATE, WireAudioEncoder, b64encode_audio
from streaming.protocol import ContentPart, ConversationItem

DEFAULT_MAX_ITEMS = 4096
DEFAULT_MAX_RETAINED_AUDIO_MS = 600_000  # 10 minutes of user audio, about 29 MB


@dataclasses.dataclass
class Item:
    """One conversation item as the server keeps it."""

    id: str
    role: str  # "user" | "assistant" | "system"
    status: str  # "completed" | "incomplete" | "in_progress"
    parts: list[ContentPart]  # audio payloads stripped; kept in ``audio``
    audio: np.ndarray | None = None  # user audio, pcm16 24 kHz, while retained
    audio_samples: int = 0  # assistant: samples generated (24 kHz)
    response_id: str | None = None
    # transcript alignment: (audio samples generated when a text delta arrived, text length after it)
    text_marks: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def audio_ms(self) -> float:
        return self.audio_samples * 1000 / SAMPLE_RATE

    def part_index(self, kind: str) -> int | None:
        """The index of the first content part of type ``kind``."""
        return next((i for i, part in enumerate(self.parts) if part.type == kind), None)

    def audio_part_index(self) -> int | None:
        return self.part_index("output_audio")

    def to_model(self, *, audio_format: str | None = None) -> ConversationItem:
        """The wire form. With ``audio_format`` (retrieve), retained user audio is included,
        encoded in that wire format."""
        parts = [part.model_copy() for part in self.parts]
        if audio_format is not None and self.audio is not None:
            for part in parts:
                if part.type == "input_audio":
                    encoder = WireAudioEncoder(audio_format)
                    part.audio = b64encode_audio(encoder.encode(self.audio) + encoder.flush())
                    part.__pydantic_fields_set__.add("audio")
                    break
        return ConversationItem.model_validate(
            {
                "id": self.id,
                "object": "realtime.item",
                "type": "message",
                "status": self.status,
                "role": self.role,
                "content": [p.model_dump(exclude_unset=True) for p in parts],
            }
        )


#: ``Conversation.add(item, after=AT_START)`` puts the item first (the protocol's ``previous_item_id:
#: "root"``); an item id is never empty
AT_START = ""


class ConversationFullError(Exception):
    pass


class Conversation:
    def __init__(
        self, max_items: int = DEFAULT_MAX_ITEMS, max_retained_audio_ms: int = DEFAULT_MAX_RETAINED_AUDIO_MS
    ) -> None:
        self.max_items = max_items
        self.max_retained_samples = max_retained_audio_ms * SAMPLE_RATE // 1000
        self._items: collections.OrderedDict[str, Item] = collections.OrderedDict()
        self._retained_samples = 0

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items.values())

    @property
    def last_id(self) -> str | None:
        return next(reversed(self._items), None)

    def previous_id(self, item_id: str) -> str | None:
        """The id of the item just before ``item_id`` (None for the first)."""
        previous = None
        for key in self._items:
            if key == item_id:
                return previous
            previous = key
        return None

    def _index(self, item_id: str | None) -> int:
        return -1 if item_id is None else list(self._items).index(item_id)

    def get(self, item_id: str) -> Item | None:
        return self._items.get(item_id)

    def add(self, item: Item, after: str | None = None) -> str | None:
        """Insert ``item`` after the item ``after`` (None: append; :data:`AT_START`: first); returns
        the id of the item before it. ``after`` must be in the conversation."""
        if len(self._items) >= self.max_items:
            raise ConversationFullError(
                f"the conversation holds its maximum of {self.max_items} items; delete some first"
            )
        previous = self.last_id if after is None else after or None
        self._items[item.id] = item
        if previous != self.previous_id(item.id):  # an insertion: the items after it move down
            for key in list(self._items)[self._index(previous) + 1 : -1]:
                self._items.move_to_end(key)
        if item.audio is not None:
            self._retained_samples += len(item.audio)
            self._release_old_audio()
        return previous

    def remove(self, item_id: str) -> Item:
        item = self._items.pop(item_id)
        if item.audio is not None:
            self._retained_samples -= len(item.audio)
        return item

    def _release_old_audio(self) -> None:
        for item in self._items.values():
            if self._retained_samples <= self.max_retained_samples:
                break
            if item.audio is not None:
                self._retained_samples -= len(item.audio)
                item.audio = None

    @staticmethod
    def record_text(item: Item, text_len: int) -> None:
        item.text_marks.append((item.audio_samples, text_len))

    @staticmethod
    def truncate(item: Item, audio_end_ms: int) -> str:
        """Cut an assistant audio item at ``audio_end_ms``; returns the transcript kept.

        The transcript is cut at the last text delta that arrived before the audio reached
        ``audio_end_ms``: MiMo emits a stretch of text ahead of the speech that says it, so text
        that arrived before a given audio position is (approximately) what was spoken up to there.
        """
        end_samples = audio_end_ms * SAMPLE_RATE // 1000
        index = item.audio_part_index()
        assert index is not None
        transcript = item.parts[index].transcript or ""
        keep = 0
        if end_samples > 0:
            for at_samples, text_len in item.text_marks:
                if at_samples < end_samples:
                    keep = text_len
        kept = transcript[:keep]
        item.parts[index].transcript = kept
        item.audio_samples = min(item.audio_samples, end_samples)
        item.text_marks = [(a, n) for a, n in item.text_marks if n <= keep]
        return kept
