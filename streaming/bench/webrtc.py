"""The benchmark's WebRTC transport (aiortc): OpenAI's GA call flow against ``POST /v1/realtime/calls``.

The simulated user's microphone becomes an Opus track (:class:`MicTrack`, 20 ms frames at 48 kHz
on a real-time media clock); an audio chunk counts as sent when the frame holding its last sample
has been handed to the encoder. Events travel as JSON on the ``oai-events`` data channel. The
agent's voice arrives on the server's track, which sends silence when it has nothing to play:
frames with agent audio (peak above :data:`AUDIO_PEAK`) are reported to the user as
``response.output_audio.delta`` events carrying a sample count, at their arrival time, so the
same first-audio and continuity clocks apply as over WebSocket. A response ends for the listener
at ``output_audio_buffer.stopped`` (its last sample has played), not at ``response.done``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from streaming.audio import SAMPLE_RATE, StreamResampler
from streaming.bench.users import BenchError
from streaming.webrtc import FRAME_SAMPLES as FRAME  # 20 ms
from streaming.webrtc import RTC_RATE, voice_frame

AUDIO_PEAK = 64  # a received frame louder than this carries agent audio (the track's idle frames are silent)
CALLS_PATH = "/v1/realtime/calls"
EVENTS_CHANNEL = "oai-events"


class MicTrack(MediaStreamTrack):
    """What :meth:`push` queued (24 kHz pcm16), else silence, as 20 ms frames paced to real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._upsampler = StreamResampler(SAMPLE_RATE, RTC_RATE)
        self._pending = np.zeros(0, np.int16)
        self._queued = 0  # 48 kHz samples ever queued
        self._sent = 0  # 48 kHz samples ever handed to the encoder
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._pts = 0
        self._t0: float | None = None

    async def push(self, pcm24: np.ndarray) -> None:
        """Queue audio; returns once the frame holding its last sample has been sent."""
        pcm = self._upsampler.process(pcm24)
        self._pending = np.concatenate([self._pending, pcm])
        self._queued += len(pcm)
        if self._sent >= self._queued:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((self._queued, future))
        await future

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.monotonic()
        delay = self._t0 + self._pts / RTC_RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        samples = np.zeros(FRAME, np.int16)
        chunk, self._pending = self._pending[:FRAME], self._pending[FRAME:]
        samples[: len(chunk)] = chunk
        self._sent += len(chunk)
        still = []
        for mark, future in self._waiters:
            if mark <= self._sent:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((mark, future))
        self._waiters = still
        frame = voice_frame(samples, self._pts)
        self._pts += FRAME
        return frame


class WebRTCLink:
    """One WebRTC call, as :class:`streaming.bench.users.Link`."""

    audio_on_track = True

    def __init__(self, pc: RTCPeerConnection, channel: Any, mic: MicTrack) -> None:
        self.pc, self.channel, self.mic = pc, channel, mic
        self._events: asyncio.Queue = asyncio.Queue()
        self._response_id: str | None = None
        self._reader: asyncio.Task | None = None
        self.frames = 0

    @classmethod
    async def open(cls, url: str, api_key: str | None = None, timeout: float = 30.0) -> WebRTCLink:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates: no STUN wait
        channel = pc.createDataChannel(EVENTS_CHANNEL)
        mic = MicTrack()
        pc.addTrack(mic)
        link = cls(pc, channel, mic)
        opened = asyncio.Event()
        channel.on("open", opened.set)
        channel.on("message", link._on_message)
        pc.on("track", link._on_track)
        await pc.setLocalDescription(await pc.createOffer())
        try:
            answer = await asyncio.to_thread(_post_offer, calls_url(url), pc.localDescription.sdp, api_key, timeout)
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            try:
                await asyncio.wait_for(opened.wait(), timeout)
            except TimeoutError:
                raise BenchError(f"the {EVENTS_CHANNEL!r} data channel did not open within {timeout:.0f} s "
                                 "(ICE or DTLS failed)") from None
        except BaseException:
            await pc.close()
            raise
        return link

    def _on_message(self, message: str | bytes) -> None:
        event = json.loads(message)
        if event.get("type") == "response.created":
            self._response_id = event["response"]["id"]
        self._events.put_nowait((time.perf_counter(), event))

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._reader = asyncio.ensure_future(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self.frames += 1
                if self._response_id is None or int(np.abs(frame.to_ndarray()).max()) < AUDIO_PEAK:
                    continue
                samples = frame.samples * SAMPLE_RATE // frame.sample_rate  # as 24 kHz samples
                self._events.put_nowait((time.perf_counter(), {"type": "response.output_audio.delta",
                                                               "response_id": self._response_id,
                                                               "samples": samples}))

    async def send_event(self, event: dict) -> None:
        if self.channel.readyState != "open":
            raise BenchError("the WebRTC data channel is not open")
        self.channel.send(json.dumps(event))

    async def send_audio(self, pcm: np.ndarray) -> None:
        await self.mic.push(pcm)

    async def events(self) -> Any:
        while True:
            item = await self._events.get()
            if item is None:
                return
            yield item

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.mic.stop()
        await self.pc.close()
        self._events.put_nowait(None)


def calls_url(url: str) -> str:
    """``ws://host:port/v1/realtime`` (or http) -> ``http://host:port/v1/realtime/calls``."""
    base = url.replace("wss://", "https://").replace("ws://", "http://").split("/v1/")[0].split("?")[0]
    return base.rstrip("/") + CALLS_PATH


def _post_offer(url: str, sdp: str, api_key: str | None, timeout: float) -> str:
    request = urllib.request.Request(url, data=sdp.encode(), method="POST",
                                     headers={"Content-Type": "application/sdp"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")[:300]
        raise BenchError(f"the server refused the WebRTC call ({exc.code}): {body}") from None
    except OSError as exc:
        raise BenchError(f"cannot reach {url}: {exc}") from None
