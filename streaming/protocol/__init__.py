"""The OpenAI Realtime wire protocol (GA dialect), defined once as pydantic models.

- :func:`parse_client_event` turns one client message (text or bytes) into a typed client event,
  or raises :class:`ProtocolError` with OpenAI's error vocabulary (``invalid_json``,
  ``unknown_parameter``, ``missing_required_parameter``, ``invalid_type``, ``invalid_value`` ...).
- :func:`parse_server_event` is the lenient reader the client SDK uses; unknown event types come
  back as :class:`UnknownServerEvent` instead of failing.
- ``event.to_json()`` gives the wire form (``model_dump(exclude_unset=True)``).

The golden fixtures in ``tests/fixtures/realtime/`` (shared with the JavaScript SDK's tests) pin
the JSON shapes.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json

from .base import (
    ClientEventBase,
    ErrorCode,
    ErrorType,
    ProtocolError,
    ServerEventBase,
    error_from_validation,
    new_id,
)
from .client_events import (
    CLIENT_EVENTS,
    ClientEvent,
    ConversationItemCreate,
    ConversationItemDelete,
    ConversationItemRetrieve,
    ConversationItemTruncate,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    OutputAudioBufferClear,
    ResponseCancel,
    ResponseCreate,
    SessionUpdate,
)
from .items import (
    ZERO_USAGE,
    ContentPart,
    ConversationItem,
    ErrorDetail,
    RateLimit,
    RealtimeResponse,
    ResponseAudio,
    ResponseAudioOutput,
    ResponseCreateParams,
    ResponseMimo,
    ResponsePart,
    ResponseStatusDetails,
    TokenDetails,
    TranscriptionUsage,
    Usage,
)
from .server_events import (
    SERVER_EVENTS,
    ConversationItemAdded,
    ConversationItemCreated,
    ConversationItemDeleted,
    ConversationItemDone,
    ConversationItemRetrieved,
    ConversationItemTruncated,
    ErrorEvent,
    InputAudioBufferCleared,
    InputAudioBufferCommitted,
    InputAudioBufferSpeechStarted,
    InputAudioBufferSpeechStopped,
    InputAudioBufferTimeoutTriggered,
    InputAudioTranscriptionCompleted,
    InputAudioTranscriptionDelta,
    InputAudioTranscriptionFailed,
    OutputAudioBufferCleared,
    OutputAudioBufferStarted,
    OutputAudioBufferStopped,
    RateLimitsUpdated,
    ResponseContentPartAdded,
    ResponseContentPartDone,
    ResponseCreated,
    ResponseDone,
    ResponseOutputAudioDelta,
    ResponseOutputAudioDone,
    ResponseOutputAudioTranscriptDelta,
    ResponseOutputAudioTranscriptDone,
    ResponseOutputItemAdded,
    ResponseOutputItemDone,
    ResponseOutputTextDelta,
    ResponseOutputTextDone,
    ServerEvent,
    SessionCreated,
    SessionUpdated,
    UnknownServerEvent,
)
from .session_config import (
    G711_RATE,
    MAX_VOICE_PROMPT_MS,
    PCM_RATE,
    VOICE_DESCRIPTOR_PREFIX,
    AudioConfig,
    AudioFormat,
    AudioInputConfig,
    AudioOutputConfig,
    CodecSchedule,
    MimoConfig,
    NoiseReduction,
    SamplingConfig,
    SamplingParams,
    SessionConfig,
    TurnDetection,
    Voice,
    VoiceId,
    merge_session_update,
    parse_interleave,
    resolve_modalities,
    upgrade_beta_session,
)

#: OpenAI accepts appends of up to 15 MiB; a JSON message a bit larger than that is the ceiling.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20


#: jiter's terse messages, explained: (words in its message, what they mean)
_JSON_HINTS = (
    (("recursion limit exceeded",), "the message is nested too deeply"),
    (("surrogate", "end of hex escape"), "an unpaired UTF-16 surrogate escape, \\uD800-\\uDFFF, is no character"),
)


def decode_json(data: str | bytes | bytearray) -> Any:
    """Decode one JSON document from a client, refusing what the standard library lets through or
    fails on with something other than a decode error: nesting deep enough to overflow the stack
    (``RecursionError``), integers too long to convert (``ValueError``), ``NaN``/``Infinity``
    (not JSON), unpaired surrogate escapes (no character; the echo would fail to encode). Raises
    :class:`ProtocolError` (``invalid_json``) naming the problem and where it is. pydantic's own
    parser (jiter) does all of this with a fixed recursion limit."""
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(ErrorCode.INVALID_JSON, f"Message is not valid UTF-8: {exc}.") from None
    try:
        return from_json(data, allow_inf_nan=False, cache_strings="keys")
    except ValueError as exc:
        reason = str(exc)
        hint = next((h for needles, h in _JSON_HINTS if any(n in reason for n in needles)), None)
        if hint:
            reason += f" ({hint})"
        raise ProtocolError(
            ErrorCode.INVALID_JSON, f"We could not parse the JSON body of your request: {reason}."
        ) from None


def _decode_json(data: str | bytes | bytearray | dict[str, Any]) -> dict[str, Any]:
    obj = data if isinstance(data, dict) else decode_json(data)
    if not isinstance(obj, dict):
        raise ProtocolError(
            ErrorCode.INVALID_TYPE, f"An event must be a JSON object, but got {type(obj).__name__} instead."
        )
    return obj


def parse_client_event(
    data: str | bytes | bytearray | dict[str, Any], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> ClientEvent:
    """Parse and validate one client message. Raises :class:`ProtocolError` naming the problem;
    ``error.event_id`` is the client's ``event_id`` whenever it could be read."""
    if isinstance(data, str | bytes | bytearray) and len(data) > max_bytes:
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"Message of {len(data)} bytes exceeds the limit of {max_bytes} bytes; "
            "send audio in smaller input_audio_buffer.append chunks.",
        )
    obj = _decode_json(data)
    event_id = obj.get("event_id") if isinstance(obj.get("event_id"), str) else None
    kind = obj.get("type")
    if kind is None:
        raise ProtocolError(
            ErrorCode.MISSING_REQUIRED_PARAMETER,
            "Missing required parameter: 'type'.",
            param="type",
            event_id=event_id,
        )
    if not isinstance(kind, str):
        raise ProtocolError(
            ErrorCode.INVALID_TYPE,
            "Invalid type for 'type': expected a string.",
            param="type",
            event_id=event_id,
        )
    model = CLIENT_EVENTS.get(kind)
    if model is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_EVENT_TYPE,
            f"Unknown event type {kind!r}. Supported client events: {', '.join(sorted(CLIENT_EVENTS))}.",
            param="type",
            event_id=event_id,
        )
    if kind == "session.update" and isinstance(obj.get("session"), dict):
        obj = {**obj, "session": upgrade_beta_session(obj["session"])}
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise error_from_validation(exc, event_id=event_id) from None


def parse_server_event(data: str | bytes | bytearray | dict[str, Any]) -> ServerEvent:
    """Parse a server event for a client. Never raises on unknown or non-conforming events: those
    come back as :class:`UnknownServerEvent` carrying the raw fields. Raises :class:`ProtocolError`
    only when the message is not a JSON object."""
    obj = _decode_json(data)
    model = SERVER_EVENTS.get(obj.get("type"))  # type: ignore[arg-type]
    if model is not None:
        try:
            return model.model_validate(obj)
        except ValidationError:
            pass
    if not isinstance(obj.get("type"), str):
        obj = {**obj, "type": str(obj.get("type"))}
    return UnknownServerEvent.model_validate(obj)


__all__ = [
    "CLIENT_EVENTS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "G711_RATE",
    "MAX_VOICE_PROMPT_MS",
    "PCM_RATE",
    "SERVER_EVENTS",
    "VOICE_DESCRIPTOR_PREFIX",
    "ZERO_USAGE",
    "AudioConfig",
    "AudioFormat",
    "AudioInputConfig",
    "AudioOutputConfig",
    "ClientEvent",
    "ClientEventBase",
    "CodecSchedule",
    "ContentPart",
    "ConversationItem",
    "ConversationItemAdded",
    "ConversationItemCreate",
    "ConversationItemCreated",
    "ConversationItemDelete",
    "ConversationItemDeleted",
    "ConversationItemDone",
    "ConversationItemRetrieve",
    "ConversationItemRetrieved",
    "ConversationItemTruncate",
    "ConversationItemTruncated",
    "ErrorCode",
    "ErrorDetail",
    "ErrorEvent",
    "ErrorType",
    "InputAudioBufferAppend",
    "InputAudioBufferClear",
    "InputAudioBufferCleared",
    "InputAudioBufferCommit",
    "InputAudioBufferCommitted",
    "InputAudioBufferSpeechStarted",
    "InputAudioBufferSpeechStopped",
    "InputAudioBufferTimeoutTriggered",
    "InputAudioTranscriptionCompleted",
    "InputAudioTranscriptionDelta",
    "InputAudioTranscriptionFailed",
    "MimoConfig",
    "NoiseReduction",
    "OutputAudioBufferClear",
    "OutputAudioBufferCleared",
    "OutputAudioBufferStarted",
    "OutputAudioBufferStopped",
    "ProtocolError",
    "RateLimit",
    "RateLimitsUpdated",
    "RealtimeResponse",
    "ResponseAudio",
    "ResponseAudioOutput",
    "ResponseCancel",
    "ResponseContentPartAdded",
    "ResponseContentPartDone",
    "ResponseCreate",
    "ResponseCreateParams",
    "ResponseCreated",
    "ResponseDone",
    "ResponseMimo",
    "ResponseOutputAudioDelta",
    "ResponseOutputAudioDone",
    "ResponseOutputAudioTranscriptDelta",
    "ResponseOutputAudioTranscriptDone",
    "ResponseOutputItemAdded",
    "ResponseOutputItemDone",
    "ResponseOutputTextDelta",
    "ResponseOutputTextDone",
    "ResponsePart",
    "ResponseStatusDetails",
    "SamplingConfig",
    "SamplingParams",
    "ServerEvent",
    "ServerEventBase",
    "SessionConfig",
    "SessionCreated",
    "SessionUpdate",
    "SessionUpdated",
    "TokenDetails",
    "TranscriptionUsage",
    "TurnDetection",
    "UnknownServerEvent",
    "Usage",
    "Voice",
    "VoiceId",
    "decode_json",
    "error_from_validation",
    "merge_session_update",
    "new_id",
    "parse_client_event",
    "parse_interleave",
    "parse_server_event",
    "resolve_modalities",
    "upgrade_beta_session",
]
