"""WebRTC transport (aiortc): OpenAI's GA call flow, ``POST /v1/realtime/calls``.

Signalling is one HTTP exchange, no trickle ICE: the client's SDP offer (``application/sdp``, or
``multipart/form-data`` with an ``sdp`` part and a ``session`` JSON part) in, the SDP answer out
(``201``, ``Content-Type: application/sdp``, ``Location: /v1/realtime/calls/{call_id}``). The
answer carries every server candidate: host candidates only unless STUN/TURN servers are
configured (``--ice-server``), which is what localhost and LANs need and keeps the answer instant.
aioice gathers the machine's non-loopback addresses, so a browser on the same host connects through
its LAN address; a host with nothing but a loopback interface cannot take calls. The beta path,
``POST /v1/realtime`` with an ``application/sdp`` offer, is served the same way for older clients.

One call is one :class:`~streaming.pipeline.SessionBridge`, exactly as a WebSocket connection:

* microphone: the client's Opus track, decoded by aiortc (48 kHz, usually stereo), downmixed and
  resampled to 24 kHz mono into ``bridge.push_audio`` (server VAD and the rest as over WebSocket).
  aiortc queues decoded frames without bound, so the track is read continuously and a backlog
  beyond ``max_input_backlog_frames`` (an event-loop stall) is dropped, oldest first. aiortc's
  receive jitter buffer releases audio only once 4 frames are in (80 ms): input latency that the
  WebSocket path does not have.
* agent audio: :class:`AgentAudioTrack`, 20 ms frames at 48 kHz on a fixed media clock, silence
  when idle; ``response.output_audio.delta`` is never sent on the data channel. The track owns the
  playout buffer: an interrupt (barge-in, ``response.cancel``, ``output_audio_buffer.clear``)
  flushes it, and the server truncates the assistant item to what the track had played
  (``conversation.item.truncated``; the model's context rolls back to it), which a WebSocket client
  does itself; when a response's last sample has left it the session emits
  ``output_audio_buffer.stopped``.
* events: the same JSON events as the WebSocket, on the ``oai-events`` data channel that the
  client creates before its offer. One event is one message. An event larger than the peer's
  SCTP message-size limit (``a=max-message-size``, 256 KiB in Chrome) is not split (a private
  fragmentation scheme would break other clients); it is replaced by an ``error`` event
  (``message_too_large``) naming it. Only ``conversation.item.retrieved`` of long user audio gets
  there. aiortc (>= 1.16) keeps SCTP packets within the IPv6 minimum MTU itself.

A call takes an engine slot only once its peer has connected (the data channel opened), so an
offer whose peer never connects holds none; until then it is one of at most ``max_pending_calls``
calls connecting, dropped ``channel_open_timeout_s`` after its answer. A peer that connects when
every slot is taken gets a ``server_busy`` error on the data channel and the call ends. Offer
bodies are limited while they are read (``413`` past the limit, never buffered whole).

A call ends, and its engine slot is freed, on hang-up (``DELETE /v1/realtime/calls/{id}`` or
``POST /v1/realtime/calls/{id}/hangup``), when the peer connection fails or closes, when the data
channel closes, when no microphone audio arrived for ``media_timeout_s`` (a peer that vanished
without a word; without a microphone track, ICE consent checks find it within about 30 s), when
the data channel does not open within ``channel_open_timeout_s``, or when the session ends itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcicetransport import parse_stun_turn_uri
from aiortc.sdp import SessionDescription
from av import AudioFrame
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.formparsers import MultiPartException, MultiPartParser

from streaming import protocol as p
from streaming.app import (
    TICK_S,
    Refused,
    ServerConfig,
    _unauthorized,
    authenticate,
    authorized,
    busy_error,
    new_bridge,
)
from streaming.audio import Overflow, PcmBuffer, SincResampler, StreamResampler
from streaming.config import merge_client_session
from streaming.outbox import Outbox, goodbye_deadline
from streaming.session import Transport

log = logging.getLogger(__name__)

CALLS_PATH = "/v1/realtime/calls"
EVENTS_CHANNEL = "oai-events"
WIRE_RATE = 24_000  # the session's pcm16 rate
RTC_RATE = 48_000  # Opus's clock; aiortc's encoder and decoder run at it
FRAME_SAMPLES = RTC_RATE // 50  # 20 ms
TIME_BASE = fractions.Fraction(1, RTC_RATE)
MAX_OFFER_BYTES = 64 * 1024  # an offer is a few KB
MAX_CALL_BODY_BYTES = 3 * MAX_OFFER_BYTES  # multipart: the offer, the session part and the framing
MAX_DISCARD_BYTES = 256 * 2**20  # the rest of a refused body read and dropped so the client reads the answer
DISCARD_TIMEOUT_S = 30.0  # ... for at most this long
MAX_CLOCK_LAG_S = 0.2  # the output clock skips ahead rather than burst after a longer stall


@dataclass
class WebRTCOptions:
    """Per-server WebRTC settings (``app.state.webrtc``); tests may shorten the timeouts."""

    ice_servers: list[RTCIceServer] = field(default_factory=list)
    channel_open_timeout_s: float = 10.0  # answer sent -> the oai-events channel must be open
    max_pending_calls: int = 32  # answered calls whose peer has not connected yet (they hold no slot)
    media_timeout_s: float = 10.0  # no microphone frame for this long: the peer is gone
    max_output_buffer_s: float = 180.0  # agent audio waiting to play (> the longest response)
    max_input_backlog_frames: int = 10  # decoded microphone frames waiting (200 ms)
    max_buffered_bytes: int = 1 << 20  # data channel backlog before the sender waits
    max_early_messages: int = 64  # client events held while the call takes its engine slot


class OfferError(Exception):
    """A call request that cannot be honoured: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, code: str = "invalid_offer", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        error = {"type": "invalid_request_error" if self.status < 500 else "server_error",
                 "code": self.code, "message": self.message, "param": self.param}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse({"error": error}, status_code=self.status, headers=headers)


# ------------------------------------------------------------------------------------------------
# ICE servers


def parse_ice_server(url: str) -> RTCIceServer:
    """``stun:HOST[:PORT]`` or ``turn[s]:USER:PASSWORD@HOST[:PORT][?transport=udp|tcp]`` -> an
    ``RTCIceServer``; ``ValueError`` naming the problem otherwise."""
    scheme, sep, rest = url.partition(":")
    if not sep or scheme not in ("stun", "turn", "turns"):
        raise ValueError(f"ICE server {url!r}: expected stun:HOST[:PORT] or turn:USER:PASSWORD@HOST[:PORT] "
                         "(aiortc does not support stuns:)")
    username = credential = None
    if "@" in rest:
        creds, rest = rest.rsplit("@", 1)
        username, colon, credential = creds.partition(":")
        if scheme == "stun":
            raise ValueError(f"ICE server {url!r}: STUN servers take no credentials")
        if not username or not colon:
            raise ValueError(f"ICE server {url!r}: credentials must be USER:PASSWORD@")
    if scheme != "stun" and username is None:
        raise ValueError(f"ICE server {url!r}: TURN needs credentials, turn:USER:PASSWORD@HOST:PORT")
    bare = f"{scheme}:{rest}"
    try:
        parse_stun_turn_uri(bare)
    except ValueError as exc:
        raise ValueError(f"ICE server {url!r}: {exc}") from None
    return RTCIceServer(urls=bare, username=username, credential=credential)


def ice_servers(urls: list[str] | tuple[str, ...]) -> list[RTCIceServer]:
    """Parse the configured URLs; aiortc uses one STUN and one TURN server, so more is an error."""
    servers = [parse_ice_server(u) for u in urls]
    for kind in ("stun", "turn"):
        named = [u for u in urls if u.startswith(kind)]
        if len(named) > 1:
            raise ValueError(f"aiortc uses a single {kind.upper()} server; got {len(named)}: {', '.join(named)}")
    return servers


# ------------------------------------------------------------------------------------------------
# agent audio out


def voice_frame(samples: np.ndarray, pts: int) -> AudioFrame:
    """A frame to send of mono pcm16 at 48 kHz: stereo, the voice on both channels. aiortc's Opus
    sender is always stereo and would upmix a mono frame at -3 dB (libswresample's centre-to-front
    mix), so the peer would hear the voice quieter than it was said."""
    frame = AudioFrame.from_ndarray(np.repeat(samples, 2)[None, :], format="s16", layout="stereo")
    frame.sample_rate, frame.pts, frame.time_base = RTC_RATE, pts, TIME_BASE
    return frame


class AgentAudioTrack(MediaStreamTrack):
    """The agent's voice: 20 ms frames at 48 kHz (:func:`voice_frame`), paced on a media clock
    (frame ``pts`` in samples, sent no earlier than ``start + pts / 48000``), silence when there is
    nothing to play.

    ``push`` (24 kHz pcm16 from the engine) upsamples into a bounded buffer that drops its oldest
    audio beyond ``max_buffer_s``; ``end_response`` marks where a response's audio ends, and
    ``on_drained(response_id)`` is called once the frame holding its last sample has been sent;
    ``flush`` drops everything (an interrupt) and says how much of each response it cut short had
    been played."""

    kind = "audio"

    def __init__(self, on_drained: Callable[[str], None], *, max_buffer_s: float = 180.0) -> None:
        super().__init__()
        self.on_drained = on_drained
        self._buffer = PcmBuffer(int(max_buffer_s * RTC_RATE), Overflow.DROP_OLDEST)
        self._ends: collections.deque[tuple[int, str]] = collections.deque()  # (absolute position, response)
        self._starts: dict[str, int] = {}  # response -> absolute position of its first sample
        self._upsampler = StreamResampler(WIRE_RATE, RTC_RATE)
        self._current: str | None = None  # the response being upsampled
        self._start: float | None = None
        self._pts = 0
        self.frames_sent = 0
        self.audio_frames_sent = 0  # frames that carried some agent audio
        self.audio_samples_sent = 0
        self.samples_dropped = 0  # buffer cap and flushes
        self.clock_skips = 0

    @property
    def buffered_s(self) -> float:
        return len(self._buffer) / RTC_RATE

    def push(self, response_id: str, pcm16: np.ndarray) -> None:
        """Agent audio for ``response_id``, pcm16 mono at 24 kHz."""
        if response_id != self._current:
            self._finish_current()
            self._current = response_id
            self._starts[response_id] = self._buffer.end
        self.samples_dropped += self._buffer.write(self._upsampler.process(pcm16))

    def end_response(self, response_id: str) -> None:
        """No more audio will come for ``response_id``: report it drained once played out."""
        if response_id != self._current:
            return  # no audio since the last flush: nothing plays, nothing to report
        self._finish_current()

    def _finish_current(self) -> None:
        if self._current is None:
            return
        self.samples_dropped += self._buffer.write(self._upsampler.flush())
        self._ends.append((self._buffer.end, self._current))
        self._current = None

    def flush(self) -> dict[str, int]:
        """Drop all audio not yet sent (an interrupt). Returns, for each response whose audio was
        still buffered, how many of its samples (24 kHz) had been played."""
        played_to = self._buffer.start
        cut = [response_id for _, response_id in self._ends] + [self._current] * (self._current is not None)
        played = {r: max(0, played_to - self._starts.get(r, played_to)) * WIRE_RATE // RTC_RATE for r in cut}
        self.samples_dropped += self._buffer.clear()
        self._ends.clear()
        self._starts.clear()
        self._upsampler.reset()
        self._current = None
        return played

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            lag = now - (self._start + self._pts / RTC_RATE)
            if lag > MAX_CLOCK_LAG_S:
                # The loop stalled: skip the media clock ahead instead of bursting the missed frames,
                # so the receiver sees a gap (concealed) rather than a late burst (added delay).
                self._pts += int(lag * RTC_RATE) // FRAME_SAMPLES * FRAME_SAMPLES
                self.clock_skips += 1
            else:
                await asyncio.sleep(max(0.0, -lag))
        samples = np.zeros(FRAME_SAMPLES, np.int16)
        chunk = self._buffer.read(FRAME_SAMPLES)
        samples[: len(chunk)] = chunk
        frame = voice_frame(samples, self._pts)
        self._pts += FRAME_SAMPLES
        self.frames_sent += 1
        self.audio_frames_sent += bool(len(chunk))
        self.audio_samples_sent += len(chunk)
        while self._ends and self._ends[0][0] <= self._buffer.start:
            _, response_id = self._ends.popleft()
            self._starts.pop(response_id, None)
            try:
                self.on_drained(response_id)
            except Exception:  # never let the session's bookkeeping stop the media
                log.exception("output_audio_drained(%s) failed", response_id)
        return frame


# ------------------------------------------------------------------------------------------------
# microphone in


class MicrophoneReader:
    """Reads the client's decoded track into ``push`` (the bridge's ``push_audio``): downmix,
    48 kHz -> 24 kHz pcm16, with a bounded backlog."""

    def __init__(self, track: MediaStreamTrack, push: Callable[[np.ndarray], None], options: WebRTCOptions) -> None:
        self.track, self.push, self.options = track, push, options
        self._resampler: SincResampler | None = None  # to the model: the official pipeline's filter
        self._rate = 0
        self.frames = 0
        self.frames_dropped = 0

    async def run(self) -> str:
        """Read until the track ends or goes silent; returns why it stopped."""
        while True:
            try:
                frame = await asyncio.wait_for(self.track.recv(), self.options.media_timeout_s)
            except TimeoutError:
                return f"no audio from the peer for {self.options.media_timeout_s:g} s"
            except MediaStreamError:
                return "the peer's audio track ended"
            self.frames += 1
            self._drop_backlog()
            self.push(self._to_wire(frame))

    def _to_wire(self, frame: AudioFrame) -> np.ndarray:
        if frame.format.name not in ("s16", "s16p"):
            raise ValueError(f"unexpected decoded audio format {frame.format.name}")
        channels = len(frame.layout.channels)
        pcm = frame.to_ndarray()  # packed s16: (1, samples * channels); planar: (channels, samples)
        if frame.format.is_planar:
            mono = pcm.astype(np.float32).mean(axis=0)
        else:
            mono = pcm.reshape(-1, channels).astype(np.float32).mean(axis=1)  # (samples, channels) -> (samples,)
        if frame.sample_rate != self._rate:
            self._rate = frame.sample_rate
            self._resampler = SincResampler(self._rate, WIRE_RATE)
        return self._resampler.process(np.rint(mono).astype(np.int16))

    def _drop_backlog(self) -> None:
        # aiortc hands decoded frames to the track through an unbounded asyncio.Queue (private
        # ``_queue``); it only grows when this loop falls behind, and stale audio is worth less
        # than fresh audio in a conversation.
        queue = getattr(self.track, "_queue", None)
        if not isinstance(queue, asyncio.Queue):
            return
        while queue.qsize() > self.options.max_input_backlog_frames:
            item = queue.get_nowait()
            if item is None:  # the end-of-track marker must stay
                queue.put_nowait(None)
                return
            self.frames_dropped += 1


# ------------------------------------------------------------------------------------------------
# one call


class RealtimeCall:
    """One WebRTC call: its peer connection, tracks, data channel and session bridge."""

    def __init__(self, app: FastAPI, options: WebRTCOptions) -> None:
        self.app = app
        self.options = options
        self.id = app.state.new_call_id()
        config: ServerConfig = app.state.config
        # no audio events over WebRTC: nothing to pace
        self.outbox = Outbox(lead_s=config.audio_lead_s, max_bytes=config.max_queued_bytes, pace_audio=False)
        self.track = AgentAudioTrack(self._drained, max_buffer_s=options.max_output_buffer_s)
        self.bridge = new_bridge(app, Transport.WEBRTC, self.outbox, audio_sink=self.track.push,
                                 flush_sink=self.track.flush, on_close=self._on_session_close)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(options.ice_servers)))
        self.channel: Any = None  # RTCDataChannel
        self.mic: MicrophoneReader | None = None
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.channel_open = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.task: asyncio.Task | None = None
        self.connected = False  # the peer connected and the call holds an engine slot
        self.serving = asyncio.Event()  # connected: client events reach the session from now on
        self._early: list[str | bytes] = []  # client events that arrived before
        self.listeners: set[Callable[[str], None]] = set()  # sideband connections: every event sent
        self.created_sent = False  # session.created went out (a later sideband gets its own)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)

    # --- signalling ----------------------------------------------------------------------------

    async def answer(self, offer_sdp: str) -> str:
        """Apply the offer, attach the agent track, return the SDP answer (raises OfferError)."""
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc's SDP parser raises ValueError, KeyError ... on bad input
            raise OfferError(400, f"invalid SDP offer: {sdp_problem(offer_sdp, exc)}", param="sdp") from None
        audio = [t for t in self.pc.getTransceivers() if t.kind == "audio"]
        if not audio:
            raise OfferError(400, "the SDP offer has no audio m-line: add the microphone track, or an audio "
                                  "transceiver (recvonly) to hear the agent", param="sdp")
        if self.pc.sctp is None:
            raise OfferError(400, f"the SDP offer has no data channel: create the {EVENTS_CHANNEL!r} data "
                                  "channel before creating the offer", param="sdp")
        self.pc.addTrack(self.track)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self.mic is None:
            self.mic = MicrophoneReader(track, self.bridge.push_audio, self.options)

    def _on_datachannel(self, channel: Any) -> None:
        if channel.label != EVENTS_CHANNEL or self.channel is not None:
            log.warning("call %s: ignoring data channel %r (events use %r)", self.id, channel.label, EVENTS_CHANNEL)
            return
        self.channel = channel
        channel.bufferedAmountLowThreshold = self.options.max_buffered_bytes // 2
        channel.on("message", self.on_client_message)
        channel.on("close", lambda: self._end("the data channel closed"))
        channel.on("bufferedamountlow", self._writable.set)
        if channel.readyState == "open":  # aiortc announces remote channels already open
            self.channel_open.set()
        else:
            channel.on("open", self.channel_open.set)

    def on_client_message(self, message: str | bytes) -> None:
        """A client event from the data channel or a sideband connection. Those that arrive before
        the call holds its engine slot (a client may send as soon as its channel opens) wait for it."""
        if self.serving.is_set():
            self.bridge.receive(message)
        elif len(self._early) < self.options.max_early_messages:
            self._early.append(message)
        else:
            self._end(f"the peer sent more than {self.options.max_early_messages} events before the call connected")

    def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self._end(f"peer connection {self.pc.connectionState}")

    def _on_session_close(self, reason: str) -> None:
        log.info("call %s: session closed (%s)", self.id, reason)

    def _drained(self, response_id: str) -> None:
        self.bridge.output_audio_drained(response_id)

    def _end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    def hangup(self) -> None:
        self._end("hung up")

    # --- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Wait for the peer to connect, take an engine slot, serve the call until it ends, then
        free everything (the engine slot first)."""
        calls: dict[str, RealtimeCall] = self.app.state.calls
        try:
            if await self._connect():
                await self._serve()
        finally:
            log.info("call %s ended: %s", self.id, self.end_reason or "server shutdown")
            self.bridge.close()
            calls.pop(self.id, None)
            if self.connected:
                self.app.state.bridges.discard(self.bridge)
                self.app.state.metrics.sessions_active.labels("webrtc").dec()
            self.track.stop()
            with contextlib.suppress(Exception):
                await self.pc.close()

    async def _connect(self) -> bool:
        """The data channel opens within the deadline (else the call ends); then the slot."""
        opened = asyncio.ensure_future(self.channel_open.wait())
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            await asyncio.wait([opened, ended], timeout=self.options.channel_open_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            ended.cancel()
        if self.ended.is_set():
            return False
        if not self.channel_open.is_set():
            self._end(f"the {EVENTS_CHANNEL!r} data channel did not open within "
                      f"{self.options.channel_open_timeout_s:g} s")
            return False
        metrics = self.app.state.metrics
        try:
            self.bridge.open()
        except Exception as exc:  # ServerBusy (every slot taken since the offer), or the engine is down
            metrics.sessions_rejected.labels("busy").inc()
            self.channel.send(busy_error(str(exc)).to_json())
            await self._flushed()
            self._end(f"no free slot: {exc}")
            return False
        self.connected = True
        self.serving.set()
        early, self._early = self._early, []
        for message in early:
            self.bridge.receive(message)
        self.app.state.bridges.add(self.bridge)
        metrics.sessions_total.labels("webrtc").inc()
        metrics.sessions_active.labels("webrtc").inc()
        return True

    async def _flushed(self, timeout_s: float = 1.0) -> None:
        """Give what was sent on the channel a moment to leave before the connection closes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.channel.bufferedAmount and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # bufferedAmount counts what SCTP has not sent, not what was acknowledged

    async def _serve(self) -> None:
        tasks = [asyncio.create_task(self._events()), asyncio.create_task(self._ticks()),
                 asyncio.create_task(self._microphone()), asyncio.create_task(self.ended.wait()),
                 asyncio.create_task(self._goodbye())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                log.error("call %s failed", self.id, exc_info=exc)
                self._end(f"failed: {exc}")

    async def _events(self) -> None:
        while True:
            event = await self.outbox.get()
            if event is None:
                self._end("session closed")
                return
            self.bridge.before_send(event)
            if isinstance(event, p.ResponseDone):
                self.track.end_response(event.response.id)
            if self.channel.readyState != "open":
                self._end("the data channel closed")
                return
            text = event.to_json()
            self._send(text, event.type)
            self.created_sent = self.created_sent or isinstance(event, p.SessionCreated)
            for listen in list(self.listeners):
                listen(text)
            if self.channel.bufferedAmount > self.options.max_buffered_bytes:
                self._writable.clear()
                await self._writable.wait()

    def _send(self, text: str, kind: str) -> None:
        try:
            self.channel.send(text)
        except ValueError as exc:  # larger than the peer's max-message-size
            size = len(text.encode())
            log.warning("call %s: %s of %d bytes not sent: %s", self.id, kind, size, exc)
            error = p.ErrorEvent(error=p.ErrorDetail(
                type="server_error", code=p.ErrorCode.MESSAGE_TOO_LARGE.value,
                message=f"{kind} ({size} bytes) was not sent: it exceeds the data channel's message size "
                        f"limit ({exc}). Events are not split; use the WebSocket transport for it."))
            self.channel.send(error.to_json())

    async def _goodbye(self) -> None:
        await goodbye_deadline(self.outbox)
        self._end("the session ended and the peer did not take its last events")

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.bridge.tick()

    async def _microphone(self) -> None:
        if self.mic is None:  # receive-only client: ICE consent checks find a vanished peer
            await self.ended.wait()
            return
        self._end(await self.mic.run())


# ------------------------------------------------------------------------------------------------
# routes


async def read_offer(body: OfferBody) -> tuple[str, dict[str, Any] | None]:
    """(SDP offer, session settings or None) from an ``application/sdp`` or multipart body."""
    headers = body.request.headers
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/sdp":
        return _text(b"".join([chunk async for chunk in body.read(MAX_OFFER_BYTES)]), "the SDP offer"), None
    if content_type == "multipart/form-data":
        try:
            # the whole body is limited as it streams in, so the parts need no limit of their own
            parser = MultiPartParser(headers, body.read(MAX_CALL_BODY_BYTES),
                                     max_files=2, max_fields=4, max_part_size=MAX_CALL_BODY_BYTES)
            form = await parser.parse()
        except MultiPartException as exc:
            raise OfferError(400, f"cannot read the multipart body: {exc.message}") from None
        parts = {}
        for name in ("sdp", "session"):
            value = form.get(name)
            if hasattr(value, "read"):  # sent as a file
                value = _text(await value.read(), f"the {name!r} part")
            parts[name] = value
        if not parts["sdp"]:
            raise OfferError(400, "the multipart body has no 'sdp' part (the SDP offer)", param="sdp")
        if len(parts["sdp"]) > MAX_OFFER_BYTES:
            raise OfferError(413, f"the 'sdp' part is {len(parts['sdp'])} bytes; an SDP offer is at most "
                                  f"{MAX_OFFER_BYTES}", code="request_too_large", param="sdp")
        session = None
        if parts["session"]:
            try:
                session = p.decode_json(parts["session"])
            except p.ProtocolError as err:
                raise OfferError(400, f"the 'session' part is not valid JSON: {err.message}", code=err.code.value,
                                 param="session") from None
            if not isinstance(session, dict):
                raise OfferError(400, "the 'session' part must be a JSON object (a session configuration)",
                                 param="session")
        return parts["sdp"], session
    raise OfferError(415, f"unsupported Content-Type {content_type or '(none)'!r}: send the SDP offer as "
                          "application/sdp, or multipart/form-data with 'sdp' and 'session' parts",
                     code="unsupported_media_type")


class OfferBody:
    """A call request's body, read as it arrives and never buffered past a limit.

    :meth:`read` raises ``OfferError`` 413 as soon as the body is known to be over its limit: from
    ``Content-Length`` before reading, else once the bytes read pass it. :meth:`discard` reads and
    drops what is left after a refusal was sent (:class:`RefusalResponse`), bounded in bytes and
    time: a client that sends its whole body before it reads (urllib, httpx) would otherwise find
    the connection reset under the answer when the server closes it (RFC 9112, section 9.6)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.complete = False  # the last of the body has been received

    async def read(self, limit: int) -> AsyncIterator[bytes]:
        declared = self.request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(f"Content-Length {declared}", limit)
        received = 0
        while not self.complete:
            message = await self.request.receive()
            if message["type"] != "http.request":  # the client went away
                raise OfferError(400, "the request body ended early: the client disconnected")
            self.complete = not message.get("more_body", False)
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise _too_large(f"more than {limit} bytes", limit)
            if chunk:
                yield chunk

    async def discard(self) -> None:
        headers = self.request.headers
        declared = headers.get("content-length", "")
        if (self.complete or headers.get("expect", "").lower() == "100-continue"  # it waits: nothing was sent
                or (declared.isdigit() and int(declared) > MAX_DISCARD_BYTES)):
            return
        discarded = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DISCARD_TIMEOUT_S):
                while not self.complete and discarded <= MAX_DISCARD_BYTES:
                    message = await self.request.receive()
                    if message["type"] != "http.request":
                        return
                    self.complete = not message.get("more_body", False)
                    discarded += len(message.get("body", b""))


class RefusalResponse(Response):
    """``answer`` sent at once, and completed (the connection closed, if it is to be) only once
    the rest of the request body has been read and dropped."""

    def __init__(self, answer: Response, body: OfferBody) -> None:
        super().__init__(answer.body, answer.status_code, headers=dict(answer.headers))
        self.offer_body = body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        await self.offer_body.discard()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _too_large(size: str, limit: int) -> OfferError:
    return OfferError(413, f"the request body is too large ({size}): an SDP offer, with its session, is at "
                           f"most {limit} bytes", code="request_too_large")


def sdp_problem(sdp: str, exc: Exception) -> str:
    """What is wrong with an offer aiortc refused. Its parser often fails on a bare ``assert`` or
    ``int()`` with no word of where: the first line at which a prefix of the offer no longer
    parses is named (found by bisection)."""
    reason = str(exc) or type(exc).__name__
    lines = sdp.splitlines()

    def parses(n: int) -> bool:
        try:
            SessionDescription.parse("\r\n".join(lines[:n]) + "\r\n")
        except Exception:
            return False
        return True

    if parses(len(lines)):  # the parser took it: the description itself was refused
        return reason
    good, bad = 0, len(lines)
    while bad - good > 1:
        mid = (good + bad) // 2
        if parses(mid):
            good = mid
        else:
            bad = mid
    return f"line {bad}, {lines[bad - 1][:100]!r}, is malformed ({reason})"


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise OfferError(400, f"{what} is not UTF-8 text") from None


def check_offer(sdp: str) -> str:
    """Cheap checks that name the problem before aiortc's parser sees the offer."""
    sdp = sdp.strip()
    if not sdp:
        raise OfferError(400, "empty SDP offer", param="sdp")
    if not sdp.startswith("v=0"):
        raise OfferError(400, f"not an SDP offer: it must start with 'v=0', got {sdp[:40]!r}", param="sdp")
    if "\nm=" not in sdp.replace("\r\n", "\n"):
        raise OfferError(400, "the SDP offer has no media sections (m= lines)", param="sdp")
    return sdp.replace("\r\n", "\n").replace("\n", "\r\n") + "\r\n"


def session_settings(base: dict[str, Any], session: dict[str, Any] | None) -> dict[str, Any]:
    """``base`` (the server's defaults, or a client secret's session) with the call's ``session``
    part over them, validated as a ``session.update`` would be (OfferError naming the field)."""
    try:
        return merge_client_session(base, session)
    except p.ProtocolError as err:
        raise OfferError(400, f"invalid 'session' part: {err.message}", code=err.code.value,
                         param=err.param or "session") from None


def add_webrtc_routes(app: FastAPI) -> None:
    """``POST /v1/realtime/calls`` (and the beta ``POST /v1/realtime``), ``DELETE
    /v1/realtime/calls/{id}`` and ``POST /v1/realtime/calls/{id}/hangup`` (see the module docstring)."""
    config: ServerConfig = app.state.config
    app.state.webrtc = WebRTCOptions(ice_servers=ice_servers(config.ice_servers))
    app.state.calls = {}
    app.state.new_call_id = lambda: p.new_id("rtc")  # behind Ray Serve the id also names the replica

    @app.post(CALLS_PATH)
    async def create_call(request: Request) -> Response:
        return await _create_call(app, request)

    @app.post("/v1/realtime")  # the beta flow (openai-realtime-console and its descendants)
    async def create_call_beta(request: Request) -> Response:
        return await _create_call(app, request)

    @app.delete(CALLS_PATH + "/{call_id}")
    async def delete_call(call_id: str, request: Request) -> Response:
        return await _hangup(app, request, call_id, status=204)

    @app.post(CALLS_PATH + "/{call_id}/hangup")
    async def hangup_call(call_id: str, request: Request) -> Response:
        return await _hangup(app, request, call_id, status=200)


async def _create_call(app: FastAPI, request: Request) -> Response:
    config: ServerConfig = app.state.config
    metrics = app.state.metrics
    options: WebRTCOptions = app.state.webrtc
    body = OfferBody(request)
    try:
        secret = await authenticate(app, request.headers, [])
    except Refused as exc:
        metrics.sessions_rejected.labels(exc.reason).inc()
        return RefusalResponse(exc.response(), body)
    call = None
    try:
        sdp, session = await read_offer(body)
        sdp = check_offer(sdp)
        settings = session_settings(secret.settings if secret is not None else config.session_defaults, session)
        if _engine_full(app.state.engine):
            metrics.sessions_rejected.labels("busy").inc()
            raise OfferError(503, "server_busy: every session slot is in use", code="server_busy")
        if len(app.state.calls) - sum(c.connected for c in app.state.calls.values()) >= options.max_pending_calls:
            metrics.sessions_rejected.labels("busy").inc()
            raise OfferError(503, f"server_busy: {options.max_pending_calls} calls are already connecting",
                             code="server_busy")
        call = RealtimeCall(app, options)
        try:
            call.bridge.start(settings, model=config.model_name)  # no slot yet: it waits for the peer
        except ValidationError as exc:  # a combination of settings the session refuses
            err = p.error_from_validation(exc, prefix="session")
            raise OfferError(400, f"invalid 'session' part: {err.message}", code=err.code.value,
                             param=err.param or "session") from None
        answer = await call.answer(sdp)
    except OfferError as err:
        if call is not None:
            call.bridge.close()
            await call.pc.close()
        return RefusalResponse(err.response(), body)
    except BaseException:
        if call is not None:
            call.bridge.close()
            await call.pc.close()
        raise
    app.state.calls[call.id] = call
    call.task = asyncio.create_task(call.run(), name=f"call-{call.id}")
    return Response(answer, status_code=201, media_type="application/sdp",
                    headers={"Location": f"{CALLS_PATH}/{call.id}"})


def call_not_found(call_id: str) -> OfferError:
    """OpenAI's answer to an unknown call id (hang-up, sideband)."""
    return OfferError(404, f"No session found for the provided call_id {call_id!r} (the call ended, or "
                           "never existed).", code="call_id_not_found", param="call_id")


def _engine_full(engine: Any) -> bool:
    """No free slot now (an engine that does not say is never full here; opening the slot tells)."""
    try:
        return engine.active_sessions >= engine.config.max_sessions
    except AttributeError:
        return False


async def _hangup(app: FastAPI, request: Request, call_id: str, *, status: int) -> Response:
    if not authorized(app.state.config.api_key, request.headers, []):
        return _unauthorized()
    call: RealtimeCall | None = app.state.calls.get(call_id)
    if call is None:
        return call_not_found(call_id).response()
    call.hangup()
    if call.task is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(call.task), 5.0)
    return Response(status_code=status)
