"""Which requests open a session and which name a call (what the Ray Serve router ranks by), without
a cluster: the rules are plain functions of the ASGI scope."""

from __future__ import annotations

import pytest

from streaming.rayserve.routes import RequestKind, call_replica, classify, new_call_id


@pytest.mark.parametrize(("scope", "expected"), [
    ({"type": "websocket", "path": "/v1/realtime", "query_string": b"model=x"}, (RequestKind.OPEN, None)),
    ({"type": "http", "method": "POST", "path": "/v1/realtime/calls"}, (RequestKind.OPEN, None)),
    ({"type": "http", "method": "POST", "path": "/v1/realtime"}, (RequestKind.OPEN, None)),  # the beta call flow
    ({"type": "http", "method": "DELETE", "path": "/v1/realtime/calls/rtc_ab12_ff"}, (RequestKind.CALL, "rtc_ab12_ff")),
    ({"type": "http", "method": "POST", "path": "/v1/realtime/calls/rtc_ab12_ff/hangup"},
     (RequestKind.CALL, "rtc_ab12_ff")),
    ({"type": "websocket", "path": "/v1/realtime", "query_string": b"call_id=rtc_ab12_ff"},
     (RequestKind.CALL, "rtc_ab12_ff")),  # the sideband WebSocket of a call
    ({"type": "http", "method": "GET", "path": "/healthz"}, (RequestKind.OTHER, None)),
    ({"type": "http", "method": "GET", "path": "/v1/realtime/calls"}, (RequestKind.OTHER, None)),
    ({"type": "lifespan"}, (RequestKind.OTHER, None)),
])
def test_classify(scope, expected):
    assert classify(scope) == expected


def test_a_call_id_names_its_replica():
    call_id = new_call_id("k71hc63l")
    assert call_id.startswith("rtc_k71hc63l_")
    assert call_replica(call_id) == "k71hc63l"
    assert call_replica("rtc_0123456789abcdef0123") is None  # a single server's id names no replica
    assert call_replica("sess_k71hc63l_00") is None
