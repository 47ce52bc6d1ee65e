"""One response's output state and the GA events that describe it.

A response has one output item (an assistant message) with one content part: ``audio`` (speech
plus its transcript) or ``text``. :class:`ResponseRun` accumulates what the engine produced and
builds the events; the session decides when each is sent (and adds the conversation events).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np

from streaming import protocol as p
from streaming.actions import ResponseParams
from streaming.audio import SAMPLE_RATE, WireAudioEncoder, b64encode_audio
from streaming.conversation import Item


class ResponseState(enum.Enum):
    IN_PROGRESS = "in_progress"
    DONE = "done"


@dataclasses.dataclass
class ResponseRun:
    id: str
    item_id: str
    params: ResponseParams
    state: ResponseState = ResponseState.IN_PROGRESS
    opened: bool = False  # output item and content part announced
    text: str = ""
    audio_samples: int = 0
    first_audio_at: float | None = None
    playing: bool = False  # WebRTC: output_audio_buffer.started sent, not yet stopped or cleared
    cut: bool = False  # WebRTC: its playback was cut (cancel, barge-in) and output_audio_buffer.cleared sent
    encoder: WireAudioEncoder | None = None

    def __post_init__(self) -> None:
        if self.params.audio:
            self.encoder = WireAudioEncoder(self.params.output_format)

    @property
    def in_conversation(self) -> bool:
        return self.params.conversation == "auto"

    @property
    def audio_ms(self) -> float:
        return self.audio_samples * 1000 / SAMPLE_RATE

    def _address(self) -> dict[str, Any]:
        return {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}

    def response(self, conversation_id: str | None, **fields: Any) -> p.RealtimeResponse:
        """The response resource (``in_progress`` unless ``fields`` say otherwise)."""
        fmt: dict[str, Any] = {"type": self.params.output_format}
        if self.params.output_format == "audio/pcm":
            fmt["rate"] = SAMPLE_RATE
        base = {
            "id": self.id,
            "object": "realtime.response",
            "status": "in_progress",
            "status_details": None,
            "output": [],
            "conversation_id": conversation_id if self.in_conversation else None,
            "output_modalities": list(self.params.output_modalities),
            "max_output_tokens": "inf"
            if self.params.max_output_tokens is None
            else self.params.max_output_tokens,
            "audio": {"output": {"format": fmt, "voice": self.params.voice}},
            "usage": None,
            "metadata": self.params.metadata,
        }
        return p.RealtimeResponse.model_validate({**base, **fields})

    def fill_item(self, item: Item, status: str) -> Item:
        """Write the output so far into the assistant item."""
        item.status = status
        if self.params.audio:
            item.parts = [p.ContentPart(type="output_audio", transcript=self.text)]
        else:
            item.parts = [p.ContentPart(type="output_text", text=self.text)]
        item.audio_samples = self.audio_samples
        return item

    def new_item(self) -> Item:
        return Item(id=self.item_id, role="assistant", status="in_progress", parts=[], response_id=self.id)

    def part_added(self) -> p.ResponseContentPartAdded:
        part = {"type": "audio", "transcript": ""} if self.params.audio else {"type": "text", "text": ""}
        return p.ResponseContentPartAdded(**self._address(), part=p.ResponsePart(**part))

    def add_text(self, delta: str) -> p.ServerEventBase:
        self.text += delta
        if self.params.audio:
            return p.ResponseOutputAudioTranscriptDelta(**self._address(), delta=delta)
        return p.ResponseOutputTextDelta(**self._address(), delta=delta)

    def add_audio(self, pcm: np.ndarray, *, as_event: bool) -> p.ResponseOutputAudioDelta | None:
        """Account the audio; with ``as_event``, encode it into a delta (None when the encoder is
        still filling its resampler)."""
        self.audio_samples += len(pcm)
        if not as_event:
            return None
        payload = self.encoder.encode(pcm)
        return (
            p.ResponseOutputAudioDelta(**self._address(), delta=b64encode_audio(payload)) if payload else None
        )

    def closing_events(self, *, audio_events: bool, tail: bool = True) -> list[p.ServerEventBase]:
        """The events that close the content part (the output item and response.done follow);
        ``tail``: the encoder's last samples too (not for a cancelled response)."""
        addr = self._address()
        events: list[p.ServerEventBase] = []
        if self.params.audio:
            tail = self.encoder.flush() if tail else b""
            if tail and audio_events:
                events.append(p.ResponseOutputAudioDelta(**addr, delta=b64encode_audio(tail)))
            events.append(p.ResponseOutputAudioDone(**addr))
            events.append(p.ResponseOutputAudioTranscriptDone(**addr, transcript=self.text))
            part = p.ResponsePart(type="audio", transcript=self.text)
        else:
            events.append(p.ResponseOutputTextDone(**addr, text=self.text))
            part = p.ResponsePart(type="text", text=self.text)
        events.append(p.ResponseContentPartDone(**addr, part=part))
        return events

    def playback_end(self, now: float) -> float:
        """When the listener will have heard all of it, assuming real-time playback from the first
        audio (or now, if there was no audio)."""
        if self.first_audio_at is None:
            return now
        return max(now, self.first_audio_at + self.audio_samples / SAMPLE_RATE)

    def may_be_playing(self, now: float) -> bool:
        """Whether its audio may still be queued or playing (or the transport says it is)."""
        if self.playing:
            return True
        return (
            self.first_audio_at is not None and now < self.first_audio_at + self.audio_samples / SAMPLE_RATE
        )
