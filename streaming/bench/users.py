"""Simulated users: each streams a recorded utterance to the server in real time, turn after turn,
and stamps every event that matters for latency with the client's clock.

A user is a microphone (:class:`Mic`, chunks of ``chunk_ms`` sent against an absolute clock; in
server-VAD mode it keeps sending silence between utterances, as an open microphone does) and a
reader of the server's events. The reader is deliberately plain (``json.loads``, no models) so the
client spends little of the CPU it shares with a spawned server. Transports implement
:class:`Link`: WebSocket here; WebRTC in :mod:`streaming.bench.webrtc` (its agent audio arrives on
a media track and is reported as ``response.output_audio.delta`` events with a sample count).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from streaming.audio import SAMPLE_RATE, read_wav, resample
from streaming.bench.stats import TurnRecord

DEFAULT_AUDIO = Path(__file__).resolve().parents[1] / "data" / "speech_hello_padded.wav"
SPEECH_FLOOR_DBFS = -45.0  # 10 ms frames above this (and within 40 dB of the loudest) are speech
RESPONSE_TIMEOUT_S = 60.0


class BenchError(RuntimeError):
    """The benchmark cannot run as asked (bad input, server refused, transport missing)."""


# ------------------------------------------------------------------------------------ utterance
@dataclass(frozen=True)
class Utterance:
    """A recording at 24 kHz and where its speech lies (found by frame energy)."""

    pcm: np.ndarray  # int16 mono 24 kHz
    speech_start: int  # first speech sample
    speech_end: int  # one past the last speech sample
    path: str

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / SAMPLE_RATE

    @property
    def speech_s(self) -> float:
        return (self.speech_end - self.speech_start) / SAMPLE_RATE


def load_utterance(path: str | Path | None = None) -> Utterance:
    """A WAV file (16-bit PCM, any rate, channels averaged) as an :class:`Utterance`."""
    path = Path(path) if path else DEFAULT_AUDIO
    if not path.is_file():
        raise BenchError(f"--audio {path}: no such file")
    try:
        pcm, rate = read_wav(path)
    except Exception as exc:
        raise BenchError(f"--audio {path}: not a 16-bit PCM WAV file ({exc})") from None
    if rate != SAMPLE_RATE:
        pcm = resample(pcm, rate, SAMPLE_RATE)
    frame = SAMPLE_RATE // 100
    n = len(pcm) // frame
    if n == 0:
        raise BenchError(f"--audio {path}: shorter than 10 ms")
    x = pcm[: n * frame].astype(np.float32).reshape(n, frame) / 32768.0  # (frames, 240)
    db = 10 * np.log10(np.mean(x * x, axis=1) + 1e-12)
    voiced = np.flatnonzero(db > max(SPEECH_FLOOR_DBFS, db.max() - 40.0))
    if voiced.size == 0:
        raise BenchError(f"--audio {path}: no speech found (every 10 ms frame is below {SPEECH_FLOOR_DBFS} dBFS)")
    return Utterance(pcm, int(voiced[0] * frame), int(min(len(pcm), (voiced[-1] + 1) * frame)), str(path))


# ----------------------------------------------------------------------------------------- link
class Link(Protocol):
    """One session's transport, as the simulated user sees it."""

    async def send_event(self, event: dict) -> None: ...
    async def send_audio(self, pcm: np.ndarray) -> None: ...  # int16 24 kHz
    async def events(self) -> Any: ...  # async iterator of (arrival perf_counter, event dict)
    async def close(self) -> None: ...


class WebSocketLink:
    """The Realtime protocol over a WebSocket: audio as base64 ``input_audio_buffer.append``."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, url: str, api_key: str | None = None, timeout: float = 30.0) -> WebSocketLink:
        from websockets.asyncio.client import connect

        from streaming.client import auth_options, realtime_url

        ws = await connect(realtime_url(url), open_timeout=timeout, max_size=2**24, compression=None,
                           **auth_options(api_key, "header"))
        return cls(ws)

    async def send_event(self, event: dict) -> None:
        await self.ws.send(json.dumps(event))

    async def send_audio(self, pcm: np.ndarray) -> None:
        audio = base64.b64encode(pcm.astype("<i2").tobytes()).decode()
        await self.ws.send('{"type":"input_audio_buffer.append","audio":"' + audio + '"}')

    async def events(self) -> Any:
        async for message in self.ws:
            yield time.perf_counter(), json.loads(message)

    async def close(self) -> None:
        await self.ws.close()


def b64_samples(delta: str) -> int:
    """pcm16 samples in a base64 payload, without decoding it."""
    return ((len(delta) * 3) // 4 - delta[-2:].count("=")) // 2


# ------------------------------------------------------------------------------------------ user
@dataclass(frozen=True)
class UserPlan:
    """What every simulated user does."""

    turns: int
    warmup: int
    commit: str = "vad"  # vad | manual
    chunk_ms: int = 20
    gap_s: tuple[float, float] = (0.5, 1.5)  # think time after the response has played, uniform
    max_output_tokens: int | None = None
    min_output_tokens: int | None = None
    timeout_s: float = RESPONSE_TIMEOUT_S


class SimulatedUser:
    """One session: see the module docstring. :meth:`run` returns one record per turn."""

    def __init__(self, link: Link, utterance: Utterance, plan: UserPlan, *, level: int, index: int,
                 epoch: float, label: str = "", seed: int = 0,
                 on_turn: Callable[[TurnRecord], None] | None = None) -> None:
        self.link = link
        self.utt = utterance
        self.plan = plan
        self.level, self.index, self.epoch, self.label = level, index, epoch, label
        self.rng = random.Random(seed * 7919 + index)
        self.on_turn = on_turn
        self.records: list[TurnRecord] = []
        self._turn: TurnRecord | None = None
        self._response_id: str | None = None
        self._done = asyncio.Event()
        self._errors: list[str] = []
        self._configured: asyncio.Future | None = None

    def now(self) -> float:
        return time.perf_counter() - self.epoch

    async def run(self, start_delay_s: float = 0.0) -> list[TurnRecord]:
        self._configured = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(self._read())
        mic = Mic(self.link, self.plan.chunk_ms, self.now, open_mic=self.plan.commit == "vad")
        mic_task: asyncio.Task | None = None
        try:
            await self._configure()
            mic_task = asyncio.create_task(mic.run())
            await asyncio.sleep(start_delay_s)
            for k in range(self.plan.warmup + self.plan.turns):
                rec = TurnRecord(level=self.level, session=self.index, turn=k, warmup=k < self.plan.warmup,
                                 label=self.label)
                self.records.append(rec)
                await self._turn_once(rec, mic)
                if self.on_turn is not None:
                    self.on_turn(rec)
                if reader.done():  # the connection is gone: the remaining turns cannot run
                    break
        finally:
            mic.stop()
            for task in (mic_task, reader):
                if task is None:
                    continue
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for k in range(len(self.records), self.plan.warmup + self.plan.turns):  # every turn accounted for
            self.records.append(TurnRecord(level=self.level, session=self.index, turn=k, warmup=k < self.plan.warmup,
                                           label=self.label, status="error", error="connection closed"))
        return self.records

    async def _configure(self) -> None:
        td = {"type": "server_vad"} if self.plan.commit == "vad" else None
        session: dict[str, Any] = {"type": "realtime", "audio": {"input": {"turn_detection": td}}}
        if self.plan.max_output_tokens is not None:
            session["max_output_tokens"] = self.plan.max_output_tokens
        if self.plan.min_output_tokens is not None:
            session["mimo"] = {"min_output_tokens": self.plan.min_output_tokens}
        await self.link.send_event({"type": "session.update", "session": session})
        try:
            answer = await asyncio.wait_for(self._configured, 30.0)
        except TimeoutError:
            raise BenchError("the server did not answer session.update within 30 s") from None
        if answer.get("type") == "error":
            err = answer.get("error") or {}
            raise BenchError(f"the server refused the session settings: {err.get('code')}: {err.get('message')}")

    async def _turn_once(self, rec: TurnRecord, mic: Mic) -> None:
        self._turn, self._response_id = rec, None
        self._done.clear()
        utt = self.utt
        pcm = utt.pcm if self.plan.commit == "vad" else utt.pcm[: utt.speech_end]  # push-to-talk: release at once
        sent = mic.say(pcm, utt.speech_end, rec)
        if self.plan.commit == "manual":
            await sent
            await self.link.send_event({"type": "input_audio_buffer.commit"})
            rec.t_commit = self.now()
            await self.link.send_event({"type": "response.create"})
        try:
            await asyncio.wait_for(self._done.wait(), self.plan.timeout_s + utt.duration_s)
        except TimeoutError:
            rec.status = "timeout"
            rec.error = f"no response.done within {self.plan.timeout_s:.0f} s of the utterance{self._error_note()}"
        if rec.t_turn_start is None:
            await sent
        # the user listens to the answer, then thinks a little before the next turn
        play_end = rec.continuity.play_end
        wait = (play_end - self.now()) if play_end is not None else 0.0
        await asyncio.sleep(max(0.0, wait) + self.rng.uniform(*self.plan.gap_s))

    # ---------------------------------------------------------------------------------- events
    async def _read(self) -> None:
        try:
            async for arrival, event in self.link.events():
                self._on_event(arrival - self.epoch, event)
        finally:
            self._done.set()
            if self._configured is not None and not self._configured.done():
                self._configured.set_exception(BenchError("the server closed the connection before the session "
                                                          f"was configured{self._error_note()}"))

    def _error_note(self) -> str:
        return f" (server errors: {'; '.join(self._errors[-3:])})" if self._errors else ""

    def _on_event(self, t: float, event: dict) -> None:
        kind = event.get("type")
        rec = self._turn
        if self._configured is not None and not self._configured.done() and kind in ("session.updated", "error"):
            self._configured.set_result(event)
        if kind == "error":
            err = event.get("error") or {}
            self._errors.append(f"{err.get('code')}: {err.get('message')}")
            return
        if rec is None:
            return
        if kind == "input_audio_buffer.speech_started" and rec.t_speech_end is None:
            rec.t_speech_started = t
        elif kind == "input_audio_buffer.speech_stopped" and rec.t_speech_end is not None:
            if rec.t_speech_stopped is None:
                rec.t_speech_stopped = t
                rec.t_commit = t
        elif kind == "response.created":
            if rec.t_commit is None:  # a spurious VAD turn inside the utterance
                rec.extra_responses += 1
            elif self._response_id is None:
                self._response_id = event["response"]["id"]
                rec.t_response_created = t
        elif kind == "response.output_audio.delta" and event.get("response_id") == self._response_id:
            n = event["samples"] if "samples" in event else b64_samples(event["delta"])  # WebRTC: frames
            if rec.t_first_audio is None:
                rec.t_first_audio = t
            rec.t_last_audio = t
            rec.audio_samples += n
            rec.audio_chunks.append((t, n))
        elif kind == "response.done" and event["response"]["id"] == self._response_id:
            resp = event["response"]
            rec.t_done = t
            rec.status = resp.get("status") or "completed"
            details = resp.get("status_details") or {}
            if rec.status not in ("completed", "incomplete"):
                rec.error = f"response {rec.status}: {details.get('reason') or details.get('error')}"
            rec.server_timings = dict(((resp.get("mimo") or {}).get("timings")) or {})
            # over WebRTC the audio is still playing out on the track: the turn ends when it has (a
            # response whose audio was all ready at once, a released speculation, may be done before
            # its first frame arrived: whether it has audio is in response.done)
            if not getattr(self.link, "audio_on_track", False) or not (resp.get("mimo") or {}).get("audio_ms"):
                self._done.set()
        elif kind == "output_audio_buffer.stopped" and event.get("response_id") == self._response_id:
            self._done.set()


class Mic:
    """Sends ``chunk_ms`` of audio per tick against an absolute clock (a late tick catches up at
    once, as a capture buffer would). Between utterances it sends silence if ``open_mic``."""

    def __init__(self, link: Link, chunk_ms: int, now: Callable[[], float], *, open_mic: bool) -> None:
        self.link = link
        self.step = SAMPLE_RATE * chunk_ms // 1000
        self.chunk_s = self.step / SAMPLE_RATE
        self.now = now
        self.open_mic = open_mic
        self._pcm: np.ndarray | None = None
        self._pos = 0
        self._speech_end = 0
        self._rec: TurnRecord | None = None
        self._sent: asyncio.Future | None = None
        self._wake = asyncio.Event()
        self._running = True
        self._silence = np.zeros(self.step, np.int16)
        self.sent = 0  # samples sent so far: the server's input clock (audio_start_ms / audio_end_ms)
        self.utterance_at = 0  # the sample at which the current utterance began, on that clock

    def say(self, pcm: np.ndarray, speech_end: int, rec: TurnRecord) -> asyncio.Future:
        """Queue an utterance; the future resolves once its last chunk is sent."""
        self._pcm, self._pos, self._speech_end, self._rec = pcm, 0, speech_end, rec
        self._sent = asyncio.get_running_loop().create_future()
        self._wake.set()
        return self._sent

    def stop(self) -> None:
        self._running = False
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        t0, k = loop.time(), 0
        while self._running:
            if self._pcm is None and not self.open_mic:  # push-to-talk: nothing to send until the next turn
                self._wake.clear()
                await self._wake.wait()
                t0, k = loop.time(), 0
                continue
            k += 1
            delay = t0 + k * self.chunk_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._pcm is None:
                await self.link.send_audio(self._silence)
                self.sent += len(self._silence)
                continue
            chunk = self._pcm[self._pos : self._pos + self.step]
            start, self._pos = self._pos, self._pos + len(chunk)
            rec = self._rec
            await self.link.send_audio(chunk)
            now = self.now()
            if start == 0:
                rec.t_turn_start, self.utterance_at = now, self.sent
            self.sent += len(chunk)
            if start < self._speech_end <= self._pos:
                rec.t_speech_end = now
            if self._pos >= len(self._pcm):
                self._pcm = None
                if not self._sent.done():
                    self._sent.set_result(None)
