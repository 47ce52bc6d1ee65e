"""A session's outgoing events: response audio paced to real time, everything else at once.

Audio deltas leave no earlier than ``lead_s`` before the moment the client would play them if it
started playing the response's first delta on arrival: the client never holds more than a small
lead of unplayed audio, so an interrupt only needs the response's queued audio dropped
(:meth:`Outbox.flush_audio`; Pipecat does the same for WebSocket output).

Two queues keep the orders clients rely on without holding control events behind the pacing
clock:

* the response stream: every event of a response (``response.*``, ``output_audio_buffer.*``, the
  assistant item's ``conversation.item.added`` / ``.done``), in order, audio paced. A response's
  ``response.output_audio.done`` and ``response.done`` follow its last delta; transcript deltas
  travel alongside their audio; the next response's ``response.created`` follows the previous
  ``response.done``.
* control: everything else (``session.updated``, ``error``, ``input_audio_buffer.*``,
  ``conversation.item.truncated`` ...), sent as soon as the socket takes it, in order.

Between the two, events leave in the order they were queued whenever both are ready: a control
event only overtakes response events that wait for the pacing clock.

The queue is bounded in bytes (``max_bytes``, the serialized size of the events waiting): a client
that stops reading fills it and :meth:`put` raises :class:`OutboxFull`; the bridge then ends the
session with :meth:`fail` (an ``error`` saying why, then the close) rather than buffer without
limit or drop an event and carry on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_LEAD_S = 0.3
DEFAULT_MAX_BYTES = 32 * 2**20  # above the largest single event: a retrieve of a 16 MiB audio item
GOODBYE_S = 10.0  # how long a session that ended may take to send its last events


class OutboxFull(RuntimeError):
    """The client is not reading its events."""


@dataclass
class _Entry:
    seq: int
    event: Any
    nbytes: int
    audio_s: float  # seconds of audio the event carries (0 for other events)
    response_id: str | None


class Outbox:
    """See the module docstring. ``put`` from the event loop; ``get`` from the send task."""

    def __init__(self, *, lead_s: float = DEFAULT_LEAD_S, max_bytes: int = DEFAULT_MAX_BYTES,
                 pace_audio: bool = True) -> None:
        self.lead_s = lead_s
        self.max_bytes = max_bytes
        self.pace_audio = pace_audio
        self._control: collections.deque[_Entry] = collections.deque()
        self._stream: collections.deque[_Entry] = collections.deque()
        self._seq = 0
        self.queued_bytes = 0
        self.peak_bytes = 0  # the most ever queued (the benchmark and tests read it)
        self._ready = asyncio.Event()
        self._ended = asyncio.Event()
        self._play_end = 0.0  # wall-clock (perf_counter) when the audio sent so far ends playing
        self._closed = False
        self.failed = False  # ended by fail(): the client did not read

    def __len__(self) -> int:
        return len(self._control) + len(self._stream)

    @property
    def queued_audio_s(self) -> float:
        """Seconds of response audio waiting to be sent."""
        return sum(e.audio_s for e in self._stream)

    def put(self, event: Any, *, audio_s: float = 0.0, response_id: str | None = None) -> None:
        """Queue ``event``; ``response_id`` puts it on the response stream. Raises
        :class:`OutboxFull` when it does not fit in ``max_bytes``."""
        if self._closed:
            return
        nbytes = len(event.to_json().encode())
        if self.queued_bytes + nbytes > self.max_bytes:
            raise OutboxFull(
                f"{self.queued_bytes + nbytes} bytes of events waiting to be sent, more than the session's "
                f"limit of {self.max_bytes} bytes: the client is not reading its events")
        self._seq += 1
        entry = _Entry(self._seq, event, nbytes, audio_s, response_id)
        (self._control if response_id is None else self._stream).append(entry)
        self.queued_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.queued_bytes)
        self._ready.set()

    def flush_audio(self, response_id: str | None = None) -> float:
        """Drop queued audio (of one response, or all); return how many seconds were dropped. The
        response's other events stay, and now leave at once."""
        kept: collections.deque[_Entry] = collections.deque()
        dropped = 0.0
        for e in self._stream:
            if e.audio_s > 0 and (response_id is None or e.response_id == response_id):
                dropped += e.audio_s
                self.queued_bytes -= e.nbytes
            else:
                kept.append(e)
        self._stream = kept
        # the client stops playing too (speech_started / output_audio_buffer.clear / cancel)
        self._play_end = min(self._play_end, time.perf_counter())
        self._ready.set()
        return dropped

    def rewrite(self, response_id: str, change: Callable[[Any], Any]) -> None:
        """Replace each event of ``response_id`` still queued by ``change(event)``."""
        for e in self._stream:
            if e.response_id == response_id:
                e.event = change(e.event)

    def fail(self, event: Any) -> None:
        """End the session because the client does not read: drop what waits, send ``event`` (the
        ``error`` saying why) as the last one."""
        self._control.clear()
        self._stream.clear()
        self._seq += 1
        self._control.append(_Entry(self._seq, event, 0, 0.0, None))
        self.queued_bytes = 0
        self.failed = True
        self.close()

    def close(self) -> None:
        self._closed = True
        self._ended.set()
        self._ready.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        await self._ended.wait()

    def _pop(self, queue: collections.deque[_Entry]) -> Any:
        entry = queue.popleft()
        self.queued_bytes -= entry.nbytes
        return entry.event

    async def get(self) -> Any | None:
        """The next event, when it is due; None once closed and drained."""
        while True:
            now = time.perf_counter()
            stream = self._stream[0] if self._stream else None
            wait_s = None
            paced = stream is not None and stream.audio_s > 0 and self.pace_audio
            if paced and self._play_end - self.lead_s > now:
                wait_s, stream = self._play_end - self.lead_s - now, None  # it waits for the clock
            control = self._control[0] if self._control else None
            if control is not None and (stream is None or control.seq < stream.seq):
                return self._pop(self._control)
            if stream is not None:
                if paced:
                    self._play_end = max(self._play_end, now) + stream.audio_s
                return self._pop(self._stream)
            if self._closed and not self._stream:
                return None
            self._ready.clear()
            with contextlib.suppress(TimeoutError):  # a put, flush or close may arrive meanwhile
                await asyncio.wait_for(self._ready.wait(), wait_s)


async def goodbye_deadline(outbox: Outbox, seconds: float = GOODBYE_S) -> None:
    """Returns ``seconds`` after the outbox closed: a transport runs it beside its send task, so a
    session that ended while its client does not read cannot hold the connection open forever."""
    await outbox.wait_closed()
    await asyncio.sleep(seconds)
