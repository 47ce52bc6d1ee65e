"""The bridge between one sans-I/O :class:`RealtimeSession` and the engine.

It runs on the event loop and does no model work: session actions become engine jobs, engine
events (delivered on the engine thread) are handed to the loop with ``call_soon_threadsafe`` and
fed back into the session, and the session's server events go to the transport's
:class:`~streaming.outbox.Outbox` (a response's events on its response stream, the rest as control
events). An event that does not fit in the outbox ends the session with an ``error`` saying why
(``send_queue_full``): nothing is dropped from a session that stays open. Transports (WebSocket,
WebRTC) stay thin: they feed client messages and audio in with :meth:`SessionBridge.receive` /
:meth:`push_audio`, call :meth:`tick` periodically, and send what the outbox yields after
:meth:`before_send`.

Per response it keeps the clocks the benchmark reads: ``requested_at`` (the commit, or the
``response.create``) and the moment the first audio delta actually left (the outbox paces audio),
so ``response.done`` carries ``server_first_audio_ms`` beside the engine's stage timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streaming import actions as act
from streaming import protocol as p
from streaming.audio import pcm16_to_float32
from streaming.outbox import Outbox, OutboxFull
from streaming.session import RealtimeSession, SessionStateError

log = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
DEFAULT_MAX_OUTPUT_PATCHES = 1024  # 164 s of speech: the engine's own cap for "inf"
MAX_DELTA_SAMPLES = 4800  # 200 ms: larger engine chunks go out as several audio deltas


@dataclass
class _Clock:
    requested_at: float
    first_audio_sent: float | None = None


@dataclass
class BridgeStats:
    audio_deltas_sent: int = 0
    responses: int = 0
    first_audio_ms: list[float] = field(default_factory=list)


class SessionBridge:
    """One session's glue: see the module docstring."""

    def __init__(
        self,
        engine: Any,
        session: RealtimeSession,
        outbox: Outbox,
        *,
        loop: asyncio.AbstractEventLoop,
        metrics: Any = None,
        on_close: Callable[[str], None] | None = None,
        audio_sink: Callable[[str, np.ndarray], None] | None = None,
        flush_sink: Callable[[], dict[str, int]] | None = None,
        codec_schedule: Callable[[Any], Any] | None = None,
        turn_scorer: Any = None,
    ) -> None:
        self.engine = engine
        self.session = session
        self.outbox = outbox
        self.loop = loop
        self.metrics = metrics
        self.on_close = on_close
        self.audio_sink = audio_sink  # WebRTC: response audio goes to the media track
        self.flush_sink = flush_sink  # WebRTC: an interrupt clears the track's buffer
        self.codec_schedule = codec_schedule  # protocol CodecSchedule -> the codec's schedule
        self.turn_scorer = turn_scorer  # streaming.turn_model.TurnScorer: semantic_vad's model, off the loop
        self.handle = None
        self.closed = False
        self.stats = BridgeStats()
        self._clocks: dict[str, _Clock] = {}
        self._instructions: str | None = None
        self._response_items: dict[str, str] = {}  # assistant item -> the response generating it
        self._last_created: str | None = None

    # --------------------------------------------------------------------------------- lifecycle
    def open(self) -> None:
        """Claim an engine slot; raises ``ServerBusy`` when none is free. What a session started
        before (a WebRTC call validated at its offer, connected later) goes out now."""
        self.handle = self.engine.open_session(self._on_engine_event_threadsafe)
        self.pump()

    def start(self, config: dict | None = None, *, model: str | None = None) -> None:
        """Start the session (``session.created``); raises ``ValidationError`` for settings it
        refuses. Without a slot yet, its events and actions wait for :meth:`open`."""
        self.session.start(config, model=model)
        if self.handle is not None:
            self.pump()

    def close(self, reason: str = "closed") -> None:
        """The connection is gone: cancel what runs and free the slot (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.session.close(reason)
        self.session.take_events()
        self.session.take_actions()
        if self.handle is not None:
            self.handle.close()
        self.outbox.close()

    # ------------------------------------------------------------------------------------ input
    def receive(self, message: str | bytes) -> None:
        self.session.receive(message)
        self.pump()

    def push_audio(self, pcm16: np.ndarray) -> None:
        self.session.push_audio(pcm16)
        self.pump()

    def tick(self) -> None:
        self.session.tick()
        self.pump()

    # ------------------------------------------------------------------------------------- pump
    def pump(self) -> None:
        """Move the session's events to the outbox and its actions to the engine."""
        while True:
            events = self.session.take_events()
            actions = self.session.take_actions()
            if not events and not actions:
                return
            for event in events:
                self._send(event)
            for action in actions:
                try:
                    self._apply(action)
                except Exception as exc:  # the engine refused (overloaded, closed): tell the client
                    log.warning("action %s failed: %s", type(action).__name__, exc)
                    self._send(p.ErrorEvent(error=p.ErrorDetail(
                        type="server_error", code="engine_unavailable", message=str(exc))))

    def _send(self, event: Any, audio_s: float = 0.0) -> None:
        if self.closed:
            return
        if isinstance(event, p.ErrorEvent) and self.metrics is not None:
            self.metrics.client_errors.labels(event.error.code or "unknown").inc()
        try:
            self.outbox.put(event, audio_s=audio_s, response_id=self._response_of(event))
        except OutboxFull as exc:
            self._overflow(exc)

    def _response_of(self, event: Any) -> str | None:
        """The response ``event`` belongs to (its place on the outbox's response stream), if any."""
        response_id = getattr(event, "response_id", None)
        if response_id is not None:
            return response_id
        if isinstance(event, p.ResponseCreated | p.ResponseDone):
            if isinstance(event, p.ResponseDone):  # its item's events are all out
                rid = event.response.id
                self._response_items = {i: r for i, r in self._response_items.items() if r != rid}
            else:
                self._last_created = event.response.id
            return event.response.id
        if isinstance(event, p.RateLimitsUpdated):  # follows its response.created
            return self._last_created
        if isinstance(event, p.ConversationItemAdded | p.ConversationItemDone | p.ConversationItemCreated):
            return self._response_items.get(event.item.id)
        return None

    def _overflow(self, exc: OutboxFull) -> None:
        """The client stopped reading: end the session, with the reason as its last event."""
        log.warning("closing a session whose client stopped reading: %s", exc)
        if self.metrics is not None:
            self.metrics.client_errors.labels(p.ErrorCode.SEND_QUEUE_FULL.value).inc()
        self.outbox.fail(p.ErrorEvent(error=p.ErrorDetail(
            type="invalid_request_error", code=p.ErrorCode.SEND_QUEUE_FULL.value,
            message=f"The session was closed: {exc}.")))
        self.close(p.ErrorCode.SEND_QUEUE_FULL.value)

    def _apply(self, a: act.Action) -> None:
        from agent import engine as eng  # the bridge itself must import without torch

        submit = self.handle.submit
        if isinstance(a, act.AppendUserAudio):
            submit(eng.AddUserAudio(a.item_id, pcm16_to_float32(a.pcm), transcribe=a.transcribe, after=a.after))
        elif isinstance(a, act.StreamUserAudio):
            submit(eng.StreamUserAudio(a.item_id, pcm16_to_float32(a.pcm)))
        elif isinstance(a, act.AppendUserText):
            submit(eng.AddUserText(a.item_id, a.text, after=a.after))
        elif isinstance(a, act.AppendSystemText):
            submit(eng.AddSystemText(a.item_id, a.text, after=a.after))
        elif isinstance(a, act.AppendAssistantText):
            submit(eng.AddAssistantText(a.item_id, a.text, after=a.after))
        elif isinstance(a, act.CreateResponse):
            self._response_items[a.item_id] = a.response_id
            now = time.perf_counter()
            self._clocks[a.response_id] = _Clock(requested_at=now)
            self._configure(a.params.instructions)
            submit(eng.Respond(a.response_id, a.item_id, self._response_params(a.params), requested_at=now))
        elif isinstance(a, act.Speculate):
            self._configure(a.params.instructions)
            try:
                submit(eng.Speculate(a.item_id, a.samples, self._response_params(a.params), end_in_s=a.end_in_s,
                                     ends_early=a.ends_early))
            except eng.EngineOverloaded:  # a speculation is optional, and invisible: no error for it
                log.debug("no speculation: the engine's job queue is full")
        elif isinstance(a, act.AbandonSpeculation):
            submit(eng.Abandon(a.item_id))
        elif isinstance(a, act.ScoreTurn):
            self._score_turn(a)
        elif isinstance(a, act.CancelResponse):
            submit(eng.Cancel(a.response_id, a.reason))
        elif isinstance(a, act.TruncateItem):
            submit(eng.Truncate(a.item_id, a.audio_end_ms))
        elif isinstance(a, act.DeleteItem):
            submit(eng.DeleteItem(a.item_id))
        elif isinstance(a, act.FlushOutputAudio):
            self.outbox.flush_audio(a.response_id)
            if a.cancelled is not None and a.response_id is not None:
                self.outbox.rewrite(a.response_id, lambda event: _cancelled(event, a.cancelled))
            if self.flush_sink is not None:
                played = self.flush_sink()  # WebRTC: {response: samples played} of what it cut short
                for response_id, samples in played.items() if a.cut else ():
                    self.session.output_audio_cut(response_id, samples)
        elif isinstance(a, act.UpdateSession):
            self._configure(a.config.instructions)
            if a.voice_prompt is not None:
                if len(a.voice_prompt):
                    submit(eng.Configure(voice_pcm=pcm16_to_float32(a.voice_prompt)))
                else:
                    submit(eng.Configure(clear_voice=True))
        elif isinstance(a, act.Close):
            self.outbox.close()
            if self.on_close is not None:
                self.on_close(a.reason)

    def _configure(self, instructions: str | None) -> None:
        """The engine's instructions follow the session's (sent only when they change)."""
        from agent import engine as eng

        if instructions != self._instructions:
            self._instructions = instructions
            self.handle.submit(eng.Configure(instructions=instructions))

    def _response_params(self, params: act.ResponseParams) -> Any:
        from agent import engine as eng
        from agent.lm.sampling import ChannelSampling

        limit = params.max_output_tokens
        max_patches = DEFAULT_MAX_OUTPUT_PATCHES if limit is None else max(1, min(limit, DEFAULT_MAX_OUTPUT_PATCHES))
        schedule = None
        if params.audio and self.codec_schedule is not None:
            schedule = self.codec_schedule(params.codec)
        return eng.ResponseParams(
            audio=params.audio,
            max_output_patches=max_patches,
            sampling=ChannelSampling(model_sampling(params.text_sampling), model_sampling(params.speech_sampling)),
            interleave=params.interleave,
            min_patches=min(params.min_output_tokens, max_patches),
            in_conversation=params.conversation == "auto",
            codec_schedule=schedule,
        )

    def _score_turn(self, a: act.ScoreTurn) -> None:
        """The end-of-turn model runs on the scorer's thread; its answer comes back to the loop.
        Whatever happens, the session gets an answer (None on failure: its silence window decides),
        so its turn detection never waits for good."""
        if self.turn_scorer is None:
            from streaming.turn_model import default_scorer

            self.turn_scorer = default_scorer()
        try:
            future = self.turn_scorer.score(a.audio16k)
        except Exception:  # the scorer is shut down (the server is stopping)
            log.exception("end-of-turn model call refused")
            self._turn_scored(a.request_id, None)
            return

        def done(f: Any) -> None:  # on the scorer's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                self.loop.call_soon_threadsafe(self._turn_scored_future, a.request_id, f)
        future.add_done_callback(done)

    def _turn_scored_future(self, request_id: int, future: Any) -> None:
        try:
            probability = float(future.result())
        except Exception:
            log.exception("end-of-turn model call failed; the silence window decides")
            probability = None
        self._turn_scored(request_id, probability)

    def _turn_scored(self, request_id: int, probability: float | None) -> None:
        if self.closed:
            return
        self.session.turn_scored(request_id, probability)
        self.pump()

    # ------------------------------------------------------------------------- engine feedback
    def _on_engine_event_threadsafe(self, event: Any) -> None:
        """Called on the engine thread."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(self._on_engine_event, event)

    def _on_engine_event(self, ev: Any) -> None:
        from agent import engine as eng

        if self.closed:
            return
        s = self.session
        try:
            if isinstance(ev, eng.ResponseStarted):
                s.response_started(ev.response_id)
            elif isinstance(ev, eng.TextDelta):
                s.response_text(ev.response_id, ev.text)
            elif isinstance(ev, eng.AudioDelta):
                self._audio(ev)
            elif isinstance(ev, eng.ResponseDone):
                s.response_done(ev.response_id, ev.status, ev.reason, ev.usage, ev.timings)
                self.stats.responses += 1
                if self.metrics is not None:
                    self.metrics.responses.labels(ev.status).inc()
            elif isinstance(ev, eng.EngineError):
                if ev.response_id is not None:
                    s.response_failed(ev.response_id, ev.message)
                else:
                    self._send(p.ErrorEvent(error=p.ErrorDetail(
                        type="server_error" if ev.code == "session_failed" else "invalid_request_error",
                        code=ev.code, message=ev.message)))
            elif isinstance(ev, eng.TranscriptionDelta):
                s.transcription_delta(ev.item_id, ev.text)
            elif isinstance(ev, eng.TranscriptionDone):
                s.transcription_done(ev.item_id, ev.transcript)
            elif isinstance(ev, eng.TranscriptionFailed):
                s.transcription_failed(ev.item_id, ev.message)
            elif isinstance(ev, eng.ItemsDropped):
                for item_id in ev.item_ids:
                    s.drop_item(item_id)
        except Exception:
            log.exception("session feedback for %s failed", type(ev).__name__)
        self.pump()

    def _audio(self, ev: Any) -> None:
        pcm = np.clip(np.rint(ev.pcm * 32768.0), -32768, 32767).astype(np.int16)
        if self.audio_sink is not None:  # WebRTC: the track carries it, the session accounts it
            if not self.session.response_audio(ev.response_id, pcm):
                return  # late audio of a cancelled response: it must not reach the track
            self.audio_sink(ev.response_id, pcm)
            clock = self._clocks.get(ev.response_id)
            if clock is not None and clock.first_audio_sent is None:
                clock.first_audio_sent = time.perf_counter()
            return
        # the engine may decode several patches in one codec pass; the client gets them as deltas of
        # at most MAX_DELTA_SAMPLES, so the outbox's pacing (and what a barge-in must flush) stays fine
        for piece in np.array_split(pcm, -(-len(pcm) // MAX_DELTA_SAMPLES)) if len(pcm) else [pcm]:
            self.session.response_audio(ev.response_id, piece)
            for event in self.session.take_events():
                audio_s = len(piece) / SAMPLE_RATE if isinstance(event, p.ResponseOutputAudioDelta) else 0.0
                self._send(event, audio_s)

    def output_audio_drained(self, response_id: str) -> None:
        """WebRTC: the media track played the last sample of ``response_id``; the session emits
        ``output_audio_buffer.stopped``. Responses the session already forgot are ignored."""
        if self.closed:
            return
        try:
            self.session.output_audio_drained(response_id)
        except SessionStateError:
            return
        self.pump()

    # ----------------------------------------------------------------------------------- output
    def before_send(self, event: Any) -> None:
        """Called by the transport right before an event leaves: stamps the send-time clocks."""
        if isinstance(event, p.ResponseOutputAudioDelta):
            self.stats.audio_deltas_sent += 1
            clock = self._clocks.get(event.response_id)
            if clock is not None and clock.first_audio_sent is None:
                clock.first_audio_sent = time.perf_counter()
        elif isinstance(event, p.ResponseDone):
            rid = event.response.id
            clock = self._clocks.pop(rid, None)
            if clock is None or clock.first_audio_sent is None:
                return
            ms = (clock.first_audio_sent - clock.requested_at) * 1000
            self.stats.first_audio_ms.append(ms)
            if self.metrics is not None:
                self.metrics.first_audio_seconds.observe(ms / 1000)
            mimo = event.response.mimo
            if mimo is not None:
                mimo.timings = {**(mimo.timings or {}), "server_first_audio_ms": round(ms, 3)}


def _cancelled(event: Any, reason: str) -> Any:
    """A queued event of a response cancelled for ``reason`` while it played, as a cancelled
    response's: ``response.done`` says cancelled, its item (there and in the item events) incomplete."""
    def incomplete(item: Any) -> Any:
        return item.model_copy(update={"status": "incomplete"})

    if isinstance(event, p.ResponseOutputItemDone | p.ConversationItemDone):
        return event.model_copy(update={"item": incomplete(event.item)})
    if not isinstance(event, p.ResponseDone):
        return event
    details = p.ResponseStatusDetails(type="cancelled", reason=reason)
    output = [incomplete(item) for item in event.response.output or []]
    return event.model_copy(update={"response": event.response.model_copy(
        update={"status": "cancelled", "status_details": details, "output": output})})


def model_sampling(params: Any) -> Any:
    """Protocol sampling (temperature 0 or None: greedy) -> the model's SamplingParams."""
    from agent.lm.sampling import GREEDY, SamplingParams

    if params is None or not params.temperature:
        return GREEDY
    return SamplingParams(temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p or 1.0)
