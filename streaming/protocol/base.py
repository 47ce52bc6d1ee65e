"""Shared pieces of the wire protocol: model bases, server-generated ids, and protocol errors.

Client events are validated strictly (``extra="forbid"``, no str -> int coercion), the way OpenAI's
server answers ``unknown_parameter`` / ``invalid_type``. Server events are lenient (extra fields
allowed, lax types) so the client SDK can read other servers' events and newer fields.
"""

from __future__ import annotations

import enum
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


def new_id(prefix: str) -> str:
    """A server-generated id like OpenAI's: ``item_``, ``resp_``, ``event_``, ``sess_`` + 20 chars."""
    return f"{prefix}_{secrets.token_hex(10)}"


class StrictModel(BaseModel):
    """Base of every model a client sends: unknown keys and wrong JSON types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


class LenientModel(BaseModel):
    """Base of server-only payloads: tolerant to fields this version does not know."""

    model_config = ConfigDict(extra="allow")


class ErrorType(enum.StrEnum):
    """``error.type`` values (OpenAI's vocabulary)."""

    INVALID_REQUEST = "invalid_request_error"
    SERVER = "server_error"


class ErrorCode(enum.StrEnum):
    """``error.code`` values. OpenAI's codes where they exist, otherwise named after the problem."""

    # OpenAI's generic request-validation codes
    INVALID_JSON = "invalid_json"
    INVALID_VALUE = "invalid_value"
    INVALID_TYPE = "invalid_type"
    UNKNOWN_PARAMETER = "unknown_parameter"
    MISSING_REQUIRED_PARAMETER = "missing_required_parameter"
    # OpenAI's event-specific codes
    INPUT_AUDIO_BUFFER_COMMIT_EMPTY = "input_audio_buffer_commit_empty"
    RESPONSE_CANCEL_NOT_ACTIVE = "response_cancel_not_active"
    CONVERSATION_ALREADY_HAS_ACTIVE_RESPONSE = "conversation_already_has_active_response"
    ITEM_TRUNCATE_INVALID_ITEM_ID = "item_truncate_invalid_item_id"
    ITEM_DELETE_INVALID_ITEM_ID = "item_delete_invalid_item_id"
    ITEM_RETRIEVE_INVALID_ITEM_ID = "item_retrieve_invalid_item_id"
    SESSION_EXPIRED = "session_expired"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    # ours
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    MESSAGE_TOO_LARGE = "message_too_large"
    INVALID_BASE64 = "invalid_base64"
    INVALID_AUDIO_LENGTH = "invalid_audio_length"
    INPUT_AUDIO_BUFFER_FULL = "input_audio_buffer_full"
    SESSION_NOT_READY = "session_not_ready"
    UNSUPPORTED_FEATURE = "unsupported_feature"
    ITEM_ID_CONFLICT = "item_id_conflict"
    ITEM_CREATE_INVALID_PREVIOUS_ITEM_ID = "item_create_invalid_previous_item_id"  # named like OpenAI's
    ITEM_IN_ACTIVE_RESPONSE = "item_in_active_response"
    CONVERSATION_FULL = "conversation_full"
    RESPONSE_FAILED = "response_failed"
    SEND_QUEUE_FULL = "send_queue_full"


class ProtocolError(Exception):
    """A client event that cannot be honoured. The session turns it into an ``error`` event and
    carries on; nothing about it is fatal to the connection."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        event_id: str | None = None,
        type: ErrorType = ErrorType.INVALID_REQUEST,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.event_id = event_id
        self.type = type

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r}, param={self.param!r})"


def format_param(loc: tuple[Any, ...], prefix: str = "") -> str:
    """``("item", "content", 0, "type")`` -> ``"item.content[0].type"``."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_TYPE_NAMES = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "none_required": "null",
}


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def error_from_validation(
    exc: ValidationError, *, prefix: str = "", event_id: str | None = None
) -> ProtocolError:
    """Translate pydantic's first error into an OpenAI-style protocol error naming the parameter."""
    err = exc.errors(include_url=False)[0]
    kind = err["type"]
    param = format_param(tuple(err["loc"]), prefix)
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return ProtocolError(
            ErrorCode.MISSING_REQUIRED_PARAMETER,
            f"Missing required parameter: '{param}'.",
            param=param,
            event_id=event_id,
        )
    if kind == "extra_forbidden":
        return ProtocolError(
            ErrorCode.UNKNOWN_PARAMETER, f"Unknown parameter: '{param}'.", param=param, event_id=event_id
        )
    if kind == "literal_error":
        return ProtocolError(
            ErrorCode.INVALID_VALUE,
            f"Invalid value: {value!r}. Supported values are: {ctx.get('expected', '?')}.",
            param=param,
            event_id=event_id,
        )
    if kind in _TYPE_NAMES or kind.endswith("_type") or kind.endswith("_parsing"):
        expected = _TYPE_NAMES.get(kind, kind.removesuffix("_type").removesuffix("_parsing"))
        return ProtocolError(
            ErrorCode.INVALID_TYPE,
            f"Invalid type for '{param}': expected {expected}, but got {_json_type_name(value)} instead.",
            param=param,
            event_id=event_id,
        )
    if kind == "unsupported_feature":
        return ProtocolError(
            ErrorCode.UNSUPPORTED_FEATURE,
            f"Unsupported '{param}': {err['msg']}.",
            param=param,
            event_id=event_id,
        )
    # value errors from validators and numeric/length constraints
    msg = err["msg"].removeprefix("Value error, ")
    return ProtocolError(
        ErrorCode.INVALID_VALUE, f"Invalid value for '{param}': {msg}", param=param, event_id=event_id
    )


class ServerEventBase(LenientModel):
    """Base of server events. Every field of an event counts as set, so
    ``model_dump(exclude_unset=True)`` (what goes on the wire) carries them all, defaults and
    nulls included: clients that parse without defaults (Pipecat) need ``content_index: 0`` and
    ``previous_item_id: null`` as OpenAI sends them. Nested objects keep their own set fields."""

    event_id: str = Field(default_factory=lambda: new_id("event"))

    def model_post_init(self, context: Any, /) -> None:
        self.__pydantic_fields_set__.update(type(self).model_fields)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object sent to the client: fields that were set, explicit ``null`` kept."""
        return self.model_dump(mode="json", exclude_unset=True)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_unset=True)


class ClientEventBase(StrictModel):
    """Base of client events; every one may carry the client's own ``event_id``."""

    event_id: str | None = None

    def model_post_init(self, context: Any, /) -> None:
        self.__pydantic_fields_set__.add("type")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_unset=True)
