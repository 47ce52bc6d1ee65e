"""The input audio buffer of one session, with server VAD: decoded audio in, turns out.

Positions are absolute input samples at 24 kHz since the session started, so ``audio_start_ms`` /
``audio_end_ms`` count from the first audio written this session (OpenAI's convention). The buffer
is bounded (appends beyond ``max_ms`` are refused with :class:`BufferFullError`); while VAD hears
silence it keeps only what a later speech start can reach back to (prefix padding plus the
detector's confirmation window), so a long silent stream never fills it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from streaming.audio import (
    SAMPLE_RATE,
    BufferFullError,
    Overflow,
    PcmBuffer,
    WireAudioDecoder,
    b64decode_audio,
)
from streaming.protocol import new_id
from streaming.vad import ScoreNeeded, SpeechPaused, SpeechResumed, SpeechStarted, TurnDetector, VadConfig, VadEvent

SAMPLES_PER_MS = SAMPLE_RATE // 1000


@dataclasses.dataclass(frozen=True)
class TurnStarted:
    item_id: str
    audio_start_ms: int  # includes the prefix padding


@dataclasses.dataclass(frozen=True)
class TurnPaused:
    """A candidate end (``streaming.vad.SpeechPaused``): the turn may be over; it is still open."""

    item_id: str
    audio_end_ms: int  # the audio so far, [audio_start_ms, audio_end_ms), is the turn if it ends here


@dataclasses.dataclass(frozen=True)
class TurnResumed:
    """Speech again after a :class:`TurnPaused` (``streaming.vad.SpeechResumed``): it was not the end."""

    item_id: str
    speech_ms: int


@dataclasses.dataclass(frozen=True, eq=False)
class TurnEnded:
    item_id: str
    audio_end_ms: int  # includes the silence window
    pcm: np.ndarray  # the turn's audio, [audio_start_ms, audio_end_ms)


@dataclasses.dataclass(frozen=True, eq=False)
class TurnScoreNeeded:
    """semantic_vad: the end-of-turn model must score the open turn (``streaming.vad.ScoreNeeded``);
    the detector waits for :meth:`InputAudio.scored`."""

    item_id: str
    request: ScoreNeeded


TurnEvent = TurnStarted | TurnPaused | TurnResumed | TurnEnded | TurnScoreNeeded


class InputAudio:
    def __init__(self, max_ms: int, format_type: str = "audio/pcm") -> None:
        self.buffer = PcmBuffer(max_ms * SAMPLES_PER_MS, Overflow.REFUSE)
        self.decoder = WireAudioDecoder(format_type)
        self.vad: TurnDetector | None = None
        self._vad_offset = 0  # absolute sample at which the current detector started
        self.turn_item_id: str | None = None  # item id announced by speech_started, until the turn ends
        self._turn_start = 0
        self._streamed = 0  # absolute sample up to which the open turn's audio went out (:meth:`stream`)

    @property
    def buffered_ms(self) -> float:
        return len(self.buffer) / SAMPLES_PER_MS

    @property
    def speaking(self) -> bool:
        return self.vad is not None and self.vad.speaking

    def set_format(self, format_type: str) -> None:
        if format_type != self.decoder.format_type:
            self.decoder = WireAudioDecoder(format_type)

    def set_vad(self, config: VadConfig | None) -> None:
        """Turn server VAD on (or retune it) or off. Retuning restarts the detector at the current
        position; an open turn is dropped without a stop event."""
        if config is None:
            self.vad, self.turn_item_id = None, None
        elif self.vad is None or self.vad.config != config:
            self.vad, self.turn_item_id = TurnDetector(config, defer_scores=True), None
            self._vad_offset = self.buffer.end

    def decode(self, text: str) -> np.ndarray:
        """base64 in the session's input format -> pcm16 24 kHz. Raises ``AudioFormatError``s."""
        return self.decoder.decode(b64decode_audio(text))

    def append(self, pcm: np.ndarray) -> list[TurnEvent]:
        """Buffer audio and run VAD on it. Without VAD, raises ``BufferFullError`` when the buffer
        is full (nothing is taken then). With VAD, a turn that outgrows the buffer ends there (as
        if the speaker had paused) and the audio goes on into the next turn."""
        turns: list[TurnEvent] = []
        try:
            self.buffer.write(pcm)
        except BufferFullError:
            if not self.speaking:
                raise
            item_id, self.turn_item_id = self.turn_item_id or new_id("item"), None
            end = self.buffer.end
            turns.append(TurnEnded(item_id, end // SAMPLES_PER_MS, self.buffer.span(self._turn_start, end)))
            self.buffer.drop_before(end)
            self.vad.end_turn()
            self.buffer.write(pcm)
        if self.vad is None:
            return turns
        return turns + self._turns(self.vad.push(pcm))

    def scored(self, request_id: int, probability: float | None) -> list[TurnEvent]:
        """The end-of-turn model's answer to a :class:`TurnScoreNeeded` (None: it failed), and the
        turns of the audio that waited for it."""
        if self.vad is None:
            return []
        return self._turns(self.vad.scored(request_id, probability))

    def _turns(self, events: list[VadEvent]) -> list[TurnEvent]:
        turns: list[TurnEvent] = []
        for event in events:
            if isinstance(event, SpeechStarted):
                start = max(self._vad_offset + event.audio_start_ms * SAMPLES_PER_MS, self.buffer.start)
                self.buffer.drop_before(start)
                self.turn_item_id, self._turn_start = new_id("item"), start
                turns.append(TurnStarted(self.turn_item_id, start // SAMPLES_PER_MS))
            elif isinstance(event, SpeechPaused | SpeechResumed | ScoreNeeded):
                if self.turn_item_id is None:  # the turn was ended by the buffer limit meanwhile
                    continue
                offset_ms = self._vad_offset // SAMPLES_PER_MS
                if isinstance(event, SpeechPaused):
                    turns.append(TurnPaused(self.turn_item_id, offset_ms + event.audio_end_ms))
                elif isinstance(event, SpeechResumed):
                    turns.append(TurnResumed(self.turn_item_id, offset_ms + event.speech_ms))
                else:
                    turns.append(TurnScoreNeeded(self.turn_item_id, event))
            else:
                end = min(self._vad_offset + event.audio_end_ms * SAMPLES_PER_MS, self.buffer.end)
                item_id, self.turn_item_id = self.turn_item_id or new_id("item"), None
                pcm_turn = self.buffer.span(self._turn_start, end)
                self.buffer.drop_before(end)
                turns.append(TurnEnded(item_id, end // SAMPLES_PER_MS, pcm_turn))
        if not self.vad.speaking:
            cfg = self.vad.config
            keep = (cfg.prefix_padding_ms + cfg.min_speech_ms + 2 * cfg.frame_ms) * SAMPLES_PER_MS
            self.buffer.drop_before(self._vad_offset + self.vad.decided_ms * SAMPLES_PER_MS - keep)
        return turns

    def turn_samples(self, audio_end_ms: int) -> int:
        """Samples of the open turn from its start up to ``audio_end_ms`` (a :class:`TurnPaused`'s),
        in the audio :meth:`stream` hands out."""
        offset_ms = self._vad_offset // SAMPLES_PER_MS
        return self._vad_offset + (audio_end_ms - offset_ms) * SAMPLES_PER_MS - self._turn_start

    def stream(self, min_ms: int = 0) -> tuple[str, np.ndarray] | None:
        """Streaming input: the open turn's audio not handed out yet, from its start (prefix padding
        included), as (item id, pcm16), once there is at least ``min_ms`` of it; None outside a turn."""
        if self.turn_item_id is None:
            return None
        start, end = max(self._turn_start, self._streamed), self.buffer.end
        if end <= start or end - start < min_ms * SAMPLES_PER_MS:
            return None
        self._streamed = end
        return self.turn_item_id, self.buffer.span(start, end)

    def flush_decoder(self) -> None:
        """End of a manually committed turn: take the few ms the G.711 upsampler still holds."""
        tail = self.decoder.flush()
        if len(tail):
            self.append(tail)

    def take(self) -> tuple[str, int, int, np.ndarray]:
        """Everything buffered, as one item: (item id, start ms, end ms, pcm). Ends an open turn."""
        item_id, self.turn_item_id = self.turn_item_id or new_id("item"), None
        if self.vad is not None:
            self.vad.end_turn()
        start, end = self.buffer.start, self.buffer.end
        pcm = self.buffer.span(start, end)
        self.buffer.drop_before(end)
        return item_id, start // SAMPLES_PER_MS, end // SAMPLES_PER_MS, pcm

    def clear(self) -> None:
        self.buffer.clear()
        self.turn_item_id = None
        if self.vad is not None:
            self.vad.end_turn()
