"""The sans-I/O Realtime session: client messages and engine feedback in, server events and engine
actions out. No ``await``, no sockets, no threads; time comes from an injected clock.

Driving it (the transport and the engine bridge)::

    session = RealtimeSession(options, clock=time.monotonic)
    session.start(server_defaults)          # PENDING -> ACTIVE, emits session.created
    session.receive(text)                   # one client message (str or bytes)
    session.push_audio(pcm16_24k)           # audio from a media track (WebRTC), no JSON
    session.tick()                          # timers: session duration, idle timeout
    session.response_audio(rid, pcm)        # engine feedback (the methods under "engine feedback")
    for event in session.take_events(): send(event.to_json())
    for action in session.take_actions(): bridge.apply(action)   # streaming.actions

States. ``SessionState``: PENDING until the bridge calls :meth:`start` (which emits
``session.created``), ACTIVE, CLOSED after :meth:`close` or the duration limit. In PENDING,
``session.update`` messages are queued (bounded) and applied right after ``session.created``;
every other client event, and :meth:`push_audio`, is refused with ``session_not_ready`` (a bridge
that starts the session before reading the socket never sees this). In CLOSED, input is ignored.
Per response (``ResponseState``): IN_PROGRESS, then DONE. A cancel (``response.cancel``, a
barge-in, a truncate of the item being generated) finishes the response at once: ``response.done``
(``cancelled``) goes out with the ``CancelResponse`` and ``FlushOutputAudio`` actions, without
waiting for the engine, so a ``conversation.item.truncate`` or ``.delete`` right behind the cancel
acts on the finished item; later engine output for it is dropped and its own ``response_done``
ignored. One response at a time: ``response.create`` during another is refused
(``conversation_already_has_active_response``); a VAD turn that ends while a response is active
queues its response until that one is done.

Every refusal is an :class:`IllegalTransition` (well-formed but not allowed now) or another
:class:`ProtocolError`, raised inside the handler and sent as an ``error`` event; the session
carries on. Misuse by the bridge (feedback for a response id it was never given, audio for a
text-only response) raises :class:`SessionStateError`.

Server VAD runs on the input as it arrives (``streaming.input_audio``, ``streaming.vad``):
``speech_started`` (with the prefix padding; with ``interrupt_response`` it cancels the active
response, reason ``turn_detected``, and flushes output audio), ``speech_stopped``, then the speech
span is committed as a user item and, with ``create_response``, a response is created. Without
turn detection the client commits (``input_audio_buffer.commit``, at least 100 ms) and asks for
responses itself. The idle timeout (``idle_timeout_ms``) counts from the end of the last
response's playback (real-time playback from its first audio, or :meth:`output_audio_drained`).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from pydantic import ValidationError

from streaming import actions as act
from streaming import protocol as p
from streaming.audio import (
    AudioFormatError,
    BufferFullError,
    InvalidBase64Error,
    WireAudioDecoder,
    as_pcm16,
    b64decode_audio,
)
from streaming.config import canonical_session, default_session_config, fully_set, resolve_response_params
from streaming.conversation import AT_START, Conversation, ConversationFullError, Item
from streaming.input_audio import (
    InputAudio,
    TurnEnded,
    TurnEvent,
    TurnPaused,
    TurnResumed,
    TurnScoreNeeded,
    TurnStarted,
)
from streaming.protocol import ErrorCode, ErrorType, ProtocolError
from streaming.responses import ResponseRun, ResponseState
from streaming.turn_model import TurnModelMissing
from streaming.vad import DEFAULT_CANDIDATE_MS, SileroMissing, VadConfig

__all__ = [
    "IllegalTransition",
    "RealtimeSession",
    "ResponseState",
    "SessionLimits",
    "SessionOptions",
    "SessionState",
    "SessionStateError",
    "Transport",
]


class SessionState(enum.Enum):
    PENDING = "pending"
    ACTIVE = "active"
    CLOSED = "closed"


class Transport(enum.Enum):
    WEBSOCKET = "websocket"  # audio deltas travel as events
    WEBRTC = "webrtc"  # audio travels on the media track; output_audio_buffer.* events instead


class IllegalTransition(ProtocolError):
    """A client event that is well-formed but not allowed in the current state."""


class SessionStateError(RuntimeError):
    """The engine bridge called a feedback method in a way the session cannot accept."""


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES
    max_input_buffer_ms: int = 120_000  # uncommitted input audio; appends beyond it are refused
    min_commit_ms: int = 100  # OpenAI's minimum for input_audio_buffer.commit
    max_events_per_second: float = 500.0  # client messages; 10 ms audio appends are 100/s
    max_events_burst: int = 2000  # lets a client send a minute of audio in 100 ms appends at once
    max_session_s: float = 30 * 60  # OpenAI's session cap
    max_items: int = 4096
    max_retained_audio_ms: int = 600_000  # user audio kept for conversation.item.retrieve
    max_pending_messages: int = 32  # session.update messages queued before start()
    finished_responses_kept: int = 16  # so that late engine feedback for them is recognised


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    transport: Transport = Transport.WEBSOCKET
    emit_item_created: bool = False  # also send the beta-era conversation.item.created
    vad_frame_ms: int = 20
    vad_min_speech_ms: int = 100
    stream_input: bool = False  # hand a server-VAD turn's audio to the engine while it is spoken
    # ... in parts of at least this much (all of it before a speculation): the engine takes it a patch
    # (160 ms) at a time, and a job per 20 ms frame is 8x the messages to its thread, which fill its
    # queue when it lags (a speculation then finds no headroom)
    stream_part_ms: int = 160
    # at a candidate end, ask the engine for a held answer (with stream_input): released at once
    # when the turn ends there, dropped unheard when the user goes on
    speculate: bool = False
    vad_candidate_ms: int = DEFAULT_CANDIDATE_MS  # silence that is a candidate end (speculation, semantic_vad)
    turn_model: str | None = None  # semantic_vad's model file (None: streaming.turn_model.find_model)
    limits: SessionLimits = dataclasses.field(default_factory=SessionLimits)


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


class RealtimeSession:
    """One Realtime session (see the module docstring for the contract)."""

    def __init__(
        self,
        options: SessionOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        session_id: str | None = None,
    ) -> None:
        self.options = options or SessionOptions()
        self.limits = self.options.limits
        self.clock = clock  # monotonic seconds: timers, rate limit, playback estimates
        self.wall_clock = wall_clock  # epoch seconds: only for session.expires_at
        self.id = session_id or p.new_id("sess")
        self.conversation_id = p.new_id("conv")
        self.state = SessionState.PENDING
        self.config = default_session_config()
        self.conversation = Conversation(self.limits.max_items, self.limits.max_retained_audio_ms)
        self.input = InputAudio(self.limits.max_input_buffer_ms)
        self._events: list[p.ServerEventBase] = []
        self._actions: list[act.Action] = []
        self._pending: list[str | bytes] = []
        self._responses: dict[str, ResponseRun] = {}
        self._active: ResponseRun | None = None
        self._auto_response_queued = False
        self._speculated: str | None = None  # the open turn the engine holds an answer for
        self._audio_out_started = False  # the voice is fixed once audio went out
        self._started_at = 0.0
        self._tokens = float(self.limits.max_events_burst)
        self._tokens_at = clock()
        self._idle_deadline: float | None = None

    # ------------------------------------------------------------------------------------------
    # outputs

    def take_events(self) -> list[p.ServerEventBase]:
        """Server events to send, in order (drains them)."""
        events, self._events = self._events, []
        return events

    def take_actions(self) -> list[act.Action]:
        """Actions for the engine bridge, in order (drains them)."""
        actions, self._actions = self._actions, []
        return actions

    def _emit(self, event: p.ServerEventBase) -> None:
        self._events.append(event)

    def _error(self, err: ProtocolError) -> None:
        detail = p.ErrorDetail(
            type=err.type.value,
            code=err.code.value,
            message=err.message,
            param=err.param,
            event_id=err.event_id,
        )
        self._emit(p.ErrorEvent(error=detail))

    # ------------------------------------------------------------------------------------------
    # lifecycle

    def start(
        self, config: p.SessionConfig | dict[str, Any] | None = None, *, model: str | None = None
    ) -> None:
        """PENDING -> ACTIVE. ``config`` (the server's defaults: engine sampling, interleave, codec
        schedule ...; a partial session object) is merged over :func:`default_session_config`.
        Emits ``session.created`` (and ``UpdateSession``), then applies the ``session.update``
        messages queued while pending."""
        if self.state is not SessionState.PENDING:
            raise SessionStateError(f"start() called in state {self.state.name}")
        base = default_session_config(model).model_dump(mode="json")
        if config is not None:
            patch = config if isinstance(config, dict) else config.model_dump(mode="json", exclude_unset=True)
            base = p.merge_session_update(base, patch)
        self._started_at = self.clock()
        self.state = SessionState.ACTIVE
        base["expires_at"] = int(self.wall_clock() + self.limits.max_session_s)
        self._apply_config(canonical_session(p.SessionConfig.model_validate(base), self.id))
        self._emit(p.SessionCreated(session=fully_set(self.config)))
        pending, self._pending = self._pending, []
        for message in pending:
            self.receive(message)

    def close(self, reason: str = "closed") -> None:
        """-> CLOSED (the connection went away, or the server ends the session): cancels the
        active response so the engine frees its work, then ``Close``. Further input is ignored."""
        if self.state is SessionState.CLOSED:
            return
        if self._active is not None and self._active.state is ResponseState.IN_PROGRESS:
            self._cancel(self._active, "client_cancelled")
        self.state = SessionState.CLOSED
        self._actions.append(act.Close(reason))

    def tick(self, now: float | None = None) -> None:
        """Run the timers: session duration, server-VAD idle timeout."""
        now = self.clock() if now is None else now
        if self.state is not SessionState.ACTIVE:
            return
        if now - self._started_at >= self.limits.max_session_s:
            minutes = self.limits.max_session_s / 60
            self._error(
                ProtocolError(
                    ErrorCode.SESSION_EXPIRED,
                    f"Your session hit the maximum duration of {minutes:g} minutes.",
                )
            )
            self.close("session_expired")
            return
        if (
            self._idle_deadline is not None
            and now >= self._idle_deadline
            and self._turn_detection() is not None
            and self._active is None
            and not self.input.speaking
        ):
            self._idle_deadline = None
            try:
                self._idle_timeout()
            except ProtocolError as err:  # e.g. the conversation is full
                self._error(err)

    # ------------------------------------------------------------------------------------------
    # client input

    def receive(self, message: str | bytes) -> None:
        """Handle one client message. Problems become ``error`` events; nothing is raised."""
        if self.state is SessionState.CLOSED:
            return
        event_id = None
        try:
            self._rate_limit()
            event = p.parse_client_event(message, max_bytes=self.limits.max_message_bytes)
            event_id = event.event_id
            if self.state is SessionState.PENDING:
                self._while_pending(event, message)
                return
            self._HANDLERS[event.type](self, event)
        except ProtocolError as err:
            if err.event_id is None:
                err.event_id = event_id
            self._error(err)

    def push_audio(self, pcm16: np.ndarray) -> None:
        """Audio that arrives outside JSON (a WebRTC track): pcm16 mono at 24 kHz."""
        if self.state is SessionState.CLOSED:
            return
        try:
            if self.state is SessionState.PENDING:
                raise IllegalTransition(
                    ErrorCode.SESSION_NOT_READY, "Audio arrived before the session was ready."
                )
            self._append_input(as_pcm16(pcm16))
        except ProtocolError as err:
            self._error(err)

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.limits.max_events_burst,
                           self._tokens + (now - self._tokens_at) * self.limits.max_events_per_second)
        self._tokens_at = now

    def _rate_limit(self) -> None:
        rate, burst = self.limits.max_events_per_second, self.limits.max_events_burst
        self._refill()
        if self._tokens < 1:
            raise ProtocolError(
                ErrorCode.RATE_LIMIT_EXCEEDED,
                f"More than {rate:g} events per second (burst {burst}); this event was dropped.",
            )
        self._tokens -= 1

    def _while_pending(self, event: p.ClientEvent, message: str | bytes) -> None:
        if isinstance(event, p.SessionUpdate) and len(self._pending) < self.limits.max_pending_messages:
            self._pending.append(message)
            return
        raise IllegalTransition(
            ErrorCode.SESSION_NOT_READY,
            f"{event.type} arrived before session.created; only session.update is queued until then.",
        )

    # --- session.update ---

    def _on_session_update(self, event: p.SessionUpdate) -> None:
        patch = event.session.model_dump(mode="json", exclude_unset=True)
        for server_owned in ("id", "object", "model", "expires_at"):  # read-only for clients
            patch.pop(server_owned, None)
        voice = _dig(patch, "audio", "output", "voice")
        current = self.config.audio.output.model_dump(mode="json")["voice"]
        if voice is not None and voice != current and self._audio_out_started:
            raise ProtocolError(
                ErrorCode.INVALID_VALUE,
                "Cannot update voice: the model has already responded with audio in this session.",
                param="session.audio.output.voice",
            )
        merged = p.merge_session_update(self.config.model_dump(mode="json"), patch)
        try:
            config = p.SessionConfig.model_validate(merged)
        except ValidationError as exc:  # only combinations can fail here: each value passed alone
            raise p.error_from_validation(exc, prefix="session") from None
        self._apply_config(canonical_session(config, self.id))
        self._emit(p.SessionUpdated(session=fully_set(self.config)))

    def _voice_prompt(self, config: p.SessionConfig) -> tuple[p.SessionConfig, np.ndarray | None]:
        """Decode a new ``session.mimo.voice_prompt`` and store a descriptor in its place."""
        value = config.mimo.voice_prompt if config.mimo is not None else None
        current = self.config.mimo.voice_prompt if self.config.mimo is not None else None
        if value == current:
            return config, None
        if not value:
            pcm = np.zeros(0, np.int16)
            value = None
        else:
            if value.startswith(p.VOICE_DESCRIPTOR_PREFIX):
                raise ProtocolError(ErrorCode.INVALID_VALUE, f"Unknown voice prompt {value!r}: send the audio "
                                    "(base64 pcm16 24 kHz) or the descriptor the server returned.",
                                    param="session.mimo.voice_prompt")
            try:
                pcm = WireAudioDecoder("audio/pcm").decode(b64decode_audio(value))
            except AudioFormatError as exc:
                raise ProtocolError(ErrorCode.INVALID_VALUE, f"Invalid voice prompt: {exc}",
                                    param="session.mimo.voice_prompt") from None
            ms = len(pcm) * 1000 // p.PCM_RATE
            if not 100 <= ms <= p.MAX_VOICE_PROMPT_MS:
                raise ProtocolError(ErrorCode.INVALID_VALUE, f"The voice prompt is {ms} ms of audio; send "
                                    f"100 to {p.MAX_VOICE_PROMPT_MS} ms (pcm16 mono 24 kHz).",
                                    param="session.mimo.voice_prompt")
            digest = hashlib.sha1(pcm.tobytes()).hexdigest()[:12]
            value = f"{p.VOICE_DESCRIPTOR_PREFIX}{ms}ms:{digest}"
        mimo = config.mimo.model_copy(update={"voice_prompt": value})
        return config.model_copy(update={"mimo": mimo}), pcm

    def _apply_config(self, config: p.SessionConfig) -> None:
        config, voice = self._voice_prompt(config)
        td = config.audio.input.turn_detection
        vad = None
        if td is not None:
            classifier = (config.mimo.vad if config.mimo is not None else None) or "webrtcvad"
            vad = VadConfig.from_turn_detection(
                td, classifier, frame_ms=self.options.vad_frame_ms, min_speech_ms=self.options.vad_min_speech_ms,
                candidate_ms=self.options.vad_candidate_ms, turn_model=self.options.turn_model,
            )
        try:
            self.input.set_vad(vad)  # before anything changes: a missing model refuses the update whole
        except (TurnModelMissing, SileroMissing) as exc:
            param = "session.mimo.vad" if isinstance(exc, SileroMissing) else "session.audio.input.turn_detection"
            raise ProtocolError(ErrorCode.INVALID_VALUE, f"{exc}.", param=param) from None
        self._drop_speculation()  # the turn, the detector or the answer's settings may change
        self.config = config
        self.input.set_format(config.audio.input.format.type)
        self._actions.append(act.UpdateSession(config, voice))

    def _turn_detection(self) -> p.TurnDetection | None:
        return self.config.audio.input.turn_detection

    # --- input audio buffer ---

    @staticmethod
    def _decode(decode: Callable[[str], np.ndarray], text: str, param: str) -> np.ndarray:
        try:
            return decode(text)
        except InvalidBase64Error as exc:
            raise ProtocolError(ErrorCode.INVALID_BASE64, f"Invalid '{param}': {exc}.", param=param) from None
        except AudioFormatError as exc:
            raise ProtocolError(
                ErrorCode.INVALID_AUDIO_LENGTH, f"Invalid '{param}': {exc}.", param=param
            ) from None

    def _on_append(self, event: p.InputAudioBufferAppend) -> None:
        self._append_input(self._decode(self.input.decode, event.audio, "audio"))

    def _append_input(self, pcm: np.ndarray) -> None:
        try:
            turns = self.input.append(pcm)
        except BufferFullError:
            raise ProtocolError(
                ErrorCode.INPUT_AUDIO_BUFFER_FULL,
                f"The input audio buffer holds its maximum of {self.limits.max_input_buffer_ms} ms; this "
                "audio was dropped. Commit or clear the buffer.",
                param="audio",
            ) from None
        self._on_turns(turns)

    def _on_turns(self, turns: list[TurnEvent]) -> None:
        speculate = None
        for turn in turns:
            if isinstance(turn, TurnStarted):
                self._drop_speculation()
                self._speech_started(turn)
            elif isinstance(turn, TurnPaused):  # candidate ends and resumes are for speculation only
                speculate = turn if self._may_speculate() else speculate
            elif isinstance(turn, TurnResumed):
                speculate = None
                self._drop_speculation()
            elif isinstance(turn, TurnScoreNeeded):
                self._actions.append(act.ScoreTurn(turn.request.request_id, turn.request.audio16k))
            elif isinstance(turn, TurnEnded):
                self._emit(
                    p.InputAudioBufferSpeechStopped(audio_end_ms=turn.audio_end_ms, item_id=turn.item_id)
                )
                answer = self._turn_detection().create_response and self._active is None
                if self._speculated == turn.item_id and answer and speculate is None:
                    self._speculated = None  # its commit and response below release the held answer
                self._drop_speculation()
                speculate = None
                self._commit_user_audio(turn.item_id, turn.pcm)
                if self._turn_detection().create_response:
                    if self._active is None:
                        self._create_response(None, None)
                    else:
                        self._auto_response_queued = True
        if self.options.stream_input:
            part = self.input.stream(0 if speculate is not None else self.options.stream_part_ms)
            if part is not None:
                self._actions.append(act.StreamUserAudio(*part))
        if speculate is not None:  # after its audio
            self._speculated = speculate.item_id
            self._actions.append(act.Speculate(speculate.item_id, self.input.turn_samples(speculate.audio_end_ms),
                                               resolve_response_params(self.config, None), self._end_in_s(),
                                               ends_early=self.input.vad.config.end_threshold is not None))

    def turn_scored(self, request_id: int, probability: float | None) -> None:
        """semantic_vad: the end-of-turn model's answer to an ``act.ScoreTurn`` (None: the call
        failed; the silence window decides). A turn it ends ends where the score was asked for."""
        if self.state is not SessionState.ACTIVE:
            return
        try:
            self._on_turns(self.input.scored(request_id, probability))
        except ProtocolError as err:  # e.g. the conversation is full
            self._error(err)

    def _may_speculate(self) -> bool:
        """Only where the turn's end would create a response now (``create_response``, no response
        active or queued), and with the turn's audio at the engine."""
        td = self._turn_detection()
        return (self.options.speculate and self.options.stream_input and td is not None and bool(td.create_response)
                and self._active is None and not self._auto_response_queued and self._speculated is None)

    def _end_in_s(self) -> float:
        """At a candidate end: how long until the turn may end at the earliest, the rest of the silence
        window (semantic_vad: its window where the model is unsure). The engine starts the held answer
        only shortly before (``agent.engine.Speculate``): a pause the user ends sooner costs nothing.
        semantic_vad's confident score ends the turn sooner: its held answer is prefilled at once
        (``ends_early``), so that such an end releases it after a few steps."""
        config = self.input.vad.config
        return max(0, config.silence_duration_ms - config.candidate_ms) / 1000

    def _drop_speculation(self) -> None:
        if self._speculated is not None:
            self._actions.append(act.AbandonSpeculation(self._speculated))
            self._speculated = None

    def _speech_started(self, turn: TurnStarted) -> None:
        self._idle_deadline = None
        self._emit(p.InputAudioBufferSpeechStarted(audio_start_ms=turn.audio_start_ms, item_id=turn.item_id))
        if not self._turn_detection().interrupt_response:
            return
        # only responses that speak into the conversation are interrupted (OpenAI's rule)
        run = next((r for r in reversed(self._responses.values()) if r.in_conversation), None)
        if run is None:
            return
        if run.state is ResponseState.IN_PROGRESS:
            self._cancel(run, "turn_detected")
        elif run.may_be_playing(self.clock()):
            self._cut_playout(run, cancelled="turn_detected")

    def _on_commit(self, event: p.InputAudioBufferCommit) -> None:
        self.input.flush_decoder()
        if self.input.buffered_ms < self.limits.min_commit_ms:
            raise IllegalTransition(
                ErrorCode.INPUT_AUDIO_BUFFER_COMMIT_EMPTY,
                f"Error committing input audio buffer: buffer too small. Expected at least "
                f"{self.limits.min_commit_ms}ms of audio, but buffer only has {self.input.buffered_ms:.2f}ms "
                "of audio.",
            )
        self._drop_speculation()
        item_id, _, _, pcm = self.input.take()
        self._commit_user_audio(item_id, pcm)

    def _on_clear(self, event: p.InputAudioBufferClear) -> None:
        self._drop_speculation()
        self.input.clear()
        self._emit(p.InputAudioBufferCleared())

    def _commit_user_audio(self, item_id: str, pcm: np.ndarray) -> None:
        parts = [p.ContentPart(type="input_audio", transcript=None)]
        item = Item(id=item_id, role="user", status="completed", parts=parts, audio=pcm, audio_samples=len(pcm))
        previous = self._add_item(item)
        self._emit(p.InputAudioBufferCommitted(item_id=item_id, previous_item_id=previous))
        self._announce_item(item, previous)
        if len(pcm):
            self._actions.append(act.AppendUserAudio(item_id, pcm, transcribe=self._transcribing()))

    def _idle_timeout(self) -> None:
        item_id, start_ms, end_ms, pcm = self.input.take()
        self._emit(
            p.InputAudioBufferTimeoutTriggered(audio_start_ms=start_ms, audio_end_ms=end_ms, item_id=item_id)
        )
        self._commit_user_audio(item_id, pcm)
        self._create_response(None, None)

    # --- conversation items ---

    def _add_item(self, item: Item, after: str | None = None) -> str | None:
        try:
            return self.conversation.add(item, after)
        except ConversationFullError as exc:
            raise ProtocolError(ErrorCode.CONVERSATION_FULL, str(exc)) from None

    def _announce_item(self, item: Item, previous: str | None, *, done: bool = True) -> None:
        model = item.to_model()
        self._emit(p.ConversationItemAdded(previous_item_id=previous, item=model))
        if self.options.emit_item_created:
            self._emit(p.ConversationItemCreated(previous_item_id=previous, item=model))
        if done:
            self._emit(p.ConversationItemDone(previous_item_id=previous, item=model))

    def _on_item_create(self, event: p.ConversationItemCreate) -> None:
        # absent: append; "root": first; an item's id: right after it (OpenAI's GA semantics)
        after = AT_START if event.previous_item_id == "root" else event.previous_item_id
        if after and after not in self.conversation:
            raise ProtocolError(
                ErrorCode.ITEM_CREATE_INVALID_PREVIOUS_ITEM_ID,
                f"Invalid 'previous_item_id': no item {after!r} in the conversation (use an existing "
                "item's id, 'root' to insert first, or omit it to append).",
                param="previous_item_id",
            )
        spec = event.item
        item_id = spec.id or p.new_id("item")
        if item_id in self.conversation:
            raise ProtocolError(
                ErrorCode.ITEM_ID_CONFLICT, f"An item with id {item_id!r} already exists.", param="item.id"
            )
        text_action = {
            "user": act.AppendUserText,
            "system": act.AppendSystemText,
            "assistant": act.AppendAssistantText,
        }
        parts: list[p.ContentPart] = []
        actions: list[act.Action] = []
        audio: list[np.ndarray] = []
        transcribe = False

        def place() -> str | None:
            """The engine gets one action per part: the first goes where the item goes, each later
            one right after the one before."""
            return after if after is None or not actions else item_id
        for i, part in enumerate(spec.content):  # validate every part before anything happens
            where = f"item.content[{i}]"
            if part.type in ("input_text", "output_text"):
                if part.text is None:
                    raise ProtocolError(
                        ErrorCode.MISSING_REQUIRED_PARAMETER,
                        f"Missing required parameter: '{where}.text'.",
                        param=f"{where}.text",
                    )
                actions.append(text_action[spec.role](item_id, part.text, after=place()))
                parts.append(p.ContentPart(type=part.type, text=part.text))
            elif part.type == "input_audio":
                if part.audio is None:
                    raise ProtocolError(
                        ErrorCode.MISSING_REQUIRED_PARAMETER,
                        f"Missing required parameter: '{where}.audio'.",
                        param=f"{where}.audio",
                    )
                decoder = WireAudioDecoder(self.config.audio.input.format.type)
                pcm = self._decode(
                    lambda t, d=decoder: d.decode(b64decode_audio(t)), part.audio, f"{where}.audio"
                )
                pcm = np.concatenate([pcm, decoder.flush()])
                audio.append(pcm)
                transcribe = transcribe or (self._transcribing() and not part.transcript)
                parts.append(p.ContentPart(type="input_audio", transcript=part.transcript))
            else:  # output_audio
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED_FEATURE,
                    "Assistant audio items cannot be created by the client; send the assistant's words as "
                    "output_text.",
                    param=where,
                )
        item = Item(
            id=item_id,
            role=spec.role,
            status="completed",
            parts=parts,
            audio=np.concatenate(audio) if audio else None,
            audio_samples=sum(len(a) for a in audio),
        )
        if audio:  # the audio parts of an item are one utterance for the model: one action
            actions.append(act.AppendUserAudio(item_id, item.audio, transcribe=transcribe, after=place()))
        previous = self._add_item(item, after)
        self._announce_item(item, previous)
        self._actions.extend(actions)

    def _on_item_truncate(self, event: p.ConversationItemTruncate) -> None:
        self.truncate_item(event.item_id, event.audio_end_ms, content_index=event.content_index)

    def truncate_item(self, item_id: str, audio_end_ms: int, *, content_index: int | None = None,
                      stop_audio: bool = True) -> None:
        """Truncate an assistant audio item: the client's ``conversation.item.truncate`` (its
        response is cancelled, and with ``stop_audio`` its audio still queued is dropped: the
        listener stopped there). Raises :class:`ProtocolError`."""
        item = self.conversation.get(item_id)
        if item is None:
            raise ProtocolError(
                ErrorCode.ITEM_TRUNCATE_INVALID_ITEM_ID,
                f"Item with item_id not found: {item_id}.",
                param="item_id",
            )
        index = item.audio_part_index()
        if item.role != "assistant" or index is None:
            raise ProtocolError(
                ErrorCode.INVALID_VALUE,
                f"Item {item_id!r} is not an assistant audio item; only those can be truncated.",
                param="item_id",
            )
        if content_index is not None and content_index != index:
            raise ProtocolError(
                ErrorCode.INVALID_VALUE,
                f"Invalid 'content_index': {content_index}; the item's audio is content part {index}.",
                param="content_index",
            )
        if audio_end_ms > math.ceil(item.audio_ms):
            raise ProtocolError(
                ErrorCode.INVALID_VALUE,
                f"Invalid 'audio_end_ms': {audio_end_ms} ms is beyond the item's audio "
                f"({item.audio_ms:.0f} ms).",
                param="audio_end_ms",
            )
        run = self._responses.get(item.response_id) if item.response_id else None
        if run is not None and run.state is ResponseState.IN_PROGRESS:
            self._cancel(run, "client_cancelled", cut=False)
        elif stop_audio and run is not None and run.may_be_playing(self.clock()):
            # the listener stopped at audio_end_ms: so does its audio
            self._cut_playout(run, cut=False, cancelled="client_cancelled")
        transcript = Conversation.truncate(item, audio_end_ms)
        self._emit(
            p.ConversationItemTruncated(item_id=item_id, content_index=index, audio_end_ms=audio_end_ms)
        )
        self._actions.append(act.TruncateItem(item_id, audio_end_ms, transcript))

    def _on_item_delete(self, event: p.ConversationItemDelete) -> None:
        if event.item_id not in self.conversation:
            raise ProtocolError(
                ErrorCode.ITEM_DELETE_INVALID_ITEM_ID,
                f"Item with item_id not found: {event.item_id}.",
                param="item_id",
            )
        if self._active and self._active.item_id == event.item_id:
            raise IllegalTransition(
                ErrorCode.ITEM_IN_ACTIVE_RESPONSE,
                f"Item {event.item_id!r} belongs to the response in progress; cancel it first.",
                param="item_id",
            )
        self.conversation.remove(event.item_id)
        self._emit(p.ConversationItemDeleted(item_id=event.item_id))
        self._actions.append(act.DeleteItem(event.item_id))

    def _on_item_retrieve(self, event: p.ConversationItemRetrieve) -> None:
        item = self.conversation.get(event.item_id)
        if item is None:
            raise ProtocolError(
                ErrorCode.ITEM_RETRIEVE_INVALID_ITEM_ID,
                f"Item with item_id not found: {event.item_id}.",
                param="item_id",
            )
        self._emit(
            p.ConversationItemRetrieved(item=item.to_model(audio_format=self.config.audio.input.format.type))
        )

    # --- responses ---

    def _on_response_create(self, event: p.ResponseCreate) -> None:
        self._create_response(event.response, event.event_id)

    def _create_response(self, override: p.ResponseCreateParams | None, event_id: str | None) -> None:
        self._drop_speculation()  # a response before the turn's end: the held answer is not it
        if self._active is not None:
            raise IllegalTransition(
                ErrorCode.CONVERSATION_ALREADY_HAS_ACTIVE_RESPONSE,
                f"Conversation already has an active response in progress: {self._active.id}. Wait until the "
                "response is finished before creating a new one.",
                event_id=event_id,
            )
        run = ResponseRun(p.new_id("resp"), p.new_id("item"), resolve_response_params(self.config, override))
        self._responses[run.id] = run
        self._active = run
        self._idle_deadline = None
        self._emit(p.ResponseCreated(response=run.response(self.conversation_id)))
        self._emit(self._rate_limits())
        self._actions.append(act.CreateResponse(run.id, run.item_id, run.params))

    def _rate_limits(self) -> p.RateLimitsUpdated:
        """OpenAI sends ``rate_limits.updated`` after each ``response.created``. This server's limit
        is the client event rate (``max_events_per_second``, burst ``max_events_burst``): a bucket
        that refills continuously, reported as ``requests``."""
        rate, burst = self.limits.max_events_per_second, self.limits.max_events_burst
        self._refill()
        return p.RateLimitsUpdated(rate_limits=[p.RateLimit(
            name="requests", limit=burst, remaining=int(self._tokens),
            reset_seconds=round((burst - self._tokens) / rate, 3))])

    def _on_response_cancel(self, event: p.ResponseCancel) -> None:
        active = self._active
        if active is None:
            last = self._last_response()
            if last is not None and event.response_id in (None, last.id) and last.may_be_playing(self.clock()):
                # generated, but its audio (and response.done) may still wait in the paced output:
                # for the client it is still running, so the cancel stops its audio
                self._cut_playout(last, cancelled="client_cancelled")
                return
            raise IllegalTransition(
                ErrorCode.RESPONSE_CANCEL_NOT_ACTIVE, "Cancellation failed: no active response found."
            )
        if event.response_id is not None and event.response_id != active.id:
            raise IllegalTransition(
                ErrorCode.RESPONSE_CANCEL_NOT_ACTIVE,
                f"Cancellation failed: response {event.response_id!r} is not in progress "
                f"(active: {active.id}).",
                param="response_id",
            )
        self._cancel(active, "client_cancelled")

    def _cancel(self, run: ResponseRun, reason: act.CancelReason, *, cut: bool = True) -> None:
        """Stop ``run`` now: the engine is told, its queued audio dropped (``cut``: truncated to what
        was played, where the transport knows it), and it finishes ``cancelled`` at once."""
        self._actions.append(act.CancelResponse(run.id, reason))
        self._cut_playout(run, cut=cut)
        self._finish(run, "cancelled", reason)

    def _cut_playout(self, run: ResponseRun, *, cut: bool = True, cancelled: str | None = None) -> None:
        """Drop ``run``'s output audio not yet sent or played (the bridge truncates the item to what
        was played when ``cut`` and it knows); WebRTC: ``output_audio_buffer.cleared``. ``cancelled``:
        ``run`` was generated but is stopped while it plays (see ``act.FlushOutputAudio``)."""
        self._actions.append(act.FlushOutputAudio(run.id, cut=cut, cancelled=cancelled))
        stored = self.conversation.get(run.item_id) if cancelled is not None and run.in_conversation else None
        if stored is not None:  # not all of it was heard: incomplete, as a response cancelled in progress leaves it
            stored.status = "incomplete"
        self._clear_playout(run)

    def _on_output_clear(self, event: p.OutputAudioBufferClear) -> None:
        last = self._active or self._last_response()
        self._actions.append(act.FlushOutputAudio(last.id if last else None))
        if last is not None:  # before any response there was nothing to clear, nor a response to name
            last.playing = False
            if not last.cut:  # a cancel just cut it and said so: the usual cancel + clear pair gets one
                self._emit(p.OutputAudioBufferCleared(response_id=last.id))

    def _clear_playout(self, run: ResponseRun) -> None:
        """WebRTC: tell the client that playback of ``run`` was cut off (barge-in)."""
        if self.options.transport is Transport.WEBRTC and run.playing:
            run.playing, run.cut = False, True
            self._emit(p.OutputAudioBufferCleared(response_id=run.id))

    def _last_response(self) -> ResponseRun | None:
        return next(reversed(self._responses.values()), None)

    _HANDLERS: ClassVar[dict[str, Callable[[RealtimeSession, Any], None]]] = {
        "session.update": _on_session_update,
        "input_audio_buffer.append": _on_append,
        "input_audio_buffer.commit": _on_commit,
        "input_audio_buffer.clear": _on_clear,
        "conversation.item.create": _on_item_create,
        "conversation.item.truncate": _on_item_truncate,
        "conversation.item.delete": _on_item_delete,
        "conversation.item.retrieve": _on_item_retrieve,
        "response.create": _on_response_create,
        "response.cancel": _on_response_cancel,
        "output_audio_buffer.clear": _on_output_clear,
    }

    # ------------------------------------------------------------------------------------------
    # engine feedback

    def _run(self, response_id: str) -> ResponseRun:
        run = self._responses.get(response_id)
        if run is None:
            raise SessionStateError(f"unknown response {response_id!r}")
        return run

    def _open(self, run: ResponseRun) -> None:
        """Announce the output item (and, in the conversation, the assistant item) and its part."""
        if run.opened:
            return
        run.opened = True
        item = run.new_item()
        self._emit(p.ResponseOutputItemAdded(response_id=run.id, output_index=0, item=item.to_model()))
        if run.in_conversation:
            try:
                previous = self._add_item(item)
            except ProtocolError as err:  # conversation full: the output stays out of band
                self._error(err)
            else:
                self._announce_item(item, previous, done=False)
                run.fill_item(item, "in_progress")  # the item holds the part announced below from now on
        self._emit(run.part_added())

    def response_started(self, response_id: str) -> None:
        """The engine began generating: announces the output item and its content part."""
        run = self._run(response_id)
        if run.state is ResponseState.IN_PROGRESS:
            self._open(run)

    def response_text(self, response_id: str, text_delta: str) -> None:
        """Text from the engine: the transcript of the speech (audio responses) or the answer
        (text-only responses)."""
        run = self._run(response_id)
        if run.state is not ResponseState.IN_PROGRESS or not text_delta:
            return  # output of a cancelled response is dropped
        self._open(run)
        self._emit(run.add_text(text_delta))
        item = self.conversation.get(run.item_id) if run.in_conversation else None
        if item is not None:
            run.fill_item(item, "in_progress")
            Conversation.record_text(item, len(run.text))

    def response_audio(self, response_id: str, pcm16: bytes | np.ndarray) -> bool:
        """Speech from the engine, pcm16 mono at 24 kHz. Sent as ``response.output_audio.delta`` in
        the response's output format (WebSocket), or only accounted (WebRTC: the track carries it).
        Returns False when the audio is dropped (the response is being cancelled or is over): a
        transport that plays the audio itself must drop it too."""
        run = self._run(response_id)
        if not run.params.audio:
            raise SessionStateError(f"audio for text-only response {response_id!r}")
        pcm = as_pcm16(pcm16)
        if run.state is not ResponseState.IN_PROGRESS or not len(pcm):
            return False
        self._open(run)
        if run.first_audio_at is None:
            run.first_audio_at = self.clock()
            self._audio_out_started = True
            if self.options.transport is Transport.WEBRTC:
                run.playing = True
                self._emit(p.OutputAudioBufferStarted(response_id=run.id))
        delta = run.add_audio(pcm, as_event=self.options.transport is Transport.WEBSOCKET)
        if delta is not None:
            self._emit(delta)
        item = self.conversation.get(run.item_id) if run.in_conversation else None
        if item is not None:
            item.audio_samples = run.audio_samples
        return True

    def response_done(
        self,
        response_id: str,
        status: str = "completed",
        reason: str | None = None,
        usage: dict[str, Any] | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        """The engine finished: ``completed``, or ``incomplete`` with reason ``max_output_tokens``.
        A cancelled response was finished when it was cancelled: its confirmation is ignored.
        ``usage`` is OpenAI's usage object; ``timings`` (ms per stage) go to ``response.mimo``."""
        run = self._run(response_id)
        if run.state is ResponseState.DONE:
            return  # already finished (cancelled: the engine confirms late)
        if status not in ("completed", "incomplete", "cancelled", "failed"):
            raise SessionStateError(f"invalid response status {status!r}")
        self._finish(run, status, reason, usage, timings)

    def response_failed(self, response_id: str, message: str) -> None:
        """The engine could not produce the response: ``response.done`` with status ``failed``,
        then an ``error`` event (type ``server_error``)."""
        run = self._run(response_id)
        if run.state is ResponseState.DONE:
            return
        error = {"type": ErrorType.SERVER.value, "code": ErrorCode.RESPONSE_FAILED.value, "message": message}
        self._finish(run, "failed", None, error=error)
        self._error(
            ProtocolError(
                ErrorCode.RESPONSE_FAILED, f"Response {run.id} failed: {message}", type=ErrorType.SERVER
            )
        )

    def _transcribing(self) -> bool:
        return self.config.audio.input.transcription is not None

    # --- input transcription feedback (the engine's ASR pass over a user audio item) ---

    # (each event names the item's audio part; an item deleted meanwhile gets none)

    def _transcribed_part(self, item_id: str) -> tuple[Item | None, int]:
        item = self.conversation.get(item_id)
        return item, (item.part_index("input_audio") or 0) if item is not None else 0

    def transcription_delta(self, item_id: str, delta: str) -> None:
        item, index = self._transcribed_part(item_id)
        if delta and item is not None:
            self._emit(p.InputAudioTranscriptionDelta(item_id=item_id, content_index=index, delta=delta))

    def transcription_done(self, item_id: str, transcript: str) -> None:
        item, index = self._transcribed_part(item_id)
        if item is None:
            return
        item.parts[index].transcript = transcript
        usage = p.TranscriptionUsage(type="duration", seconds=round(item.audio_ms / 1000, 3))
        self._emit(p.InputAudioTranscriptionCompleted(item_id=item_id, content_index=index, transcript=transcript,
                                                      usage=usage))

    def transcription_failed(self, item_id: str, message: str) -> None:
        item, index = self._transcribed_part(item_id)
        if item is None:
            return
        detail = p.ErrorDetail(type=ErrorType.SERVER.value, code="transcription_failed", message=message)
        self._emit(p.InputAudioTranscriptionFailed(item_id=item_id, content_index=index, error=detail))

    def drop_item(self, item_id: str) -> None:
        """The engine removed an item to fit the context (``truncation: auto``): the client is told
        with ``conversation.item.deleted``, as if it had deleted the item itself."""
        if self.conversation.get(item_id) is None:
            return
        self.conversation.remove(item_id)
        self._emit(p.ConversationItemDeleted(item_id=item_id))

    def output_audio_cut(self, response_id: str, played_samples: int) -> None:
        """WebRTC: the transport dropped the unplayed rest of ``response_id``'s audio after
        ``played_samples`` (24 kHz) had been played. The server owns playback there, so it does what a
        WebSocket client does after an interrupt: the assistant item is truncated to what was heard
        (``conversation.item.truncated``; the model's context rolls back to it)."""
        run = self._responses.get(response_id)
        item = self.conversation.get(run.item_id) if run is not None and run.in_conversation else None
        if item is None or played_samples >= item.audio_samples:
            return
        try:
            self.truncate_item(item.id, played_samples * 1000 // p.PCM_RATE, stop_audio=False)
        except ProtocolError as err:  # e.g. a text-only item: nothing to cut
            self._error(err)

    def output_audio_drained(self, response_id: str) -> None:
        """The transport played all of a response's audio: ``output_audio_buffer.stopped``
        (WebRTC); the idle timeout counts from now."""
        run = self._run(response_id)
        if self.options.transport is Transport.WEBRTC and run.playing:
            run.playing = False
            self._emit(p.OutputAudioBufferStopped(response_id=run.id))
        if run.state is ResponseState.DONE and self._active is None and run.in_conversation:
            self._arm_idle(self.clock())

    def _finish(
        self,
        run: ResponseRun,
        status: str,
        reason: str | None,
        usage: dict[str, Any] | None = None,
        timings: dict[str, float] | None = None,
        *,
        error: dict[str, Any] | None = None,
    ) -> None:
        output: list[p.ConversationItem] = []
        if run.opened:
            for event in run.closing_events(audio_events=self.options.transport is Transport.WEBSOCKET,
                                            tail=status != "cancelled"):
                self._emit(event)
            stored = self.conversation.get(run.item_id) if run.in_conversation else None
            item = run.fill_item(
                stored or run.new_item(), "completed" if status == "completed" else "incomplete"
            )
            model = item.to_model()
            self._emit(p.ResponseOutputItemDone(response_id=run.id, output_index=0, item=model))
            if stored is not None:
                self._emit(
                    p.ConversationItemDone(
                        previous_item_id=self.conversation.previous_id(run.item_id), item=model
                    )
                )
            output.append(model)
        run.state = ResponseState.DONE
        fields: dict[str, Any] = {
            "status": status,
            "status_details": {"type": status, "reason": reason, "error": error},
            "output": output,
            "mimo": {"timings": dict(timings) if timings else None, "audio_ms": run.audio_ms},
            "usage": usage if usage is not None else p.ZERO_USAGE,
        }
        self._emit(p.ResponseDone(response=run.response(self.conversation_id, **fields)))
        if self._active is run:
            self._active = None
        if run.in_conversation:
            self._arm_idle(run.playback_end(self.clock()))
        done = [rid for rid, r in self._responses.items() if r.state is ResponseState.DONE]
        for rid in done[: -self.limits.finished_responses_kept]:
            del self._responses[rid]
        if self._auto_response_queued and self.state is SessionState.ACTIVE:
            self._auto_response_queued = False
            self._create_response(None, None)

    def _arm_idle(self, playback_end: float) -> None:
        td = self._turn_detection()
        if td is not None and td.idle_timeout_ms:
            self._idle_deadline = playback_end + td.idle_timeout_ms / 1000
