"""What the sans-I/O session asks the engine bridge to do.

:class:`~streaming.session.RealtimeSession` emits these (drain them with ``take_actions()``), in
the order the bridge must apply them. They are plain frozen dataclasses; audio is pcm16 at 24 kHz.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from streaming.protocol import CodecSchedule, SamplingParams, SessionConfig

CancelReason = Literal["turn_detected", "client_cancelled"]


@dataclasses.dataclass(frozen=True)
class ResponseParams:
    """Everything the engine needs to generate one response, session settings and per-response
    overrides already resolved."""

    output_modalities: tuple[str, ...]  # ("audio",): speech plus its transcript; ("text",): text only
    instructions: str
    max_output_tokens: int | None  # None: no limit ("inf")
    conversation: Literal["auto", "none"]  # "none": out of band, the output joins no conversation
    metadata: dict[str, str] | None
    voice: str | None  # a name or a custom voice's id, echoed only: MiMo has no named voices
    speed: float  # as requested; applying it (a post-processing time stretch) is up to the bridge
    output_format: str  # wire format of this response's audio deltas (informational)
    interleave: tuple[int, int] | None  # (text patches, speech patches), or None: the model decides
    min_output_tokens: int  # stop tokens are not allowed before this many patches (official min_new_tokens)
    text_sampling: SamplingParams
    speech_sampling: SamplingParams
    codec: CodecSchedule  # null fields: engine default
    task: str
    thinking: bool

    @property
    def audio(self) -> bool:
        return "audio" in self.output_modalities


# The Append* actions add an item after the item ``after``: None appends, ``""`` puts it first
# (``previous_item_id: "root"``), an item id inserts it right after that item.


@dataclasses.dataclass(frozen=True, eq=False)
class AppendUserAudio:
    """Add user speech to the conversation (a committed turn or a created ``input_audio`` part).
    Several actions with the same ``item_id`` are parts of one item, in order."""

    item_id: str
    pcm: np.ndarray  # int16, 24 kHz, mono
    transcribe: bool = False  # report its transcript (``transcription_delta`` / ``_done`` / ``_failed``)
    after: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class StreamUserAudio:
    """Streaming input: the next part of a user turn still being spoken (a server-VAD turn after
    ``speech_started``), for the engine to encode and prefill ahead of its commit. It adds nothing
    to the conversation: the turn's ``AppendUserAudio`` does, with all of its audio."""

    item_id: str
    pcm: np.ndarray  # int16, 24 kHz, mono


@dataclasses.dataclass(frozen=True)
class Speculate:
    """The open turn ``item_id`` may have ended after its first ``samples`` samples of streamed audio
    (a candidate end): start its answer with ``params`` and hold it. The turn's ``AppendUserAudio``
    then ``CreateResponse`` with the same params release it; nothing of it reaches the client
    otherwise. ``end_in_s``: the turn cannot end sooner than that (the rest of the silence window);
    the engine starts the held answer just in time for it (``ends_early``: a score may end the turn
    sooner; the engine prefills it at once)."""

    item_id: str
    samples: int
    params: ResponseParams
    end_in_s: float = 0.0
    ends_early: bool = False


@dataclasses.dataclass(frozen=True)
class AbandonSpeculation:
    """The held answer to ``item_id`` is not wanted (the user spoke again, the turn was cleared)."""

    item_id: str


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreTurn:
    """semantic_vad: run the end-of-turn model on the open turn, ``audio16k`` (float, 16 kHz), away
    from the event loop (a model call takes 60-200 ms on a CPU), and report its P(end of turn) with
    ``RealtimeSession.turn_scored(request_id, p)`` (None when the call failed: the silence window
    decides). Until then the session's turn detection waits; the audio that comes meanwhile is
    taken and decided after the answer."""

    request_id: int
    audio16k: np.ndarray


@dataclasses.dataclass(frozen=True)
class AppendUserText:
    item_id: str
    text: str
    after: str | None = None


@dataclasses.dataclass(frozen=True)
class AppendSystemText:
    item_id: str
    text: str
    after: str | None = None


@dataclasses.dataclass(frozen=True)
class AppendAssistantText:
    item_id: str
    text: str
    after: str | None = None


@dataclasses.dataclass(frozen=True)
class CreateResponse:
    """Start generating. Report back with ``response_started`` / ``response_text`` /
    ``response_audio`` / ``response_done`` (or ``response_failed``) for this ``response_id``.
    ``item_id`` is the assistant item the output will become."""

    response_id: str
    item_id: str
    params: ResponseParams


@dataclasses.dataclass(frozen=True)
class CancelResponse:
    """Stop generating ``response_id``. The session has already finished it; its late output and
    ``response_done`` are ignored."""

    response_id: str
    reason: CancelReason


@dataclasses.dataclass(frozen=True)
class TruncateItem:
    """The listener heard ``audio_end_ms`` of this assistant item: roll the model's context back
    to that point. ``transcript`` is the part of the transcript kept (an approximation, see
    ``Conversation.truncate``)."""

    item_id: str
    audio_end_ms: int
    transcript: str


@dataclasses.dataclass(frozen=True)
class DeleteItem:
    item_id: str


@dataclasses.dataclass(frozen=True)
class FlushOutputAudio:
    """Drop queued output audio now (a cancel, barge-in, ``output_audio_buffer.clear``). With
    ``cut``, a transport that plays the audio itself (WebRTC) reports what it played of each response
    it cut short (``output_audio_cut``), so the item is truncated to what was heard."""

    response_id: str | None
    cut: bool = True
    # a response already generated but still playing was stopped (the reason): for the client it was
    # still running, so its response.done, if it still waits behind the dropped audio, says cancelled
    cancelled: str | None = None


@dataclasses.dataclass(frozen=True)
class UpdateSession:
    """The session configuration changed (full, resolved configuration). ``voice_prompt`` is set
    when the voice prompt changed: pcm16 24 kHz, empty to clear it."""

    config: SessionConfig
    voice_prompt: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Close:
    """Close the connection (after sending the pending events)."""

    reason: str


Action = (
    AppendUserAudio
    | StreamUserAudio
    | Speculate
    | AbandonSpeculation
    | ScoreTurn
    | AppendUserText
    | AppendSystemText
    | AppendAssistantText
    | CreateResponse
    | CancelResponse
    | TruncateItem
    | DeleteItem
    | FlushOutputAudio
    | UpdateSession
    | Close
)
