"""Conversation items, content parts, and the response object.

Items are GA ``message`` items (roles ``user``, ``assistant``, ``system``). Function-call and MCP
items are not supported by this model server and are rejected with a message saying so.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import LenientModel, StrictModel
from .session_config import AudioFormat, MimoConfig, Modality, Voice, unsupported

ContentType = Literal["input_text", "input_audio", "output_text", "output_audio"]
Role = Literal["user", "assistant", "system"]
ItemStatus = Literal["completed", "incomplete", "in_progress"]

ALLOWED_CONTENT: dict[str, tuple[str, ...]] = {
    "user": ("input_text", "input_audio"),
    "system": ("input_text",),
    "assistant": ("output_text", "output_audio"),
}


class ContentPart(StrictModel):
    """One content part of a message item.

    ``input_audio.audio`` is base64 in the session's input format (a client creating an item);
    the server omits audio bytes when it reports items, except in ``conversation.item.retrieved``.
    """

    type: ContentType
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_type(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") == "input_image":
            raise unsupported("input_image content is not supported: MiMo-Audio has no image input")
        return value


class ConversationItem(StrictModel):
    """A GA message item: ``{"type": "message", "role": ..., "content": [...]}``."""

    id: str | None = Field(default=None, max_length=64)
    object: Literal["realtime.item"] | None = None
    type: Literal["message"]
    status: ItemStatus | None = None
    role: Role
    content: list[ContentPart]

    @model_validator(mode="before")
    @classmethod
    def _supported_type(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("type"), str) and value["type"] != "message":
            raise unsupported(
                f"item type {value['type']!r} is not supported by this server: only 'message' items "
                "(roles user, assistant, system) are"
            )
        return value

    @model_validator(mode="after")
    def _content_matches_role(self) -> ConversationItem:
        allowed = ALLOWED_CONTENT[self.role]
        for i, part in enumerate(self.content):
            if part.type not in allowed:
                raise ValueError(
                    f"content[{i}] has type {part.type!r}, which a {self.role} message cannot carry; "
                    f"use {' or '.join(repr(a) for a in allowed)}"
                )
        return self


class ResponseAudioOutput(StrictModel):
    format: AudioFormat | None = None
    voice: Voice | None = None


class ResponseAudio(StrictModel):
    output: ResponseAudioOutput | None = None


class ResponseCreateParams(StrictModel):
    """``response.create``'s ``response`` object: per-response overrides of the session."""

    instructions: str | None = None
    output_modalities: list[Modality] | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    conversation: Literal["auto", "none"] | None = None
    metadata: dict[str, str] | None = None
    audio: ResponseAudio | None = None
    input: list[Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    prompt: Any = None
    reasoning: Any = None
    parallel_tool_calls: bool | None = None
    mimo: MimoConfig | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError(f"metadata holds at most 16 pairs (got {len(value)})")
        for key, val in value.items():
            if len(key) > 64 or len(val) > 512:
                raise ValueError(f"metadata key {key[:64]!r}: keys are at most 64 and values 512 characters")
        return value

    @field_validator("max_output_tokens")
    @classmethod
    def _max_tokens(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"max_output_tokens must be at least 1 or 'inf' (got {value})")
        return value

    @field_validator("input")
    @classmethod
    def _input(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None:
            raise unsupported(
                "response.input (a custom context) is not supported: responses use the conversation"
            )
        return value

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise unsupported("tools (function calling) are not supported by this server")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if value is not None:
            raise unsupported("prompt templates are not supported by this server; use instructions")
        return value


class ResponseError(LenientModel):
    type: str | None = None
    code: str | None = None
    message: str | None = None


class ResponseStatusDetails(LenientModel):
    """Why a response ended as it did (``reason``: ``turn_detected``, ``client_cancelled``,
    ``max_output_tokens``, ``content_filter``; ``error`` when it failed)."""

    type: Literal["completed", "cancelled", "incomplete", "failed"] | None = None
    reason: str | None = None
    error: ResponseError | None = None


class TokenDetails(LenientModel):
    text_tokens: int | None = None
    audio_tokens: int | None = None
    cached_tokens: int | None = None


class Usage(LenientModel):
    """Token usage of a response. For MiMo, audio tokens count 25 Hz codec frames (8 codes each)."""

    total_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    input_token_details: TokenDetails | None = None
    output_token_details: TokenDetails | None = None


#: ``response.done``'s usage when the engine reported none (cancelled before it started, failed):
#: OpenAI sends zeros rather than null, and clients read ``usage.input_tokens`` unguarded
ZERO_USAGE = {"total_tokens": 0, "input_tokens": 0, "output_tokens": 0,
              "input_token_details": {"text_tokens": 0, "audio_tokens": 0, "cached_tokens": 0},
              "output_token_details": {"text_tokens": 0, "audio_tokens": 0}}


class TranscriptionUsage(LenientModel):
    """Usage of an input transcription. This server reports the audio's duration (GA's ``{"type":
    "duration", "seconds": ...}``); OpenAI's token-billed models send ``"tokens"`` with counts."""

    type: Literal["duration", "tokens"]
    seconds: float | None = None


class ResponseMimo(LenientModel):
    """``response.mimo``: MiMo extras of a finished response. ``timings`` holds per-stage wall
    times in milliseconds as reported by the engine (e.g. ``encode_ms``, ``prefill_ms``,
    ``first_audio_ms``), and ``audio_ms`` the duration of the audio generated."""

    timings: dict[str, float] | None = None
    audio_ms: float | None = None


class RealtimeResponse(LenientModel):
    """The response resource of ``response.created`` / ``response.done``."""

    id: str | None = None
    object: Literal["realtime.response"] | None = None
    status: Literal["completed", "cancelled", "failed", "incomplete", "in_progress"] | None = None
    status_details: ResponseStatusDetails | None = None
    output: list[ConversationItem] | None = None
    conversation_id: str | None = None
    output_modalities: list[Modality] | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    audio: ResponseAudio | None = None
    usage: Usage | None = None
    metadata: dict[str, str] | None = None
    mimo: ResponseMimo | None = None


class ResponsePart(LenientModel):
    """``part`` of ``response.content_part.added`` / ``.done`` (GA still says ``audio`` / ``text``)."""

    type: Literal["audio", "text"] | None = None
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None


class RateLimit(LenientModel):
    name: str | None = None
    limit: int | None = None
    remaining: int | None = None
    reset_seconds: float | None = None


class ErrorDetail(LenientModel):
    """``error`` object of an ``error`` event."""

    type: str
    code: str | None = None
    message: str
    param: str | None = None
    event_id: str | None = None
