"""Which requests open a session and which name a call: shared by the router (in Serve's proxy)
and the replica (which counts the session openings it received, so the router can tell which of
the ones it sent are already in a replica's reported load)."""

from __future__ import annotations

import secrets
from enum import Enum
from typing import Any
from urllib.parse import parse_qs

REALTIME_PATH = "/v1/realtime"
CALLS_PATH = "/v1/realtime/calls"  # streaming.webrtc.CALLS_PATH (not imported: aiortc stays out of the proxy)
CALL_PREFIX = "rtc_"


class RequestKind(Enum):
    OPEN = "open"  # a new session: WebSocket /v1/realtime, or a WebRTC call's SDP offer
    CALL = "call"  # names a call: hang-up, the sideband WebSocket (?call_id=)
    OTHER = "other"  # health, metrics, models, the demo


def classify(scope: dict[str, Any]) -> tuple[RequestKind, str | None]:
    """(kind, call id) of an ASGI ``scope``."""
    path = scope.get("path", "")
    if path.startswith(CALLS_PATH + "/"):
        return RequestKind.CALL, path[len(CALLS_PATH) + 1:].split("/", 1)[0]
    if path == REALTIME_PATH:
        call_id = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("call_id")
        if call_id:
            return RequestKind.CALL, call_id[0]
        if scope.get("type") == "websocket" or scope.get("method") == "POST":
            return RequestKind.OPEN, None
    if path == CALLS_PATH and scope.get("method") == "POST":
        return RequestKind.OPEN, None
    return RequestKind.OTHER, None


def new_call_id(replica: str) -> str:
    """A call id that names its replica: ``rtc_<replica>_<random>``."""
    return f"{CALL_PREFIX}{replica}_{secrets.token_hex(8)}"


def call_replica(call_id: str) -> str | None:
    """The replica named by a call id from :func:`new_call_id`; None for any other id."""
    if not call_id.startswith(CALL_PREFIX):
        return None
    replica, sep, _ = call_id[len(CALL_PREFIX):].rpartition("_")
    return replica if sep and replica else None
