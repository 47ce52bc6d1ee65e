"""A middleware in Ray Serve's HTTP proxy: a WebSocket whose replica died gets an ``error`` event and a
close frame with code 1012 ("service restart": reconnect), instead of the dropped TCP connection
(1006) Serve leaves; a handshake whose replica died before answering gets ``server_busy`` and 1013.

Serve loads it from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=streaming.rayserve.proxy:middlewares``
in the proxy's environment (``mimo-agent serve --ray`` sets it for its local cluster; a KubeRay
manifest sets it on the head and worker containers).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from streaming import protocol as p

log = logging.getLogger(__name__)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "streaming.rayserve.proxy:middlewares"
WS_CLOSE_SERVICE_RESTART = 1012
WS_CLOSE_TRY_AGAIN = 1013  # streaming.app.WS_CLOSE_TRY_AGAIN (not imported: the engine stays out of the proxy)


def lost_error(code: str, message: str) -> str:
    return p.ErrorEvent(error=p.ErrorDetail(type="server_error", code=code, message=message)).to_json()


class ReplicaLossGuard:
    """ASGI middleware: closes a WebSocket that the replica behind it left open (see the module doc)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        state = {"accepted": False, "closed": False}

        async def watched_receive() -> dict:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                state["closed"] = True
            return message

        async def watched_send(message: dict) -> None:
            if message["type"] == "websocket.accept":
                state["accepted"] = True
            elif message["type"] in ("websocket.close", "websocket.http.response.start"):  # closed or denied
                state["closed"] = True
            await send(message)

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            if not state["closed"]:
                await self._close(send, accepted=state["accepted"])

    @staticmethod
    async def _close(send: Any, *, accepted: bool) -> None:
        if accepted:
            log.warning("a replica ended a WebSocket session without closing it (replica died?)")
            frames = [{"type": "websocket.send", "text": lost_error(
                          "replica_failed", "the server process holding this session stopped; the session "
                          "is lost: start a new one")},
                      {"type": "websocket.close", "code": WS_CLOSE_SERVICE_RESTART, "reason": "replica failed"}]
        else:
            frames = [{"type": "websocket.accept"},
                      {"type": "websocket.send", "text": lost_error(
                          "server_busy", "no server process could take the session; try again")},
                      {"type": "websocket.close", "code": WS_CLOSE_TRY_AGAIN, "reason": "server busy"}]
        with contextlib.suppress(Exception):  # the client may be gone too
            for frame in frames:
                await send(frame)


def middlewares() -> list[Any]:
    """The proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLossGuard)]
