"""The HTTP app: OpenAI Realtime over WebSocket (``GET /v1/realtime``), models, health, metrics,
and the browser demo at ``/``.

The app holds no model: it is given a running engine (``agent.engine.Engine`` or anything with
its ``open_session``) and talks to it only through :class:`~streaming.pipeline.SessionBridge`.
Each WebSocket connection runs three tasks in one task group (receive, send, timers); whichever
ends first ends the others, and cleanup (cancel the response, free the slot) happens in
``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from streaming import protocol as p
from streaming.metrics import ServerMetrics
from streaming.outbox import DEFAULT_LEAD_S, Outbox, OutboxFull
from streaming.pipeline import SessionBridge
from streaming.session import RealtimeSession, SessionLimits, SessionOptions, Transport

log = logging.getLogger(__name__)

API_KEY_SUBPROTOCOL = "openai-insecure-api-key."
TICK_S = 0.05  # session timers (duration limit, idle timeout, cancel grace)
WS_CLOSE_TRY_AGAIN = 1013
WS_CLOSE_POLICY = 1008


@dataclass
class ServerConfig:
    """What the app serves and its limits; named defaults throughout."""

    model_name: str = "mimo-audio-tiny"
    api_key: str | None = None
    limits: SessionLimits = field(default_factory=SessionLimits)
    session_defaults: dict[str, Any] = field(default_factory=dict)  # merged over the protocol defaults
    audio_lead_s: float = DEFAULT_LEAD_S  # output audio sent ahead of real time
    web_root: str | None = None  # directory of the demo; None: the packaged ``web``
    description: dict[str, Any] = field(default_factory=dict)  # /healthz extras: device, preset ...
    ice_servers: tuple[str, ...] = ()  # WebRTC STUN/TURN URLs (streaming.webrtc.parse_ice_server); none: host only


class ServerBusyError(Exception):
    pass


def authorized(api_key: str | None, headers: Any, subprotocols: list[str]) -> bool:
    """``Authorization: Bearer <key>`` or the ``openai-insecure-api-key.<key>`` subprotocol."""
    if not api_key:
        return True
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip(), api_key):
        return True
    for proto in subprotocols:
        if proto.startswith(API_KEY_SUBPROTOCOL) and hmac.compare_digest(proto[len(API_KEY_SUBPROTOCOL):], api_key):
            return True
    return False


def create_app(engine: Any, config: ServerConfig | None = None, *, metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``."""
    config = config or ServerConfig()
    metrics = metrics or ServerMetrics(queue_depth=lambda: getattr(engine, "queue_depth", 0))
    app = FastAPI(title="mimo-voice-agent", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.config = config
    app.state.metrics = metrics
    app.state.bridges = set()
    app.state.health_extras = []  # callables returning more /healthz fields (a Ray replica lists its peers)
    started = time.time()

    @app.get("/healthz")
    async def healthz() -> dict:
        health = {
            "status": "ok",
            "model": config.model_name,
            "sessions": len(app.state.bridges),
            # WebRTC calls answered whose peer has not connected yet: they hold no engine slot
            "calls_connecting": sum(not call.connected for call in getattr(app.state, "calls", {}).values()),
            "max_sessions": getattr(getattr(engine, "config", None), "max_sessions", None),
            "uptime_s": round(time.time() - started, 1),
            **config.description,
        }
        for extra in app.state.health_extras:
            health.update(extra())
        return health

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not authorized(config.api_key, request.headers, []):
            return _unauthorized()
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": int(started), "owned_by": "mimo-voice-agent"}]})

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.send_queue.set(sum(len(b.outbox) for b in app.state.bridges))
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        await serve_websocket(app, websocket)

    try:  # WebRTC (aiortc) is optional at import time so the WebSocket path never depends on it
        from streaming.webrtc import add_webrtc_routes
    except ImportError:
        pass
    else:
        add_webrtc_routes(app)

    root = config.web_root or str(resources.files("web"))
    app.mount("/", StaticFiles(directory=root, html=True), name="web")
    return app


def _unauthorized() -> Response:
    body = {"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                      "message": "Missing or invalid API key: send 'Authorization: Bearer <key>' "
                                 "or the 'openai-insecure-api-key.<key>' subprotocol."}}
    return JSONResponse(body, status_code=401)


def new_bridge(app: FastAPI, transport: Transport, outbox: Outbox, **kwargs: Any) -> SessionBridge:
    """A bridge for a new connection, with the server's limits and session defaults."""
    config: ServerConfig = app.state.config
    session = RealtimeSession(SessionOptions(transport=transport, limits=config.limits))
    return SessionBridge(app.state.engine, session, outbox, loop=asyncio.get_running_loop(),
                         metrics=app.state.metrics, codec_schedule=getattr(app.state, "codec_schedule", None),
                         **kwargs)


def busy_error(message: str) -> p.ErrorEvent:
    return p.ErrorEvent(error=p.ErrorDetail(type="server_error", code="server_busy", message=message))


async def serve_websocket(app: FastAPI, websocket: WebSocket) -> None:
    config: ServerConfig = app.state.config
    metrics: ServerMetrics = app.state.metrics
    offered = list(websocket.scope.get("subprotocols") or [])
    if not authorized(config.api_key, websocket.headers, offered):
        metrics.sessions_rejected.labels("unauthorized").inc()
        with contextlib.suppress(Exception):
            await websocket.send_denial_response(_unauthorized())
            return
        await websocket.close(code=WS_CLOSE_POLICY, reason="invalid API key")
        return
    subprotocol = "realtime" if "realtime" in offered else None
    call_id = websocket.query_params.get("call_id")
    if call_id is not None:  # a sideband: join a WebRTC call's session
        from streaming.sideband import serve_sideband

        await serve_sideband(app, websocket, call_id, subprotocol)
        return
    outbox = Outbox(lead_s=config.audio_lead_s)
    bridge = new_bridge(app, Transport.WEBSOCKET, outbox)
    try:
        bridge.open()
    except Exception as exc:  # ServerBusy (every slot taken), or the engine is down
        metrics.sessions_rejected.labels("busy").inc()
        await websocket.accept(subprotocol=subprotocol)
        await websocket.send_text(busy_error(str(exc)).to_json())
        await websocket.close(code=WS_CLOSE_TRY_AGAIN, reason="server busy")
        return
    await websocket.accept(subprotocol=subprotocol)
    app.state.bridges.add(bridge)
    metrics.sessions_total.labels("websocket").inc()
    metrics.sessions_active.labels("websocket").inc()
    try:
        bridge.start(config.session_defaults, model=config.model_name)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_receive_loop(websocket, bridge)),
                     tg.create_task(_send_loop(websocket, bridge)),
                     tg.create_task(_tick_loop(bridge))]
            done = asyncio.Event()
            for t in tasks:
                t.add_done_callback(lambda _t: done.set())
            await done.wait()
            for t in tasks:
                t.cancel()
    except* (WebSocketDisconnect, ConnectionError):
        pass
    except* OutboxFull:
        log.warning("closing a session whose client stopped reading")
    except* Exception:
        log.exception("session failed")
    finally:
        bridge.close()
        app.state.bridges.discard(bridge)
        metrics.sessions_active.labels("websocket").dec()
        with contextlib.suppress(Exception):
            await websocket.close()


async def _receive_loop(websocket: WebSocket, bridge: SessionBridge) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text")
        if data is None:
            data = message.get("bytes")
        if data is not None:
            bridge.receive(data)


async def _send_loop(websocket: WebSocket, bridge: SessionBridge) -> None:
    while True:
        event = await bridge.outbox.get()
        if event is None:  # the session closed itself (duration limit): say goodbye
            await websocket.close(code=1000)
            return
        bridge.before_send(event)
        await websocket.send_text(event.to_json())


async def _tick_loop(bridge: SessionBridge) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        bridge.tick()
