"""Server events (GA names). :data:`SERVER_EVENTS` maps names to models.

Audio deltas carry base64 audio in the session's (or response's) output format. Item, output and
content addressing (``item_id``, ``output_index``, ``content_index``) follows OpenAI's GA events.
"""

from __future__ import annotations

from typing import Any, Literal

from .base import ServerEventBase
from .items import (
    ConversationItem,
    ErrorDetail,
    RateLimit,
    RealtimeResponse,
    ResponsePart,
    TranscriptionUsage,
)
from .session_config import SessionConfig


class ErrorEvent(ServerEventBase):
    """A client event could not be honoured (the session stays open), or the server failed."""

    type: Literal["error"] = "error"
    error: ErrorDetail


class SessionCreated(ServerEventBase):
    """First event of every session, with the full configuration."""

    type: Literal["session.created"] = "session.created"
    session: SessionConfig


class SessionUpdated(ServerEventBase):
    type: Literal["session.updated"] = "session.updated"
    session: SessionConfig


class _ItemEvent(ServerEventBase):
    item: ConversationItem
    previous_item_id: str | None = None


class ConversationItemAdded(_ItemEvent):
    """An item entered the conversation (its content may still be streaming)."""

    type: Literal["conversation.item.added"] = "conversation.item.added"


class ConversationItemDone(_ItemEvent):
    """An item is complete."""

    type: Literal["conversation.item.done"] = "conversation.item.done"


class ConversationItemCreated(_ItemEvent):
    """Beta-era twin of ``conversation.item.added``, sent only when the session asks for it."""

    type: Literal["conversation.item.created"] = "conversation.item.created"


class ConversationItemRetrieved(ServerEventBase):
    type: Literal["conversation.item.retrieved"] = "conversation.item.retrieved"
    item: ConversationItem


class ConversationItemTruncated(ServerEventBase):
    type: Literal["conversation.item.truncated"] = "conversation.item.truncated"
    item_id: str
    content_index: int
    audio_end_ms: int


class ConversationItemDeleted(ServerEventBase):
    type: Literal["conversation.item.deleted"] = "conversation.item.deleted"
    item_id: str


class InputAudioTranscriptionDelta(ServerEventBase):
    """A piece of a user audio item's transcript (``audio.input.transcription`` is set)."""

    type: Literal["conversation.item.input_audio_transcription.delta"] = (
        "conversation.item.input_audio_transcription.delta"
    )
    item_id: str
    content_index: int = 0
    delta: str


class InputAudioTranscriptionCompleted(ServerEventBase):
    type: Literal["conversation.item.input_audio_transcription.completed"] = (
        "conversation.item.input_audio_transcription.completed"
    )
    item_id: str
    content_index: int = 0
    transcript: str
    usage: TranscriptionUsage | None = None  # this server always sends it; optional for reading others


class InputAudioTranscriptionFailed(ServerEventBase):
    type: Literal["conversation.item.input_audio_transcription.failed"] = (
        "conversation.item.input_audio_transcription.failed"
    )
    item_id: str
    content_index: int = 0
    error: ErrorDetail


class InputAudioBufferCommitted(ServerEventBase):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None = None


class InputAudioBufferCleared(ServerEventBase):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class InputAudioBufferSpeechStarted(ServerEventBase):
    """VAD heard speech. ``audio_start_ms`` counts from the first audio of the session and includes
    the prefix padding; clients stop playback when they see this."""

    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class InputAudioBufferSpeechStopped(ServerEventBase):
    """VAD heard the silence window end a turn; ``audio_end_ms`` includes that window."""

    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


class InputAudioBufferTimeoutTriggered(ServerEventBase):
    """``idle_timeout_ms`` elapsed with no speech after the last response finished playing."""

    type: Literal["input_audio_buffer.timeout_triggered"] = "input_audio_buffer.timeout_triggered"
    audio_start_ms: int
    audio_end_ms: int
    item_id: str


class ResponseCreated(ServerEventBase):
    type: Literal["response.created"] = "response.created"
    response: RealtimeResponse


class ResponseDone(ServerEventBase):
    """Last event of a response: status ``completed``, ``cancelled``, ``incomplete`` or ``failed``."""

    type: Literal["response.done"] = "response.done"
    response: RealtimeResponse


class _OutputItemEvent(ServerEventBase):
    response_id: str
    output_index: int
    item: ConversationItem


class ResponseOutputItemAdded(_OutputItemEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"


class ResponseOutputItemDone(_OutputItemEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"


class _ContentEvent(ServerEventBase):
    response_id: str
    item_id: str
    output_index: int
    content_index: int


class ResponseContentPartAdded(_ContentEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    part: ResponsePart


class ResponseContentPartDone(_ContentEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    part: ResponsePart


class ResponseOutputAudioDelta(_ContentEvent):
    type: Literal["response.output_audio.delta"] = "response.output_audio.delta"
    delta: str


class ResponseOutputAudioDone(_ContentEvent):
    type: Literal["response.output_audio.done"] = "response.output_audio.done"


class ResponseOutputAudioTranscriptDelta(_ContentEvent):
    type: Literal["response.output_audio_transcript.delta"] = "response.output_audio_transcript.delta"
    delta: str


class ResponseOutputAudioTranscriptDone(_ContentEvent):
    type: Literal["response.output_audio_transcript.done"] = "response.output_audio_transcript.done"
    transcript: str


class ResponseOutputTextDelta(_ContentEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str


class ResponseOutputTextDone(_ContentEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str


class RateLimitsUpdated(ServerEventBase):
    type: Literal["rate_limits.updated"] = "rate_limits.updated"
    rate_limits: list[RateLimit]


class OutputAudioBufferStarted(ServerEventBase):
    """WebRTC: the server began playing a response's audio on the media track."""

    type: Literal["output_audio_buffer.started"] = "output_audio_buffer.started"
    response_id: str


class OutputAudioBufferStopped(ServerEventBase):
    """WebRTC: a response's audio finished playing (the output buffer drained)."""

    type: Literal["output_audio_buffer.stopped"] = "output_audio_buffer.stopped"
    response_id: str


class OutputAudioBufferCleared(ServerEventBase):
    """Queued output audio was dropped (barge-in or ``output_audio_buffer.clear``)."""

    type: Literal["output_audio_buffer.cleared"] = "output_audio_buffer.cleared"
    response_id: str | None = None  # this server always names the response; optional for reading others


class UnknownServerEvent(ServerEventBase):
    """What the client SDK yields for an event this version does not know (or cannot validate):
    ``type`` plus every field as received, available as attributes and through ``model_extra``."""

    type: str


SERVER_EVENTS: dict[str, type[Any]] = {
    model.model_fields["type"].default: model
    for model in (
        ErrorEvent,
        SessionCreated,
        SessionUpdated,
        ConversationItemAdded,
        ConversationItemDone,
        ConversationItemCreated,
        ConversationItemRetrieved,
        ConversationItemTruncated,
        ConversationItemDeleted,
        InputAudioTranscriptionDelta,
        InputAudioTranscriptionCompleted,
        InputAudioTranscriptionFailed,
        InputAudioBufferCommitted,
        InputAudioBufferCleared,
        InputAudioBufferSpeechStarted,
        InputAudioBufferSpeechStopped,
        InputAudioBufferTimeoutTriggered,
        ResponseCreated,
        ResponseDone,
        ResponseOutputItemAdded,
        ResponseOutputItemDone,
        ResponseContentPartAdded,
        ResponseContentPartDone,
        ResponseOutputAudioDelta,
        ResponseOutputAudioDone,
        ResponseOutputAudioTranscriptDelta,
        ResponseOutputAudioTranscriptDone,
        ResponseOutputTextDelta,
        ResponseOutputTextDone,
        RateLimitsUpdated,
        OutputAudioBufferStarted,
        OutputAudioBufferStopped,
        OutputAudioBufferCleared,
    )
}

ServerEvent = ServerEventBase
