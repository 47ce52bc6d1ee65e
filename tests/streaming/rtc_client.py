"""A plain WebRTC Realtime client for the server tests: aiortc, httpx and JSON on the ``oai-events``
data channel, so the tests check the wire protocol rather than an SDK.

The microphone is :class:`SpeechTrack` (recorded speech at real-time pace, silence in between);
the agent's track is read into :attr:`RtcCall.frames` with each frame's RTP media time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from streaming.audio import resample
from streaming.webrtc import FRAME_SAMPLES as FRAME  # 20 ms
from streaming.webrtc import RTC_RATE as RATE
from streaming.webrtc import voice_frame


class SpeechTrack(MediaStreamTrack):
    """A microphone: what :meth:`say` queued (24 kHz pcm16), else silence, in 20 ms frames at
    48 kHz paced to real time. :meth:`stall` stops producing frames without ending the track (a
    peer that vanished)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending = np.zeros(0, np.int16)
        self._pts = 0
        self._t0: float | None = None
        self._stalled = asyncio.Event()

    def say(self, pcm24: bytes | np.ndarray) -> float:
        """Queue speech; returns its duration in seconds."""
        pcm = np.frombuffer(pcm24, np.int16) if isinstance(pcm24, bytes) else pcm24
        self._pending = np.concatenate([self._pending, resample(pcm, 24_000, RATE)])
        return len(pcm) / 24_000

    def stall(self) -> None:
        self._stalled.set()

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._stalled.is_set():
            await asyncio.Event().wait()  # never: the sender just stops sending
        if self._t0 is None:
            self._t0 = time.monotonic()
        delay = self._t0 + self._pts / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        samples = np.zeros(FRAME, np.int16)
        chunk, self._pending = self._pending[:FRAME], self._pending[FRAME:]
        samples[: len(chunk)] = chunk
        frame = voice_frame(samples, self._pts)  # as loud as said: a browser's microphone is not 3 dB down
        self._pts += FRAME
        return frame


@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    pts: int  # media time in samples at the frame's rate
    rate: int
    peak: int
    pcm: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int16))  # mono int16 at ``rate``


@dataclass
class RtcCall:
    pc: RTCPeerConnection
    channel: Any
    mic: SpeechTrack | None
    call_id: str
    location: str
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    log: list[dict] = field(default_factory=list)  # every event, with "_at" (monotonic) added
    frames: list[Received] = field(default_factory=list)
    _reader: asyncio.Task | None = None

    def send(self, event: dict) -> None:
        self.channel.send(json.dumps(event))

    async def until(self, kind: str, timeout: float = 30.0, events: list | None = None) -> dict:
        """Read events until one of type ``kind`` (collected into ``events`` when given)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await asyncio.wait_for(self.events.get(), max(0.01, deadline - loop.time()))
            if events is not None:
                events.append(event)
            if event["type"] == kind:
                return event

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.pc.close()


class CallRefused(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}: {response.text}")
        self.response = response


async def make_offer(*, mic: bool = True, channel: bool = True, audio: bool = True) -> tuple[RTCPeerConnection, Any]:
    """A peer connection with its offer set (host candidates only); returns (pc, data channel)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    dc = pc.createDataChannel("oai-events") if channel else None
    if audio:
        if mic:
            pc.addTrack(SpeechTrack())
        else:
            pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, dc


async def post_offer(base_url: str, sdp: str, *, session: dict | None = None, multipart: bool = False,
                     headers: dict | None = None, path: str = "/v1/realtime/calls") -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        if multipart or session is not None:
            files = {"sdp": (None, sdp, "application/sdp")}
            if session is not None:
                files["session"] = (None, json.dumps(session), "application/json")
            return await http.post(path, files=files, headers=headers)
        return await http.post(path, content=sdp,
                               headers={"Content-Type": "application/sdp", **(headers or {})})


async def place_call(base_url: str, *, mic: bool = True, session: dict | None = None, multipart: bool = False,
                     headers: dict | None = None, path: str = "/v1/realtime/calls") -> RtcCall:
    """Offer, answer, wait for ``session.created`` on the data channel."""
    pc, dc = await make_offer(mic=mic)
    response = await post_offer(base_url, pc.localDescription.sdp, session=session, multipart=multipart,
                                headers=headers, path=path)
    if response.status_code != 201:
        await pc.close()
        raise CallRefused(response)
    assert response.headers["content-type"].startswith("application/sdp"), response.headers
    location = response.headers["location"]
    track = next((s.track for s in pc.getSenders() if s.track is not None), None)
    call = RtcCall(pc, dc, track, location.rsplit("/", 1)[-1], location)

    def on_message(message: str) -> None:
        event = json.loads(message)
        event["_at"] = time.monotonic()
        call.log.append(event)
        call.events.put_nowait(event)

    dc.on("message", on_message)

    @pc.on("track")
    def on_track(remote: MediaStreamTrack) -> None:
        call._reader = asyncio.ensure_future(_read(remote, call.frames))

    await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    created = await call.until("session.created")
    assert created["session"]["id"].startswith("sess_")
    return call


async def _read(track: MediaStreamTrack, frames: list[Received]) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()
            pcm = frame.to_ndarray()
            mono = pcm.reshape(-1, len(frame.layout.channels)).mean(axis=1).astype(np.int16) if pcm.size else pcm
            frames.append(Received(time.monotonic(), frame.pts, frame.sample_rate, int(np.abs(pcm).max()), mono))


def played(frames: list[Received], start: float, end: float) -> tuple[np.ndarray, int]:
    """(the agent track's mono int16 audio that arrived between monotonic ``start`` and ``end``, its rate)."""
    chosen = [f for f in frames if start <= f.at <= end]
    rate = chosen[0].rate if chosen else RATE
    return (np.concatenate([f.pcm for f in chosen]) if chosen else np.zeros(0, np.int16)), rate


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]
