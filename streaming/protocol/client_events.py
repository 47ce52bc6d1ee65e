"""Client events (GA names). Each model's ``type`` is a literal; :data:`CLIENT_EVENTS` maps names
to models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .base import ClientEventBase
from .items import ConversationItem, ResponseCreateParams
from .session_config import SessionConfig


class SessionUpdate(ClientEventBase):
    """Change the session; only the fields present change. Answered by ``session.updated``."""

    type: Literal["session.update"] = "session.update"
    session: SessionConfig


class InputAudioBufferAppend(ClientEventBase):
    """Append base64 audio (in the session's input format) to the input buffer. No reply."""

    type: Literal["input_audio_buffer.append"] = "input_audio_buffer.append"
    audio: str


class InputAudioBufferCommit(ClientEventBase):
    """Turn the buffered audio into a user item (at least 100 ms). Answered by ``committed``."""

    type: Literal["input_audio_buffer.commit"] = "input_audio_buffer.commit"


class InputAudioBufferClear(ClientEventBase):
    """Drop the buffered audio. Answered by ``input_audio_buffer.cleared``."""

    type: Literal["input_audio_buffer.clear"] = "input_audio_buffer.clear"


class ConversationItemCreate(ClientEventBase):
    """Add an item (user audio/text, system text, assistant text) after ``previous_item_id``
    (default: at the end). Answered by ``conversation.item.added`` and ``.done``."""

    type: Literal["conversation.item.create"] = "conversation.item.create"
    previous_item_id: str | None = None
    item: ConversationItem

    @model_validator(mode="after")
    def _has_content(self) -> ConversationItemCreate:
        if not self.item.content:
            raise ValueError("item.content must hold at least one content part")
        return self


class ConversationItemTruncate(ClientEventBase):
    """Cut an assistant audio item at ``audio_end_ms`` (what the user heard)."""

    type: Literal["conversation.item.truncate"] = "conversation.item.truncate"
    item_id: str
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ConversationItemDelete(ClientEventBase):
    type: Literal["conversation.item.delete"] = "conversation.item.delete"
    item_id: str


class ConversationItemRetrieve(ClientEventBase):
    type: Literal["conversation.item.retrieve"] = "conversation.item.retrieve"
    item_id: str


class ResponseCreate(ClientEventBase):
    """Start a response, optionally overriding session settings for this response only."""

    type: Literal["response.create"] = "response.create"
    response: ResponseCreateParams | None = None


class ResponseCancel(ClientEventBase):
    """Cancel the in-progress response (``response_id`` optional). Answered by ``response.done``
    with status ``cancelled``, or an error ``response_cancel_not_active``."""

    type: Literal["response.cancel"] = "response.cancel"
    response_id: str | None = None


class OutputAudioBufferClear(ClientEventBase):
    """Cut off playback of queued output audio. Answered by ``output_audio_buffer.cleared``."""

    type: Literal["output_audio_buffer.clear"] = "output_audio_buffer.clear"


ClientEvent = (
    SessionUpdate
    | InputAudioBufferAppend
    | InputAudioBufferCommit
    | InputAudioBufferClear
    | ConversationItemCreate
    | ConversationItemTruncate
    | ConversationItemDelete
    | ConversationItemRetrieve
    | ResponseCreate
    | ResponseCancel
    | OutputAudioBufferClear
)

CLIENT_EVENTS: dict[str, type[Any]] = {
    model.model_fields["type"].default: model
    for model in (
        SessionUpdate,
        InputAudioBufferAppend,
        InputAudioBufferCommit,
        InputAudioBufferClear,
        ConversationItemCreate,
        ConversationItemTruncate,
        ConversationItemDelete,
        ConversationItemRetrieve,
        ResponseCreate,
        ResponseCancel,
        OutputAudioBufferClear,
    )
}
