"""Python client SDK for OpenAI-Realtime-compatible servers (this one, or OpenAI's GA API).

::

    from streaming.client import connect        # or, client-only install: mimo_realtime.client

    async with connect("ws://127.0.0.1:8000/v1/realtime", model="mimo-audio") as client:
        await client.send_audio(samples, sample_rate=16000)   # any rate: resampled to 24 kHz
        result = await client.collect_response()               # server VAD answers on its own
        result.audio, result.transcript, result.status, result.timings

Events arrive as the same pydantic models the server uses (``streaming.protocol``), through an
async iterator (``async for event in client.events()``) and callbacks
(``client.on("response.output_audio.delta", fn)``, ``"*"`` for all). An event those models do not
fit (an item type or event type this server never sends, as OpenAI's function calls) arrives as
``UnknownServerEvent`` with its fields as received; the client's own bookkeeping reads the JSON, so
such events never end the session. What the client sends is not validated here: the server judges
it and answers with an ``error`` naming the problem (the one source of truth, and OpenAI's GA
events this server does not support still reach a server that does).

Imports without torch; ``clients/python`` packages this module, ``streaming.audio`` and
``streaming.protocol`` as the ``mimo-realtime-client`` distribution (numpy, soxr, pydantic and
websockets only), importable as ``mimo_realtime.client``. Imports inside them are relative for that.

The client is transport-agnostic: :class:`RealtimeClient` needs only an object with
``async send(str)``, ``async recv() -> str`` and ``async close()`` (a websockets connection is
one); :func:`connect` opens a WebSocket with ``websockets.asyncio.client``. Authentication: an
``Authorization: Bearer`` header, or (as browsers must) the ``openai-insecure-api-key.<key>``
subprotocol.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from typing import Any, Literal, Protocol

import numpy as np

from . import protocol as p
from .audio import (
    SAMPLE_RATE,
    SincResampler,
    WireAudioDecoder,
    WireAudioEncoder,
    as_pcm16,
    b64decode_audio,
    b64encode_audio,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_MS = 100
DEFAULT_EVENT_QUEUE = 4096  # events kept for ``events()``; the oldest are dropped beyond it
DEFAULT_RESULTS_KEPT = 32  # finished responses kept for ``collect_response``
DEFAULT_MAX_MESSAGE = 16 * 2**20

Handler = Callable[[p.ServerEventBase], Awaitable[None] | None]


class Connection(Protocol):
    async def send(self, message: str) -> None: ...
    async def recv(self) -> str | bytes: ...
    async def close(self) -> None: ...


class RealtimeClientError(RuntimeError):
    """The connection closed, or the server answered a request with an ``error`` (kept in
    ``error``: the server's ``{"type", "code", "message", "param", "event_id"}``)."""

    def __init__(self, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = error


def _field(obj: Any, *path: str) -> Any:
    """``obj[path[0]][path[1]]...`` of a JSON object, None where any step is missing or not an
    object: the client reads whatever a server sends without failing on it."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _error_of(event: p.ServerEventBase, event_id: str) -> dict[str, Any] | None:
    """The ``error`` object of an ``error`` event that answers the client event ``event_id``."""
    error = event.to_wire().get("error")
    return error if _field(error, "event_id") == event_id else None


def _lenient(model: type[Any], value: Any) -> Any:
    """``value`` as ``model`` when it fits, else None."""
    if not isinstance(value, dict):
        return None
    try:
        return model.model_validate(value)
    except ValueError:
        return None


@dataclasses.dataclass
class ResponseResult:
    """Everything one response produced, as seen by the client."""

    response_id: str
    item_id: str | None = None
    status: str | None = None
    status_details: p.ResponseStatusDetails | None = None
    audio: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int16))  # pcm16, 24 kHz
    transcript: str = ""  # of the audio
    text: str = ""  # text-only responses
    usage: p.Usage | None = None
    timings: dict[str, float] | None = None  # server-side stage timings (response.mimo.timings)
    created_at: float | None = None  # client monotonic clock
    first_audio_at: float | None = None
    done_at: float | None = None

    @property
    def audio_ms(self) -> float:
        return len(self.audio) * 1000 / SAMPLE_RATE


class _ResponseAccumulator:
    """Builds a :class:`ResponseResult` from a response's events (pure; no I/O)."""

    def __init__(self, response_id: str, output_format: str, now: float) -> None:
        self.result = ResponseResult(response_id=response_id, created_at=now)
        self._decoder = WireAudioDecoder(output_format)
        self._audio: list[np.ndarray] = []
        self._samples = 0

    @property
    def audio_ms(self) -> float:
        return self._samples * 1000 / SAMPLE_RATE

    def feed(self, event: dict[str, Any], now: float) -> bool:
        """Reads one server event (its JSON object); returns True when the response is done."""
        r = self.result
        kind = event.get("type")
        delta = event.get("delta") if isinstance(event.get("delta"), str) else ""
        if kind == "response.output_item.added" and _field(event, "item", "type") in ("message", None):
            r.item_id = _field(event, "item", "id")  # the message; function calls are other items
        elif kind == "response.output_audio.delta":
            pcm = self._decoder.decode(b64decode_audio(delta))
            if r.first_audio_at is None:
                r.first_audio_at = now
            self._audio.append(pcm)
            self._samples += len(pcm)
        elif kind == "response.output_audio_transcript.delta":
            r.transcript += delta
        elif kind == "response.output_text.delta":
            r.text += delta
        elif kind == "response.output_audio_transcript.done":
            r.transcript = event.get("transcript") or r.transcript
        elif kind == "response.output_text.done":
            r.text = event.get("text") or r.text
        elif kind == "response.done":
            resp = event.get("response") if isinstance(event.get("response"), dict) else {}
            self._audio.append(self._decoder.flush())
            r.audio = np.concatenate(self._audio)
            r.status = resp.get("status")
            r.status_details = _lenient(p.ResponseStatusDetails, resp.get("status_details"))
            r.usage = _lenient(p.Usage, resp.get("usage"))
            r.timings = _field(resp, "mimo", "timings")
            r.done_at = now
            return True
        return False


def audio_append_events(pcm24: np.ndarray, format_type: str, chunk_ms: int = DEFAULT_CHUNK_MS):
    """pcm16 at 24 kHz -> ``input_audio_buffer.append`` events of ``chunk_ms`` each, encoded in the
    session's input format."""
    encoder = WireAudioEncoder(format_type)
    step = max(1, SAMPLE_RATE * chunk_ms // 1000)
    payloads = [encoder.encode(pcm24[i : i + step]) for i in range(0, len(pcm24), step)]
    payloads.append(encoder.flush())
    return [p.InputAudioBufferAppend(audio=b64encode_audio(data)) for data in payloads if data]


class RealtimeClient:
    """A connected realtime session. Create it with :func:`connect` (or around any
    :class:`Connection`, then ``await client.start()``)."""

    def __init__(self, connection: Connection, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.connection = connection
        self.clock = clock
        self.session: p.SessionConfig | None = None  # None while the server's does not fit the model
        self.session_wire: dict[str, Any] = {}  # the session as the server last sent it
        self.closed = False
        self._handlers: dict[str, list[Handler]] = collections.defaultdict(list)
        self._queue: asyncio.Queue[p.ServerEventBase | None] = asyncio.Queue()
        self._queue_dropped = 0
        self._reader: asyncio.Task[None] | None = None
        self._waiters: list[
            tuple[Callable[[p.ServerEventBase], bool], asyncio.Future[p.ServerEventBase]]
        ] = []
        self._accumulators: dict[str, _ResponseAccumulator] = {}
        self._results: collections.OrderedDict[str, ResponseResult] = collections.OrderedDict()
        self._uncollected: collections.deque[str] = collections.deque()
        self._result_waiters: dict[str | None, list[asyncio.Future[ResponseResult]]] = (
            collections.defaultdict(list)
        )
        self._active_response: str | None = None
        self._last_audio_item: tuple[str, float, float] | None = (
            None  # (item id, first audio time, ms received)
        )
        self._resamplers: dict[int, SincResampler] = {}

    # ------------------------------------------------------------------------------------------
    # lifecycle

    async def start(self, timeout: float = 10.0) -> p.SessionConfig | None:
        """Start reading and wait for ``session.created``."""
        created = self.wait_for("session.created")
        self._reader = asyncio.create_task(self._read_loop(), name="realtime-client-reader")
        event = await asyncio.wait_for(created, timeout)
        return event.session

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self.connection.close()
        self._shutdown(RealtimeClientError("client closed"))

    async def __aenter__(self) -> RealtimeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------------------------------
    # sending

    async def send(self, event: p.ClientEventBase | dict[str, Any]) -> None:
        """Send one client event, a model or a JSON object, as it is: the server judges it (an
        invalid or unsupported event gets an ``error`` naming the problem, and the session goes on)."""
        if self.closed:
            raise RealtimeClientError("the connection is closed")
        await self.connection.send(json.dumps(event) if isinstance(event, dict) else event.to_json())

    async def request(
        self, event: dict[str, Any], reply: str, timeout: float | None = 10.0
    ) -> p.ServerEventBase:
        """Send ``event`` and wait for its answer: the next ``reply`` event, or the ``error`` whose
        ``event_id`` is this event's (given one here if it has none), which raises
        :class:`RealtimeClientError`. Errors about other events are not taken for the answer."""
        event_id = event.get("event_id") or p.new_id("event")
        event = {**event, "event_id": event_id}
        answer = self.wait_for(lambda e: e.type == reply or (e.type == "error" and _error_of(e, event_id)))
        try:
            await self.send(event)
            result = await asyncio.wait_for(answer, timeout)
        finally:
            answer.cancel()
        if result.type == "error":
            error = _error_of(result, event_id)
            raise RealtimeClientError(
                f"{event.get('type')} refused: {error.get('code')}: {error.get('message')}", error
            )
        return result

    async def update_session(
        self, wait: bool = True, timeout: float = 10.0, **fields: Any
    ) -> p.SessionConfig | None:
        """``session.update`` with the given session fields (GA shape, ``mimo`` included); waits
        for ``session.updated`` unless ``wait=False``, and raises :class:`RealtimeClientError`
        with the server's message if it refuses them."""
        fields.setdefault("type", "realtime")
        event = {"type": "session.update", "session": fields}
        if not wait:
            await self.send(event)
            return None
        await self.request(event, "session.updated", timeout)
        return self.session

    async def send_audio(
        self, audio: np.ndarray | bytes, sample_rate: int = SAMPLE_RATE, chunk_ms: int = DEFAULT_CHUNK_MS
    ) -> None:
        """Append audio: int16 or float samples (mono), or pcm16 bytes, at ``sample_rate``.
        Resampled to 24 kHz with a streaming resampler per input rate, the official pipeline's
        filter (consecutive calls join seamlessly; :meth:`commit` flushes its tail), encoded in
        the session's input format, and sent in ``chunk_ms`` pieces."""
        pcm = as_pcm16(audio)
        if sample_rate != SAMPLE_RATE:
            resampler = self._resamplers.setdefault(sample_rate, SincResampler(sample_rate, SAMPLE_RATE))
            pcm = resampler.process(pcm)
        for event in audio_append_events(pcm, self._input_format(), chunk_ms):
            await self.send(event)

    async def flush_audio(self) -> None:
        """Send what the input resamplers still hold."""
        for resampler in self._resamplers.values():
            tail = resampler.flush()
            for event in audio_append_events(tail, self._input_format()):
                await self.send(event)

    async def commit(self) -> None:
        await self.flush_audio()
        await self.send(p.InputAudioBufferCommit())

    async def clear_audio(self) -> None:
        await self.send(p.InputAudioBufferClear())

    async def send_text(self, text: str, role: Literal["user", "system", "assistant"] = "user") -> None:
        """Add a text message to the conversation (``conversation.item.create``)."""
        kind = "output_text" if role == "assistant" else "input_text"
        item = {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}
        await self.send({"type": "conversation.item.create", "item": item})

    async def create_response(self, **params: Any) -> None:
        """``response.create`` with per-response overrides (instructions, output_modalities,
        max_output_tokens, conversation, metadata, audio, mimo)."""
        await self.send({"type": "response.create", **({"response": params} if params else {})})

    async def cancel(self, response_id: str | None = None) -> None:
        await self.send(p.ResponseCancel(response_id=response_id) if response_id else p.ResponseCancel())

    async def interrupt(self, audio_end_ms: int | None = None) -> None:
        """Barge in: cancel the response in progress (if any) and truncate the last assistant audio
        item at what was played: ``audio_end_ms`` when the caller knows it, else the client's
        estimate, min(audio received, wall time since its first audio) (real-time playback)."""
        if self._active_response is not None:
            await self.cancel(self._active_response)
        if self._last_audio_item is None:
            return
        item_id, first_at, received_ms = self._last_audio_item
        if audio_end_ms is None:
            audio_end_ms = min(received_ms, (self.clock() - first_at) * 1000)
        audio_end_ms = int(max(0, min(audio_end_ms, received_ms)))
        self._last_audio_item = None
        await self.send(
            p.ConversationItemTruncate(item_id=item_id, content_index=0, audio_end_ms=audio_end_ms)
        )

    def _input_format(self) -> str:
        kind = _field(self.session_wire, "audio", "input", "format", "type")
        return kind if isinstance(kind, str) else "audio/pcm"

    # ------------------------------------------------------------------------------------------
    # receiving

    def on(self, event_type: str, handler: Handler) -> Handler:
        """Call ``handler(event)`` (sync or async) for every event of ``event_type`` ("*": all)."""
        self._handlers[event_type].append(handler)
        return handler

    def off(self, event_type: str, handler: Handler) -> None:
        self._handlers[event_type].remove(handler)

    async def events(self) -> AsyncIterator[p.ServerEventBase]:
        """Every server event, in order, until the connection closes. Events are queued from the
        moment the client starts (at most ``DEFAULT_EVENT_QUEUE``; the oldest are dropped)."""
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    def wait_for(self, match: str | Callable[[p.ServerEventBase], bool]) -> asyncio.Future[p.ServerEventBase]:
        """A future for the next event of a type (or matching a predicate), registered now so it
        cannot miss an event that arrives before it is awaited."""
        predicate = (lambda e: e.type == match) if isinstance(match, str) else match
        future: asyncio.Future[p.ServerEventBase] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        return future

    async def collect_response(
        self, response_id: str | None = None, timeout: float | None = None
    ) -> ResponseResult:
        """The result of a finished response: ``response_id``'s, or (None) the oldest finished one
        not collected yet, waiting for the next ``response.done`` if there is none."""
        if response_id is not None and response_id in self._results:
            with contextlib.suppress(ValueError):
                self._uncollected.remove(response_id)
            return self._results[response_id]
        if response_id is None and self._uncollected:
            return self._results[self._uncollected.popleft()]
        if self.closed:
            raise RealtimeClientError("the connection is closed")
        future: asyncio.Future[ResponseResult] = asyncio.get_running_loop().create_future()
        self._result_waiters[response_id].append(future)
        return await asyncio.wait_for(future, timeout)

    async def _read_loop(self) -> None:
        error: Exception = RealtimeClientError("the server closed the connection")
        try:
            while True:
                message = await self.connection.recv()
                try:
                    wire = json.loads(message)
                except ValueError as exc:
                    log.warning("ignoring a server message that is not JSON: %s", exc)
                    continue
                if not isinstance(wire, dict) or not isinstance(wire.get("type"), str):
                    log.warning("ignoring a server message that is not an event: %.200s", message)
                    continue
                await self._dispatch(wire, p.parse_server_event(wire))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ConnectionClosed and friends end the session
            error = RealtimeClientError(f"connection closed: {exc}")
        finally:
            self._shutdown(error)

    def _shutdown(self, error: Exception) -> None:
        if self.closed:
            return
        self.closed = True
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(error)
        for futures in self._result_waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        self._waiters.clear()
        self._result_waiters.clear()
        self._put(None)

    def _put(self, event: p.ServerEventBase | None) -> None:
        if event is not None and self._queue.qsize() >= DEFAULT_EVENT_QUEUE:
            self._queue.get_nowait()
            self._queue_dropped += 1
        self._queue.put_nowait(event)

    async def _dispatch(self, wire: dict[str, Any], event: p.ServerEventBase) -> None:
        self._track(wire, event)
        self._put(event)
        for handler in (*self._handlers.get(event.type, ()), *self._handlers.get("*", ())):
            try:
                outcome = handler(event)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                log.exception("handler for %s failed", event.type)
        still = []
        for predicate, future in self._waiters:
            if future.done():
                continue
            if predicate(event):
                future.set_result(event)
            else:
                still.append((predicate, future))
        self._waiters = still

    def _track(self, wire: dict[str, Any], event: p.ServerEventBase) -> None:
        """Session config, response results, and the last assistant audio (for ``interrupt``),
        read from the event's JSON so that events the models do not fit are followed too."""
        now = self.clock()
        kind = wire["type"]
        if kind in ("session.created", "session.updated") and isinstance(wire.get("session"), dict):
            self.session_wire = wire["session"]
            self.session = event.session if isinstance(event, p.SessionCreated | p.SessionUpdated) else None
        if kind in ("response.created", "response.done"):
            rid = _field(wire, "response", "id")
        else:
            rid = wire.get("response_id")
        if not isinstance(rid, str):
            return
        if kind == "response.created":
            fmt = _field(wire, "response", "audio", "output", "format", "type")
            self._accumulators[rid] = _ResponseAccumulator(rid, fmt if isinstance(fmt, str) else "audio/pcm", now)
            self._active_response = rid
        acc = self._accumulators.get(rid)
        if acc is None:
            return
        done = acc.feed(wire, now)
        if kind == "response.output_audio.delta" and isinstance(wire.get("item_id"), str):
            self._last_audio_item = (wire["item_id"], acc.result.first_audio_at, acc.audio_ms)
        if done:
            self._finish_result(acc.result)

    def _finish_result(self, result: ResponseResult) -> None:
        rid = result.response_id
        del self._accumulators[rid]
        if self._active_response == rid:
            self._active_response = None
        self._results[rid] = result
        while len(self._results) > DEFAULT_RESULTS_KEPT:
            old, _ = self._results.popitem(last=False)
            with contextlib.suppress(ValueError):
                self._uncollected.remove(old)
        waiters = self._result_waiters.pop(rid, [])
        if waiters:
            for future in waiters:
                if not future.done():
                    future.set_result(result)
            return
        anyone = [f for f in self._result_waiters.pop(None, []) if not f.done()]
        if anyone:
            anyone[0].set_result(result)
            if anyone[1:]:
                self._result_waiters[None] = anyone[1:]
        else:
            self._uncollected.append(rid)


def realtime_url(url: str, model: str | None = None) -> str:
    """The WebSocket URL of a server given as its origin, its ``/v1`` base or the full
    ``/v1/realtime`` URL (as the JavaScript SDK accepts): ``http(s)`` becomes ``ws(s)``, and
    ``?model=`` is added (kept if already there)."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if path in ("", "/v1"):
        path = (path or "/v1") + "/realtime"
    parts = parts._replace(path=path)
    query = urllib.parse.parse_qsl(parts.query)
    if model is not None and not any(k == "model" for k, _ in query):
        query.append(("model", model))
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path, urllib.parse.urlencode(query), ""))


def auth_options(api_key: str | None, auth: Literal["header", "subprotocol"]) -> dict[str, Any]:
    """websockets ``connect`` options for an API key: a Bearer header, or the browser-style
    ``openai-insecure-api-key.<key>`` subprotocol next to ``realtime``."""
    subprotocols = ["realtime"]
    headers: dict[str, str] = {}
    if api_key and auth == "header":
        headers["Authorization"] = f"Bearer {api_key}"
    elif api_key:
        subprotocols.append(f"openai-insecure-api-key.{api_key}")
    return {"additional_headers": headers, "subprotocols": subprotocols}


def refused_handshake(url: str, status: int, body: bytes | None) -> RealtimeClientError:
    """The error of a WebSocket handshake the server answered with an HTTP status: the server's
    own ``error`` object when the body holds one (401 ``invalid_api_key``, 503 ``server_busy``),
    with the status in ``error["status"]``."""
    error: dict[str, Any] = {}
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        parsed = json.loads(body or b"")
        if isinstance(_field(parsed, "error"), dict):
            error = dict(parsed["error"])
    if status == 401:
        error.setdefault("code", "invalid_api_key")
        error.setdefault("message", "the server requires an API key (api_key=...)")
    error.setdefault("type", "invalid_request_error")
    error.setdefault("message", f"HTTP {status}")
    error["status"] = status
    code = f" {error['code']}" if error.get("code") else ""
    return RealtimeClientError(f"{url} refused the connection (HTTP {status}{code}): {error['message']}", error)


class Connecting:
    """What :func:`connect` returns: ``await`` it for the client, or enter it with ``async with``
    (the client is closed on the way out), as with the official SDK's ``realtime.connect()``."""

    def __init__(self, opening: Coroutine[Any, Any, RealtimeClient]) -> None:
        self._opening = opening
        self._client: RealtimeClient | None = None

    def __await__(self) -> Generator[Any, None, RealtimeClient]:
        return self._opening.__await__()

    async def __aenter__(self) -> RealtimeClient:
        self._client = await self._opening
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()


def connect(
    url: str,
    api_key: str | None = None,
    model: str | None = None,
    *,
    auth: Literal["header", "subprotocol"] = "header",
    open_timeout: float = 10.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    **session: Any,
) -> Connecting:
    """Open a WebSocket to ``url`` (e.g. ``ws://127.0.0.1:8000/v1/realtime``), wait for
    ``session.created``, and apply ``session`` fields (GA shape) with a ``session.update``:
    ``async with connect(...) as client`` or ``client = await connect(...)``."""
    return Connecting(_open(url, api_key, model, auth, open_timeout, max_message_bytes, session))


async def _open(
    url: str,
    api_key: str | None,
    model: str | None,
    auth: Literal["header", "subprotocol"],
    open_timeout: float,
    max_message_bytes: int,
    session: dict[str, Any],
) -> RealtimeClient:
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import InvalidStatus

    ws_url = realtime_url(url, model)
    try:
        connection = await ws_connect(
            ws_url,
            open_timeout=open_timeout,
            max_size=max_message_bytes,
            compression=None,  # base64 audio does not compress; deflate only adds latency
            **auth_options(api_key, auth),
        )
    except InvalidStatus as exc:
        raise refused_handshake(ws_url, exc.response.status_code, exc.response.body) from None
    except OSError as exc:  # refused, unreachable, unknown host: nothing answered
        raise RealtimeClientError(
            f"cannot reach the server at {ws_url}: {exc.strerror or exc} (is `mimo-agent serve` running there?)",
            {"type": "connection_error", "code": "server_unreachable", "message": str(exc)},
        ) from None
    client = RealtimeClient(connection)
    try:
        await client.start(timeout=open_timeout)
        if session:
            await client.update_session(**session)
    except BaseException:
        await client.close()
        raise
    return client


__all__ = [
    "Connecting",
    "Connection",
    "RealtimeClient",
    "RealtimeClientError",
    "ResponseResult",
    "audio_append_events",
    "auth_options",
    "connect",
    "realtime_url",
]
