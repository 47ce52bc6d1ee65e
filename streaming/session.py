"""The sans-I/O Realtime session: client messages and engine feedback in, server events and engine
actions out. No ``await``, no sockets, no threads; time comes from an injected clock.

Driving it (the transport and the engine bridge)::

    session = RealtimeSession(clock=time.monotonic)
    session.start(server_defaults)          # PENDING -> ACTIVE, emits session.created
    session.receive(text)                   # one client message (str or bytes)
    session.push_audio(pcm16_24k)           # audio from a media track (WebRTC), no JSON
    session.tick()                          # timers: session duration, idle timeout, cancel grace
    session.response_audio(rid, pcm)        # engine feedback, see the "engine feedback" section
    for event in session.take_events(): send(event.to_json())
    for action in session.take_actions(): bridge.apply(action)

States. ``SessionState``: PENDING until the bridge calls :meth:`start` (which emits
``session.created``), ACTIVE, CLOSED after :meth:`close` or the duration limit. In PENDING,
``session.update`` messages are queued (bounded) and applied right after ``session.created``;
every other client event, and :meth:`push_audio`, is refused with ``session_not_ready`` (so a
bridge that starts the session before reading the socket never refuses anything). In CLOSED,
input is ignored. ``ResponseState`` per response: IN_PROGRESS, CANCELLING (a ``CancelResponse``
went out; further output from the engine is dropped until it confirms with ``response_done``,
or ``cancel_grace_s`` passes), DONE. One response at a time: ``response.create`` during another
is refused (``conversation_already_has_active_response``); a VAD turn that ends while a response
is active queues its response until that one is done.

Every refusal is an :class:`IllegalTransition` or another :class:`ProtocolError` raised inside the
handler and sent as an ``error`` event; the session carries on. Misuse by the bridge (feedback for
a response id it was never given, audio for a text-only response) raises :class:`SessionStateError`.

Server VAD (``streaming.vad``) runs on the input as it arrives: ``speech_started`` (with the
prefix padding, interrupting the active response when ``interrupt_response``: ``CancelResponse``
with reason ``turn_detected`` plus ``FlushOutputAudio``), ``speech_stopped``, then the speech span
is committed as a user item and, with ``create_response``, a response is created. Without turn
detection the client commits (``input_audio_buffer.commit``, at least 100 ms) and asks for
responses itself.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from pydantic import ValidationError

from streaming import actions as act
from streaming import protocol as p
from streaming.audio import (
    SAMPLE_RATE,
    AudioFormatError,
    BufferFullError,
    InvalidBase64Error,
    Overflow,
    PcmBuffer,
    WireAudioDecoder,
    WireAudioEncoder,
    as_pcm16,
    b64decode_audio,
    b64encode_audio,
)
from streaming.conversation import Conversation, ConversationFullError, Item
from streaming.protocol import ErrorCode, ErrorType, ProtocolError
from streaming.vad import TurnDetector, VadConfig, resolve_turn_detection

DEFAULT_INSTRUCTIONS = "You are MiMo-Audio, a friendly AI assistant and your response needs to be concise."
SAMPLES_PER_MS = SAMPLE_RATE // 1000


class SessionState(enum.Enum):
    PENDING = "pending"
    ACTIVE = "active"
    CLOSED = "closed"


class ResponseState(enum.Enum):
    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"
    DONE = "done"


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
    max_events_per_second: float = 250.0  # client messages; 10 ms audio appends are 100/s
    max_events_burst: int = 500
    max_session_s: float = 30 * 60  # OpenAI's session cap
    max_items: int = 4096
    max_retained_audio_ms: int = 600_000
    max_pending_messages: int = 32  # session.update messages queued before start()
    cancel_grace_s: float = 5.0  # wait this long for the engine to confirm a cancel


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    transport: Transport = Transport.WEBSOCKET
    emit_item_created: bool = False  # also send the beta-era conversation.item.created
    vad_frame_ms: int = 20
    vad_min_speech_ms: int = 100
    limits: SessionLimits = dataclasses.field(default_factory=SessionLimits)


def default_session_config(model: str | None = None) -> p.SessionConfig:
    """The full configuration a session starts from, before the bridge's overrides."""
    return p.SessionConfig.model_validate(
        {
            "type": "realtime",
            "object": "realtime.session",
            "model": model,
            "output_modalities": ["audio"],
            "instructions": DEFAULT_INSTRUCTIONS,
            "max_output_tokens": "inf",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                    "turn_detection": resolve_turn_detection(p.TurnDetection(type="server_vad")).model_dump(),
                    "transcription": None,
                    "noise_reduction": None,
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                    "voice": "default",
                    "speed": 1.0,
                },
            },
            "tools": [],
            "tool_choice": "auto",
            "tracing": None,
            "include": None,
            "truncation": "auto",
            "prompt": None,
            # official spoken-dialogue samplers (spec 2.8); interleave off (the model decides)
            "mimo": {
                "interleave": None,
                "sampling": {
                    "text": {"temperature": 0.6, "top_k": None, "top_p": 0.95},
                    "speech": {"temperature": 0.9, "top_k": None, "top_p": 0.95},
                },
                "codec": {
                    "first_chunk_patches": None,
                    "chunk_patches": None,
                    "left_context_patches": None,
                    "right_holdback_patches": None,
                },
                "task": "spoken_dialogue",
                "thinking": False,
            },
        }
    )


def _full(model: Any) -> Any:
    """A copy whose every field counts as set, so ``exclude_unset`` dumps show all of it."""
    return type(model).model_validate(model.model_dump())


@dataclasses.dataclass
class _Response:
    id: str
    item_id: str
    params: act.ResponseParams
    state: ResponseState = ResponseState.IN_PROGRESS
    opened: bool = False  # output item and content part announced
    text: str = ""
    audio_samples: int = 0
    encoder: WireAudioEncoder | None = None
    cancel_reason: str | None = None
    cancel_at: float | None = None
    first_audio_at: float | None = None
    playing: bool = False  # WebRTC: output_audio_buffer.started sent, not yet stopped or cleared

    @property
    def in_conversation(self) -> bool:
        return self.params.conversation == "auto"


class RealtimeSession:
    """One Realtime session (see the module docstring for the full contract)."""

    def __init__(
        self,
        options: SessionOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        session_id: str | None = None,
    ) -> None:
        self.options = options or SessionOptions()
        self.limits = self.options.limits
        self.clock = clock
        self.id = session_id or p.new_id("sess")
        self.conversation_id = p.new_id("conv")
        self.state = SessionState.PENDING
        self.config = default_session_config()
        self.conversation = Conversation(self.limits.max_items, self.limits.max_retained_audio_ms)
        self._events: list[p.ServerEventBase] = []
        self._actions: list[act.Action] = []
        self._pending: list[str | bytes] = []
        self._responses: dict[str, _Response] = {}
        self._active: _Response | None = None
        self._auto_response_queued = False
        self._audio_out_started = False  # voice becomes fixed once audio went out
        self._started_at = 0.0
        self._tokens = float(self.limits.max_events_burst)
        self._tokens_at = clock()
        self._idle_deadline: float | None = None
        self._input = PcmBuffer(self.limits.max_input_buffer_ms * SAMPLES_PER_MS, Overflow.REFUSE)
        self._decoder = WireAudioDecoder("audio/pcm")
        self._vad: TurnDetector | None = None
        self._vad_offset = 0  # absolute input sample at which the current detector started
        self._turn_item_id: str | None = None
        self._turn_start = 0  # absolute input sample where the current VAD turn's item begins

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
        schedule ...) is merged over :func:`default_session_config`. Emits ``session.created``, then
        applies the ``session.update`` messages queued while pending."""
        if self.state is not SessionState.PENDING:
            raise SessionStateError(f"start() called in state {self.state.name}")
        base = default_session_config(model).model_dump(mode="json")
        if config is not None:
            patch = config if isinstance(config, dict) else config.model_dump(mode="json", exclude_unset=True)
            base = p.merge_session_update(base, patch)
        self._started_at = self.clock()
        self.state = SessionState.ACTIVE
        self._apply_config(self._canonical(p.SessionConfig.model_validate(base)))
        self._emit(p.SessionCreated(session=_full(self.config)))
        pending, self._pending = self._pending, []
        for message in pending:
            self.receive(message)

    def close(self, reason: str = "closed") -> None:
        """ACTIVE -> CLOSED (the connection went away or the server shuts the session down):
        cancels the active response so the engine frees its work. Further input is ignored."""
        if self.state is SessionState.CLOSED:
            return
        if self._active is not None and self._active.state is ResponseState.IN_PROGRESS:
            self._actions.append(act.CancelResponse(self._active.id, "client_cancelled"))
        self.state = SessionState.CLOSED
        self._actions.append(act.Close(reason))

    def tick(self, now: float | None = None) -> None:
        """Run the timers: session duration, cancel confirmation grace, server VAD idle timeout."""
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
        active = self._active
        if (
            active
            and active.state is ResponseState.CANCELLING
            and now - active.cancel_at >= self.limits.cancel_grace_s
        ):
            self._finish(active, "cancelled", active.cancel_reason, None, None)
        td = self._turn_detection()
        if (
            self._idle_deadline is not None
            and now >= self._idle_deadline
            and td is not None
            and self._active is None
            and not (self._vad and self._vad.speaking)
        ):
            self._idle_deadline = None
            self._idle_timeout()

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
        """Audio that arrives outside JSON (a WebRTC track), pcm16 mono at 24 kHz."""
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

    def _rate_limit(self) -> None:
        now = self.clock()
        rate, burst = self.limits.max_events_per_second, self.limits.max_events_burst
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
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
        for server_owned in ("id", "object", "model", "expires_at"):
            patch.pop(server_owned, None)
        voice = (
            patch.get("audio", {}).get("output", {}).get("voice")
            if isinstance(patch.get("audio"), dict)
            else None
        )
        current_voice = self.config.audio.output.voice
        if voice is not None and voice != current_voice and self._audio_out_started:
            raise ProtocolError(
                ErrorCode.INVALID_VALUE,
                "Cannot update voice: the model has already responded with audio in this session.",
                param="session.audio.output.voice",
            )
        merged = p.merge_session_update(self.config.model_dump(mode="json"), patch)
        try:
            config = p.SessionConfig.model_validate(merged)
        except ValidationError as exc:  # a merge can only fail on values that passed alone
            raise p.error_from_validation(exc, prefix="session") from None
        self._apply_config(self._canonical(config))
        self._emit(p.SessionUpdated(session=_full(self.config)))

    def _canonical(self, config: p.SessionConfig) -> p.SessionConfig:
        """Fill in what an update may leave out, so the stored configuration is complete."""
        data = config.model_dump(mode="json")
        audio = data.get("audio") or {}
        audio_in, audio_out = audio.get("input") or {}, audio.get("output") or {}
        for part in (audio_in, audio_out):
            fmt = part.get("format") or {"type": "audio/pcm"}
            if fmt["type"] == "audio/pcm":
                fmt["rate"] = SAMPLE_RATE
            part["format"] = fmt
        td = audio_in.get("turn_detection")
        if td is not None:
            audio_in["turn_detection"] = resolve_turn_detection(
                p.TurnDetection.model_validate(td)
            ).model_dump()
        audio_out.setdefault("speed", 1.0)
        data["audio"] = {"input": audio_in, "output": audio_out}
        data["id"], data["object"] = self.id, "realtime.session"
        return p.SessionConfig.model_validate(data)

    def _apply_config(self, config: p.SessionConfig) -> None:
        self.config = config
        if config.audio.input.format.type != self._decoder.format_type:
            self._decoder = WireAudioDecoder(config.audio.input.format.type)
        new_td = config.audio.input.turn_detection
        if new_td is None:
            self._vad = None
            self._turn_item_id = None
        elif self._vad is None or self._vad.config != self._vad_config(new_td):
            self._vad = TurnDetector(self._vad_config(new_td))
            self._vad_offset = self._input.end
            self._turn_item_id = None
        self._actions.append(act.UpdateSession(config))

    def _vad_config(self, td: p.TurnDetection) -> VadConfig:
        return VadConfig.from_turn_detection(
            td, frame_ms=self.options.vad_frame_ms, min_speech_ms=self.options.vad_min_speech_ms
        )

    def _turn_detection(self) -> p.TurnDetection | None:
        return self.config.audio.input.turn_detection

    # --- input audio buffer ---

    def _decode_audio(self, text: str, decoder: WireAudioDecoder, param: str) -> np.ndarray:
        try:
            pcm = decoder.decode(b64decode_audio(text))
        except InvalidBase64Error as exc:
            raise ProtocolError(ErrorCode.INVALID_BASE64, f"Invalid '{param}': {exc}.", param=param) from None
        except AudioFormatError as exc:
            raise ProtocolError(
                ErrorCode.INVALID_AUDIO_LENGTH, f"Invalid '{param}': {exc}.", param=param
            ) from None
        return pcm

    def _on_append(self, event: p.InputAudioBufferAppend) -> None:
        self._append_input(self._decode_audio(event.audio, self._decoder, "audio"))

    def _append_input(self, pcm: np.ndarray) -> None:
        try:
            self._input.write(pcm)
        except BufferFullError:
            raise ProtocolError(
                ErrorCode.INPUT_AUDIO_BUFFER_FULL,
                f"The input audio buffer holds its maximum of {self.limits.max_input_buffer_ms} ms; "
                "this audio was dropped. Commit or clear the buffer.",
                param="audio",
            ) from None
        if self._vad is None:
            return
        for vad_event in self._vad.push(pcm):
            if hasattr(vad_event, "speech_start_ms"):
                self._speech_started(self._vad_offset + vad_event.audio_start_ms * SAMPLES_PER_MS)
            else:
                self._speech_stopped(self._vad_offset + vad_event.audio_end_ms * SAMPLES_PER_MS)
        if not self._vad.speaking:
            # keep only what a speech start detected later could reach back to
            cfg = self._vad.config
            keep = (cfg.prefix_padding_ms + cfg.min_speech_ms + 2 * cfg.frame_ms) * SAMPLES_PER_MS
            self._input.drop_before(self._vad_offset + self._vad.decided_ms * SAMPLES_PER_MS - keep)

    def _speech_started(self, start: int) -> None:
        start = max(start, self._input.start)
        self._input.drop_before(start)
        self._turn_item_id, self._turn_start = p.new_id("item"), start
        self._idle_deadline = None
        self._emit(
            p.InputAudioBufferSpeechStarted(
                audio_start_ms=start // SAMPLES_PER_MS, item_id=self._turn_item_id
            )
        )
        td = self._turn_detection()
        if td.interrupt_response:
            active = self._active
            if active and active.state is ResponseState.IN_PROGRESS and active.in_conversation:
                self._cancel(active, "turn_detected")
            # cancel first, then flush: nothing generated in between can slip into the output queue
            playing = active or self._last_response()
            if playing is not None and (playing is active or self._may_be_playing(playing)):
                self._actions.append(act.FlushOutputAudio(playing.id))
                self._clear_playout(playing)

    def _speech_stopped(self, end: int) -> None:
        end = min(end, self._input.end)
        item_id = self._turn_item_id or p.new_id("item")
        self._turn_item_id = None
        self._emit(p.InputAudioBufferSpeechStopped(audio_end_ms=end // SAMPLES_PER_MS, item_id=item_id))
        pcm = self._input.span(self._turn_start, end)
        self._input.drop_before(end)
        self._commit_user_audio(item_id, pcm)
        if self._turn_detection().create_response:
            if self._active is None:
                self._create_response(None, None)
            else:
                self._auto_response_queued = True

    def _on_commit(self, event: p.InputAudioBufferCommit) -> None:
        # G.711 input: the upsampler still holds the last few ms of the turn; the turn ends here
        tail = self._decoder.flush()
        if len(tail):
            self._append_input(tail)
        buffered_ms = len(self._input) / SAMPLES_PER_MS
        if buffered_ms < self.limits.min_commit_ms:
            raise IllegalTransition(
                ErrorCode.INPUT_AUDIO_BUFFER_COMMIT_EMPTY,
                f"Error committing input audio buffer: buffer too small. Expected at least "
                f"{self.limits.min_commit_ms}ms of audio, but buffer only has {buffered_ms:.2f}ms of audio.",
            )
        item_id = self._turn_item_id or p.new_id("item")
        self._turn_item_id = None
        if self._vad is not None:
            self._vad.end_turn()
        pcm = self._input.span(self._input.start, self._input.end)
        self._input.drop_before(self._input.end)
        self._commit_user_audio(item_id, pcm)

    def _on_clear(self, event: p.InputAudioBufferClear) -> None:
        self._input.clear()
        self._turn_item_id = None
        if self._vad is not None:
            self._vad.end_turn()
        self._emit(p.InputAudioBufferCleared())

    def _commit_user_audio(self, item_id: str, pcm: np.ndarray) -> None:
        item = Item(
            id=item_id,
            role="user",
            status="completed",
            parts=[p.ContentPart(type="input_audio", transcript=None)],
            audio=pcm,
        )
        previous = self._add_item(item)
        self._emit(p.InputAudioBufferCommitted(item_id=item_id, previous_item_id=previous))
        self._announce_item(item, previous)
        if len(pcm):
            self._actions.append(act.AppendUserAudio(item_id, pcm))

    def _idle_timeout(self) -> None:
        item_id = p.new_id("item")
        start, end = self._input.start, self._input.end
        pcm = self._input.span(start, end)
        self._input.drop_before(end)
        self._emit(
            p.InputAudioBufferTimeoutTriggered(
                audio_start_ms=start // SAMPLES_PER_MS, audio_end_ms=end // SAMPLES_PER_MS, item_id=item_id
            )
        )
        self._commit_user_audio(item_id, pcm)
        self._create_response(None, None)

    # --- conversation items ---

    def _add_item(self, item: Item) -> str | None:
        try:
            return self.conversation.add(item)
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
        if event.previous_item_id is not None:
            if event.previous_item_id not in self.conversation:
                raise ProtocolError(
                    ErrorCode.INVALID_VALUE,
                    f"Invalid 'previous_item_id': no item {event.previous_item_id!r} in the conversation.",
                    param="previous_item_id",
                )
            if event.previous_item_id != self.conversation.last_id:
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED_FEATURE,
                    "Inserting an item before the end of the conversation is not supported: previous_item_id "
                    "must be the last item's id (or omitted).",
                    param="previous_item_id",
                )
        spec = event.item
        item_id = spec.id or p.new_id("item")
        if item_id in self.conversation:
            raise ProtocolError(
                ErrorCode.ITEM_ID_CONFLICT, f"An item with id {item_id!r} already exists.", param="item.id"
            )
        parts: list[p.ContentPart] = []
        actions: list[act.Action] = []
        audio: list[np.ndarray] = []
        for i, part in enumerate(spec.content):
            where = f"item.content[{i}]"
            if part.type in ("input_text", "output_text"):
                if part.text is None:
                    raise ProtocolError(
                        ErrorCode.MISSING_REQUIRED_PARAMETER,
                        f"Missing required parameter: '{where}.text'.",
                        param=f"{where}.text",
                    )
                kind = {"user": act.AppendUserText, "system": act.AppendSystemText}.get(
                    spec.role, act.AppendAssistantText
                )
                actions.append(kind(item_id, part.text))
                parts.append(p.ContentPart(type=part.type, text=part.text))
            elif part.type == "input_audio":
                if part.audio is None:
                    raise ProtocolError(
                        ErrorCode.MISSING_REQUIRED_PARAMETER,
                        f"Missing required parameter: '{where}.audio'.",
                        param=f"{where}.audio",
                    )
                decoder = WireAudioDecoder(self.config.audio.input.format.type)
                pcm = self._decode_audio(part.audio, decoder, f"{where}.audio")
                pcm = np.concatenate([pcm, decoder.flush()])
                audio.append(pcm)
                actions.append(act.AppendUserAudio(item_id, pcm))
                parts.append(p.ContentPart(type="input_audio", transcript=part.transcript))
            else:  # output_audio from a client
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
        )
        previous = self._add_item(item)
        self._announce_item(item, previous)
        self._actions.extend(actions)

    def _on_item_truncate(self, event: p.ConversationItemTruncate) -> None:
        self.truncate_item(event.item_id, event.audio_end_ms, content_index=event.content_index)

    def truncate_item(self, item_id: str, audio_end_ms: int, *, content_index: int | None = None) -> None:
        """Truncate an assistant audio item (the client's ``conversation.item.truncate``; a WebRTC
        bridge that knows what was played may call it directly). Raises :class:`ProtocolError`."""
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
        active = self._active
        if active and active.item_id == item_id and active.state is ResponseState.IN_PROGRESS:
            self._cancel(active, "client_cancelled")
        transcript = Conversation.truncate(item, audio_end_ms)
        self._emit(
            p.ConversationItemTruncated(item_id=item_id, content_index=index, audio_end_ms=audio_end_ms)
        )
        self._actions.append(act.TruncateItem(item_id, audio_end_ms, transcript))

    def _on_item_delete(self, event: p.ConversationItemDelete) -> None:
        item = self.conversation.get(event.item_id)
        if item is None:
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

    def _resolve_params(self, override: p.ResponseCreateParams | None) -> act.ResponseParams:
        cfg = self.config
        o = override or p.ResponseCreateParams()
        mimo = cfg.mimo.model_dump(mode="json")
        if o.mimo is not None:
            mimo = p.merge_session_update(
                {"mimo": mimo}, {"mimo": o.mimo.model_dump(mode="json", exclude_unset=True)}
            )["mimo"]
        mimo_cfg = p.MimoConfig.model_validate(mimo)
        out = o.audio.output if o.audio and o.audio.output else None
        fmt = (out.format if out and out.format else cfg.audio.output.format).type
        max_tokens = o.max_output_tokens if o.max_output_tokens is not None else cfg.max_output_tokens
        sampling = mimo_cfg.sampling or p.SamplingConfig()
        return act.ResponseParams(
            output_modalities=p.resolve_modalities(o.output_modalities or cfg.output_modalities),
            instructions=o.instructions if o.instructions is not None else (cfg.instructions or ""),
            max_output_tokens=None if max_tokens in (None, "inf") else max_tokens,
            conversation=o.conversation or "auto",
            metadata=o.metadata,
            voice=(out.voice if out and out.voice else cfg.audio.output.voice),
            speed=cfg.audio.output.speed or 1.0,
            output_format=fmt,
            interleave=p.parse_interleave(mimo_cfg.interleave) if mimo_cfg.interleave else None,
            min_output_tokens=mimo_cfg.min_output_tokens or 0,
            text_sampling=sampling.text or p.SamplingParams(),
            speech_sampling=sampling.speech or p.SamplingParams(),
            codec=mimo_cfg.codec or p.CodecSchedule(),
            task=mimo_cfg.task or "spoken_dialogue",
            thinking=bool(mimo_cfg.thinking),
        )

    def _response_model(self, resp: _Response, **fields: Any) -> p.RealtimeResponse:
        params = resp.params
        fmt = {
            "type": params.output_format,
            **({"rate": SAMPLE_RATE} if params.output_format == "audio/pcm" else {}),
        }
        base = {
            "id": resp.id,
            "object": "realtime.response",
            "status": "in_progress",
            "status_details": None,
            "output": [],
            "conversation_id": self.conversation_id if resp.in_conversation else None,
            "output_modalities": list(params.output_modalities),
            "max_output_tokens": "inf" if params.max_output_tokens is None else params.max_output_tokens,
            "audio": {"output": {"format": fmt, "voice": params.voice}},
            "usage": None,
            "metadata": params.metadata,
        }
        return p.RealtimeResponse.model_validate({**base, **fields})

    def _create_response(self, override: p.ResponseCreateParams | None, event_id: str | None) -> None:
        if self._active is not None:
            raise IllegalTransition(
                ErrorCode.CONVERSATION_ALREADY_HAS_ACTIVE_RESPONSE,
                f"Conversation already has an active response in progress: {self._active.id}. Wait until the "
                "response is finished before creating a new one.",
                event_id=event_id,
            )
        params = self._resolve_params(override)
        resp = _Response(id=p.new_id("resp"), item_id=p.new_id("item"), params=params)
        if params.audio:
            resp.encoder = WireAudioEncoder(params.output_format)
        self._responses[resp.id] = resp
        self._active = resp
        self._idle_deadline = None
        self._emit(p.ResponseCreated(response=self._response_model(resp)))
        self._actions.append(act.CreateResponse(resp.id, resp.item_id, params))

    def _on_response_cancel(self, event: p.ResponseCancel) -> None:
        active = self._active
        if active is None or active.state is not ResponseState.IN_PROGRESS:
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

    def _cancel(self, resp: _Response, reason: act.CancelReason) -> None:
        resp.state, resp.cancel_reason, resp.cancel_at = ResponseState.CANCELLING, reason, self.clock()
        self._actions.append(act.CancelResponse(resp.id, reason))

    def _on_output_clear(self, event: p.OutputAudioBufferClear) -> None:
        last = self._active or self._last_response()
        self._actions.append(act.FlushOutputAudio(last.id if last else None))
        if last is not None:
            last.playing = False
        self._emit(p.OutputAudioBufferCleared(response_id=last.id if last else None))

    def _clear_playout(self, resp: _Response | None) -> None:
        """WebRTC: tell the client that playback of ``resp`` was cut off (barge-in)."""
        if self.options.transport is Transport.WEBRTC and resp is not None and resp.playing:
            resp.playing = False
            self._emit(p.OutputAudioBufferCleared(response_id=resp.id))

    def _may_be_playing(self, resp: _Response) -> bool:
        """Whether output audio of a finished response may still be queued or playing (real-time
        playback from its first audio), or the transport says it is (WebRTC)."""
        if resp.playing:
            return True
        if resp.first_audio_at is None:
            return False
        return self.clock() < resp.first_audio_at + resp.audio_samples / SAMPLE_RATE

    def _last_response(self) -> _Response | None:
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

    def _response(self, response_id: str) -> _Response | None:
        """The response to feed, or None when its output is to be dropped (cancelling or done)."""
        resp = self._responses.get(response_id)
        if resp is None:
            raise SessionStateError(f"unknown response {response_id!r}")
        return resp if resp.state is ResponseState.IN_PROGRESS else None

    def _open(self, resp: _Response) -> None:
        if resp.opened:
            return
        resp.opened = True
        item = self._assistant_item(resp, "in_progress", with_content=False)
        model = item.to_model()
        self._emit(p.ResponseOutputItemAdded(response_id=resp.id, output_index=0, item=model))
        if resp.in_conversation:
            try:
                previous = self._add_item(item)
            except ProtocolError as err:  # conversation full: the output stays out of band
                self._error(err)
            else:
                self._announce_item(item, previous, done=False)
        part = {"type": "audio", "transcript": ""} if resp.params.audio else {"type": "text", "text": ""}
        self._emit(p.ResponseContentPartAdded(**self._address(resp), part=p.ResponsePart(**part)))

    def _assistant_item(self, resp: _Response, status: str, *, with_content: bool = True) -> Item:
        item = self.conversation.get(resp.item_id) if resp.in_conversation else None
        if item is None:
            item = Item(id=resp.item_id, role="assistant", status=status, parts=[], response_id=resp.id)
        item.status = status
        if with_content:
            if resp.params.audio:
                item.parts = [p.ContentPart(type="output_audio", transcript=resp.text)]
            else:
                item.parts = [p.ContentPart(type="output_text", text=resp.text)]
            item.audio_samples = resp.audio_samples
        return item

    @staticmethod
    def _address(resp: _Response) -> dict[str, Any]:
        return {"response_id": resp.id, "item_id": resp.item_id, "output_index": 0, "content_index": 0}

    def response_started(self, response_id: str) -> None:
        """The engine began generating: announces the output item and its content part."""
        resp = self._response(response_id)
        if resp is not None:
            self._open(resp)

    def response_text(self, response_id: str, text_delta: str) -> None:
        """Text from the engine: the transcript of the speech for audio responses, the answer for
        text-only ones."""
        resp = self._response(response_id)
        if resp is None or not text_delta:
            return
        self._open(resp)
        resp.text += text_delta
        item = self.conversation.get(resp.item_id)
        if resp.params.audio:
            if item is not None:
                item.parts = [p.ContentPart(type="output_audio", transcript=resp.text)]
                item.audio_samples = resp.audio_samples
                Conversation.record_text(item, len(resp.text))
            self._emit(p.ResponseOutputAudioTranscriptDelta(**self._address(resp), delta=text_delta))
        else:
            self._emit(p.ResponseOutputTextDelta(**self._address(resp), delta=text_delta))

    def response_audio(self, response_id: str, pcm16: bytes | np.ndarray) -> None:
        """Speech from the engine, pcm16 mono at 24 kHz; sent as ``response.output_audio.delta`` in
        the response's output format (WebSocket) or only accounted (WebRTC: the track carries it)."""
        resp = self._response(response_id)
        if resp is None:
            return
        if not resp.params.audio:
            raise SessionStateError(f"audio for text-only response {response_id!r}")
        pcm = as_pcm16(pcm16)
        if not len(pcm):
            return
        self._open(resp)
        resp.audio_samples += len(pcm)
        item = self.conversation.get(resp.item_id)
        if item is not None:
            item.audio_samples = resp.audio_samples
        if resp.first_audio_at is None:
            resp.first_audio_at = self.clock()
            self._audio_out_started = True
            if self.options.transport is Transport.WEBRTC:
                resp.playing = True
                self._emit(p.OutputAudioBufferStarted(response_id=resp.id))
        if self.options.transport is Transport.WEBSOCKET:
            payload = resp.encoder.encode(pcm)
            if payload:
                self._emit(p.ResponseOutputAudioDelta(**self._address(resp), delta=b64encode_audio(payload)))

    def response_done(
        self,
        response_id: str,
        status: str = "completed",
        reason: str | None = None,
        usage: dict[str, Any] | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        """The engine finished (``completed``; ``incomplete`` with reason ``max_output_tokens``;
        or anything after a ``CancelResponse``, which is reported as ``cancelled``)."""
        resp = self._responses.get(response_id)
        if resp is None:
            raise SessionStateError(f"unknown response {response_id!r}")
        if resp.state is ResponseState.DONE:
            return  # already finished (cancel grace expired)
        if resp.state is ResponseState.CANCELLING:
            status, reason = "cancelled", resp.cancel_reason
        if status not in ("completed", "incomplete", "cancelled", "failed"):
            raise SessionStateError(f"invalid response status {status!r}")
        self._finish(resp, status, reason, usage, timings)

    def response_failed(self, response_id: str, message: str) -> None:
        """The engine could not produce the response: ``response.done`` with status ``failed``
        and an ``error`` event (type ``server_error``)."""
        resp = self._responses.get(response_id)
        if resp is None:
            raise SessionStateError(f"unknown response {response_id!r}")
        if resp.state is ResponseState.DONE:
            return
        error = {"type": ErrorType.SERVER.value, "code": ErrorCode.RESPONSE_FAILED.value, "message": message}
        self._finish(resp, "failed", None, None, None, error=error)
        self._error(
            ProtocolError(
                ErrorCode.RESPONSE_FAILED, f"Response {resp.id} failed: {message}", type=ErrorType.SERVER
            )
        )

    def drop_item(self, item_id: str) -> None:
        """The engine removed an item to fit the context (``truncation: auto``): the client is told
        with ``conversation.item.deleted``, as if it had deleted the item itself."""
        if self.conversation.get(item_id) is None:
            return
        self.conversation.remove(item_id)
        self._emit(p.ConversationItemDeleted(item_id=item_id))

    def output_audio_drained(self, response_id: str) -> None:
        """The transport finished playing a response's audio (WebRTC: ``output_audio_buffer.stopped``).
        Also re-arms the idle timeout from this moment."""
        resp = self._responses.get(response_id)
        if resp is None:
            raise SessionStateError(f"unknown response {response_id!r}")
        if self.options.transport is Transport.WEBRTC and resp.playing:
            resp.playing = False
            self._emit(p.OutputAudioBufferStopped(response_id=resp.id))
        if resp.state is ResponseState.DONE and self._active is None:
            self._arm_idle(self.clock())

    def _finish(
        self,
        resp: _Response,
        status: str,
        reason: str | None,
        usage: dict[str, Any] | None,
        timings: dict[str, float] | None,
        *,
        error: dict[str, Any] | None = None,
    ) -> None:
        output: list[p.ConversationItem] = []
        if resp.opened:
            addr = self._address(resp)
            if resp.params.audio:
                tail = resp.encoder.flush() if resp.state is ResponseState.IN_PROGRESS else b""
                if tail and self.options.transport is Transport.WEBSOCKET:
                    self._emit(p.ResponseOutputAudioDelta(**addr, delta=b64encode_audio(tail)))
                self._emit(p.ResponseOutputAudioDone(**addr))
                self._emit(p.ResponseOutputAudioTranscriptDone(**addr, transcript=resp.text))
                part = p.ResponsePart(type="audio", transcript=resp.text)
            else:
                self._emit(p.ResponseOutputTextDone(**addr, text=resp.text))
                part = p.ResponsePart(type="text", text=resp.text)
            self._emit(p.ResponseContentPartDone(**addr, part=part))
            item = self._assistant_item(resp, "completed" if status == "completed" else "incomplete")
            model = item.to_model()
            self._emit(p.ResponseOutputItemDone(response_id=resp.id, output_index=0, item=model))
            if resp.in_conversation and resp.item_id in self.conversation:
                previous = self._previous_id(resp.item_id)
                self._emit(p.ConversationItemDone(previous_item_id=previous, item=model))
            output.append(model)
        resp.state = ResponseState.DONE
        details = {"type": status, "reason": reason, "error": error}
        mimo = {
            "timings": dict(timings) if timings else None,
            "audio_ms": resp.audio_samples * 1000 / SAMPLE_RATE,
        }
        fields: dict[str, Any] = {"status": status, "status_details": details, "output": output, "mimo": mimo}
        if usage is not None:
            fields["usage"] = usage
        self._emit(p.ResponseDone(response=self._response_model(resp, **fields)))
        if self._active is resp:
            self._active = None
        # idle timeout counts from the end of playback: real-time playback from the first audio
        now = self.clock()
        end = (
            now
            if resp.first_audio_at is None
            else max(now, resp.first_audio_at + resp.audio_samples / SAMPLE_RATE)
        )
        if resp.in_conversation:
            self._arm_idle(end)
        self._prune_responses()
        if self._auto_response_queued and self.state is SessionState.ACTIVE:
            self._auto_response_queued = False
            self._create_response(None, None)

    def _previous_id(self, item_id: str) -> str | None:
        previous = None
        for item in self.conversation:
            if item.id == item_id:
                return previous
            previous = item.id
        return None

    def _arm_idle(self, playback_end: float) -> None:
        td = self._turn_detection()
        if td is not None and td.idle_timeout_ms:
            self._idle_deadline = playback_end + td.idle_timeout_ms / 1000

    def _prune_responses(self, keep: int = 16) -> None:
        # finished responses are kept briefly so late engine feedback for them is recognised
        done = [rid for rid, r in self._responses.items() if r.state is ResponseState.DONE]
        for rid in done[:-keep]:
            del self._responses[rid]
