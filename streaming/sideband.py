"""Sideband control of a WebRTC call: a WebSocket to ``/v1/realtime?call_id=ID`` joins the call's
session, as OpenAI's server-side controls do (the browser holds the call and its audio; the
application server watches and steers it without holding media).

The sideband is no session of its own: it takes no engine slot and has no audio. It receives every
event the call sends on its data channel from the moment it joins (a sideband that joins after the
call's ``session.created`` went out gets a ``session.created`` of its own, with the session as it
is now, so every connection starts the same way), and what it sends is handled by the call's
session exactly like events from the data channel: ``session.update``, ``response.create``,
``conversation.item.create`` ... Events a sideband sends before the browser's peer has connected
wait until it has (the session gets its engine slot then). Several sidebands may join one call.

It ends when the call ends (closed with code 1000), when it disconnects (the call goes on), or when
it stops reading (closed with 1008 once more than the server's per-session send budget,
``--send-queue-mib``, waits for it; the call goes on). An unknown
call id is refused before the handshake with 404 ``call_id_not_found``, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import FastAPI, WebSocket

from streaming import protocol as p
from streaming.app import client_messages
from streaming.config import fully_set

log = logging.getLogger(__name__)

WS_CLOSE_POLICY = 1008


async def serve_sideband(app: FastAPI, websocket: WebSocket, call_id: str, subprotocol: str | None) -> None:
    """Join ``call_id``'s session (the caller has authenticated the connection)."""
    call = getattr(app.state, "calls", {}).get(call_id)
    if call is None:
        from streaming.webrtc import call_not_found

        with contextlib.suppress(Exception):
            await websocket.send_denial_response(call_not_found(call_id).response())
            return
        await websocket.close(code=WS_CLOSE_POLICY, reason="call_id_not_found")
        return
    await websocket.accept(subprotocol=subprotocol)
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    budget = app.state.config.max_queued_bytes
    queued = [0]  # bytes waiting in ``queue``

    def listen(text: str) -> None:
        if queued[0] + len(text) > budget:
            call.listeners.discard(listen)
            queue.put_nowait(None)  # it stopped reading: let it go, the call goes on
            return
        queued[0] += len(text)
        queue.put_nowait(text)

    if call.created_sent:
        queue.put_nowait(p.SessionCreated(session=fully_set(call.bridge.session.config)).to_json())
    call.listeners.add(listen)
    log.info("call %s: sideband joined", call.id)
    receiving, sending = (asyncio.create_task(_forward(websocket, call)),
                          asyncio.create_task(_send(websocket, queue, queued)))
    tasks = [receiving, sending, asyncio.create_task(call.ended.wait())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                log.info("call %s: sideband ended: %r", call.id, t.exception())
        code, reason = 1000, "call ended"
        if not call.ended.is_set() and sending in done:
            code, reason = WS_CLOSE_POLICY, f"more than {budget} bytes of events not read"
    finally:
        call.listeners.discard(listen)
        for t in tasks:
            t.cancel()
    with contextlib.suppress(Exception):
        await websocket.close(code=code, reason=reason)


async def _forward(websocket: WebSocket, call: Any) -> None:
    """The sideband's client events into the call's session, once the call is served."""
    async for data in client_messages(websocket):
        if not call.serving.is_set():
            await call.serving.wait()
        call.on_client_message(data)


async def _send(websocket: WebSocket, queue: asyncio.Queue[str | None], queued: list[int]) -> None:
    while True:
        text = await queue.get()
        if text is None:
            return
        queued[0] -= len(text)
        await websocket.send_text(text)
