"""A session's outgoing events, in order, with response audio paced to real time.

Audio deltas leave no earlier than ``lead_s`` before the moment the client would play them if it
started playing the response's first delta on arrival: the client never holds more than a small
lead of unplayed audio, so barge-in only needs this queue flushed (Pipecat does the same for
WebSocket output). Other events wait behind earlier audio, which keeps the order of the stream
(``response.done`` after the last audio delta, transcript deltas alongside their audio).

The queue is bounded (``max_events``): a client that stops reading fills it, and the session is
closed rather than buffering without limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_LEAD_S = 0.3
DEFAULT_MAX_EVENTS = 4096


class OutboxFull(RuntimeError):
    """The client is not reading its events."""


@dataclass
class _Entry:
    event: Any
    audio_s: float  # seconds of audio the event carries (0 for other events)
    response_id: str | None


class Outbox:
    """See the module docstring. ``put`` from the event loop; ``get`` from the send task."""

    def __init__(self, *, lead_s: float = DEFAULT_LEAD_S, max_events: int = DEFAULT_MAX_EVENTS,
                 pace_audio: bool = True) -> None:
        self.lead_s = lead_s
        self.max_events = max_events
        self.pace_audio = pace_audio
        self._queue: collections.deque[_Entry] = collections.deque()
        self._ready = asyncio.Event()
        self._play_end = 0.0  # wall-clock (perf_counter) when the audio sent so far ends playing
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, event: Any, *, audio_s: float = 0.0, response_id: str | None = None) -> None:
        if self._closed:
            return
        if len(self._queue) >= self.max_events:
            raise OutboxFull(f"{self.max_events} events waiting: the client is not reading")
        self._queue.append(_Entry(event, audio_s, response_id))
        self._ready.set()

    def flush_audio(self, response_id: str | None = None) -> int:
        """Drop queued audio (of one response, or all); return how many seconds were dropped."""
        kept: collections.deque[_Entry] = collections.deque()
        dropped = 0.0
        for e in self._queue:
            if e.audio_s > 0 and (response_id is None or e.response_id == response_id):
                dropped += e.audio_s
            else:
                kept.append(e)
        self._queue = kept
        # the client stops playing too (speech_started / output_audio_buffer.clear)
        self._play_end = min(self._play_end, time.perf_counter())
        return dropped

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def get(self) -> Any | None:
        """The next event, when it is due; None once closed and drained."""
        while True:
            if self._queue:
                entry = self._queue[0]
                if entry.audio_s > 0 and self.pace_audio:
                    now = time.perf_counter()
                    due = self._play_end - self.lead_s
                    if due > now:
                        self._ready.clear()
                        with contextlib.suppress(TimeoutError):  # a flush or close may arrive meanwhile
                            await asyncio.wait_for(self._ready.wait(), due - now)
                        continue
                    self._play_end = max(self._play_end, now) + entry.audio_s
                self._queue.popleft()
                return entry.event
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
