"""The HTTP app: OpenAI Realtime over WebSocket (``GET /v1/realtime``), models, health, metrics,
and the browser demo at ``/``.

The app holds no model: it is given a running engine (``agent.engine.Engine`` or anything with
its ``open_session``) and talks to it only through :class:`~streaming.pipeline.SessionBridge`.
Each WebSocket connection runs three tasks in one task group (receive, send, timers); whichever
ends first ends the others, and cleanup (cancel the response, free the slot) happens in
``finally``. A session that ended (its outbox closed) gets ``GOODBYE_S`` to send its last events,
then the connection is closed whether the client read them or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from streaming import protocol as p
from streaming.client_secrets import add_client_secret_routes
from streaming.metrics import ServerMetrics
from streaming.outbox import DEFAULT_LEAD_S, DEFAULT_MAX_BYTES, GOODBYE_S, Outbox, goodbye_deadline
from streaming.pipeline import SessionBridge
from streaming.session import RealtimeSession, SessionLimits, SessionOptions, Transport
from streaming.turn_model import TurnScorer
from streaming.vad import DEFAULT_CANDIDATE_MS

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
    max_queued_bytes: int = DEFAULT_MAX_BYTES  # per session: events waiting to be sent, serialized
    web_root: str | None = None  # directory of the demo; None: the packaged ``web``
    description: dict[str, Any] = field(default_factory=dict)  # /healthz extras: device, preset ...
    ice_servers: tuple[str, ...] = ()  # WebRTC STUN/TURN URLs (streaming.webrtc.parse_ice_server); none: host only
    cors_origins: tuple[str, ...] = ()  # browser origins allowed cross-origin (the SDK, calls, client secrets)
    stream_input: bool = False  # server-VAD turns reach the engine while spoken (SessionOptions.stream_input)
    speculate: bool = False  # held answers at a candidate end of turn (SessionOptions.speculate; needs stream_input)
    candidate_ms: int = DEFAULT_CANDIDATE_MS  # silence that makes a candidate end (speculation, semantic_vad)
    turn_model: str | None = None  # semantic_vad's end-of-turn model file (None: streaming.turn_model.find_model)


class ServerBusyError(Exception):
    pass


def _presented(headers: Any, subprotocols: list[str]) -> list[str]:
    """The keys a request presents: ``Authorization: Bearer <key>``, ``openai-insecure-api-key.<key>``."""
    auth = headers.get("authorization", "")
    keys = [auth[7:].strip()] if auth.lower().startswith("bearer ") else []
    return keys + [proto[len(API_KEY_SUBPROTOCOL):] for proto in subprotocols if proto.startswith(API_KEY_SUBPROTOCOL)]


def authorized(api_key: str | None, headers: Any, subprotocols: list[str]) -> bool:
    """The server's API key (or none is configured): what creating client secrets, listing models
    and hanging up need."""
    return not api_key or any(hmac.compare_digest(key, api_key) for key in _presented(headers, subprotocols))


class Refused(Exception):
    """A connection refused before its session starts: :meth:`response` is the HTTP answer,
    ``reason`` the ``mimo_sessions_rejected`` label."""

    reason: str
    #: how a WebSocket that cannot be sent ``response()`` (its handshake already answered) is closed
    close: tuple[int, str]

    def response(self) -> Response:
        raise NotImplementedError


class Unauthorized(Refused):
    """No valid key; the message (or None: the standard one) says what is wrong."""

    reason = "unauthorized"
    close = (WS_CLOSE_POLICY, "invalid API key")

    def response(self) -> Response:
        return _unauthorized(self.args[0] if self.args else None)


class KeyCheckUnavailable(Refused):
    """A client secret that could not be checked: its store did not answer (503, try again)."""

    reason = "unavailable"
    close = (WS_CLOSE_TRY_AGAIN, "client secrets unavailable")

    def response(self) -> Response:
        from streaming.client_secrets import unavailable_response

        return unavailable_response(self.args[0])


async def authenticate(app: FastAPI, headers: Any, subprotocols: list[str]) -> Any:
    """What opens a session: the API key (returns None), or an ephemeral client secret (returns
    the :class:`~streaming.client_secrets.ClientSecret`, whose session settings apply). An
    ``ek_`` key that is unknown or expired is refused even on a server without an API key; one
    whose store does not answer (a fleet's registry) raises :class:`KeyCheckUnavailable`."""
    from streaming.client_secrets import PREFIX, SecretStoreUnavailable

    api_key = app.state.config.api_key
    problem = None
    for key in _presented(headers, subprotocols):
        if api_key and hmac.compare_digest(key, api_key):
            return None
        if key.startswith(PREFIX):
            try:
                return await app.state.client_secrets.check(key)
            except LookupError as exc:
                problem = str(exc)
            except SecretStoreUnavailable as exc:
                raise KeyCheckUnavailable(str(exc)) from exc
    if problem is not None or api_key:
        raise Unauthorized(problem)
    return None


def create_app(engine: Any, config: ServerConfig | None = None, *, metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``."""
    config = config or ServerConfig()
    metrics = metrics or ServerMetrics(queue_depth=lambda: getattr(engine, "queue_depth", 0))
    app = FastAPI(title="mimo-voice-agent", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.config = config
    app.state.metrics = metrics
    app.state.bridges = set()
    app.state.turn_scorer = TurnScorer(config.turn_model)  # semantic_vad's model, on its own thread
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
        metrics.send_queue.set(sum(b.outbox.queued_bytes for b in app.state.bridges))
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        await serve_websocket(app, websocket)

    @app.get("/v1/realtime")
    async def realtime_access(request: Request) -> Response:
        """Whether these credentials open a session here, over plain HTTP: a browser is told nothing
        of a refused WebSocket handshake (a 401 looks like a server that is down: close code 1006),
        so the JavaScript SDK asks here when a connection fails."""
        try:
            await authenticate(app, request.headers, [])
        except Refused as exc:
            return exc.response()
        return JSONResponse({"object": "realtime.access", "model": config.model_name,
                             "websocket": str(request.url.replace(scheme="wss" if request.url.scheme == "https"
                                                                  else "ws", query=""))})

    add_client_secret_routes(app)
    if config.cors_origins:
        # pages on these origins may import /sdk/, post WebRTC offers (and read the Location that
        # names the call), mint client secrets and list models; WebSockets are not subject to CORS
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Location"], max_age=600)
    try:  # WebRTC (aiortc) is optional at import time so the WebSocket path never depends on it
        from streaming.webrtc import add_webrtc_routes
    except ImportError:
        pass
    else:
        add_webrtc_routes(app)

    root = config.web_root or str(resources.files("web"))
    app.mount("/", StaticFiles(directory=root, html=True), name="web")
    return app


def _unauthorized(message: str | None = None) -> Response:
    body = {"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                      "message": message or "Missing or invalid API key: send 'Authorization: Bearer <key>' "
                                            "(the API key or a client secret) or the "
                                            "'openai-insecure-api-key.<key>' subprotocol."}}
    return JSONResponse(body, status_code=401)


def new_bridge(app: FastAPI, transport: Transport, outbox: Outbox, **kwargs: Any) -> SessionBridge:
    """A bridge for a new connection, with the server's limits and session defaults."""
    config: ServerConfig = app.state.config
    session = RealtimeSession(SessionOptions(transport=transport, limits=config.limits, turn_model=config.turn_model,
                                             stream_input=config.stream_input, speculate=config.speculate,
                                             vad_candidate_ms=config.candidate_ms))
    return SessionBridge(app.state.engine, session, outbox, loop=asyncio.get_running_loop(),
                         metrics=app.state.metrics, codec_schedule=getattr(app.state, "codec_schedule", None),
                         turn_scorer=app.state.turn_scorer, **kwargs)


def busy_error(message: str) -> p.ErrorEvent:
    return p.ErrorEvent(error=p.ErrorDetail(type="server_error", code="server_busy", message=message))


async def serve_websocket(app: FastAPI, websocket: WebSocket) -> None:
    config: ServerConfig = app.state.config
    metrics: ServerMetrics = app.state.metrics
    offered = list(websocket.scope.get("subprotocols") or [])
    try:
        secret = await authenticate(app, websocket.headers, offered)
    except Refused as exc:
        metrics.sessions_rejected.labels(exc.reason).inc()
        with contextlib.suppress(Exception):
            await websocket.send_denial_response(exc.response())
            return
        code, reason = exc.close
        await websocket.close(code=code, reason=reason)
        return
    subprotocol = "realtime" if "realtime" in offered else None
    call_id = websocket.query_params.get("call_id")
    if call_id is not None:  # a sideband: join a WebRTC call's session
        from streaming.sideband import serve_sideband

        await serve_sideband(app, websocket, call_id, subprotocol)
        return
    outbox = Outbox(lead_s=config.audio_lead_s, max_bytes=config.max_queued_bytes)
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
        bridge.start(secret.settings if secret is not None else config.session_defaults, model=config.model_name)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_receive_loop(websocket, bridge)),
                     tg.create_task(_send_loop(websocket, bridge)),
                     tg.create_task(_tick_loop(bridge)),
                     tg.create_task(goodbye_deadline(outbox))]
            done = asyncio.Event()
            for t in tasks:
                t.add_done_callback(lambda _t: done.set())
            await done.wait()
            for t in tasks:
                t.cancel()
    except* (WebSocketDisconnect, ConnectionError):
        pass
    except* Exception:
        log.exception("session failed")
    finally:
        bridge.close()
        app.state.bridges.discard(bridge)
        metrics.sessions_active.labels("websocket").dec()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(), GOODBYE_S)


async def client_messages(websocket: WebSocket) -> AsyncIterator[str | bytes]:
    """A WebSocket's text and binary messages until the client disconnects."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text")
        if data is None:
            data = message.get("bytes")
        if data is not None:
            yield data


async def _receive_loop(websocket: WebSocket, bridge: SessionBridge) -> None:
    async for data in client_messages(websocket):
        bridge.receive(data)


async def _send_loop(websocket: WebSocket, bridge: SessionBridge) -> None:
    while True:
        event = await bridge.outbox.get()
        if event is None:  # the session closed itself (duration limit, a client not reading): say goodbye
            if bridge.outbox.failed:
                await websocket.close(code=WS_CLOSE_POLICY, reason="send queue full: the client is not reading")
            else:
                await websocket.close(code=1000)
            return
        bridge.before_send(event)
        await websocket.send_text(event.to_json())


async def _tick_loop(bridge: SessionBridge) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        bridge.tick()
