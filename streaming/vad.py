"""Server VAD: webrtcvad on a 16 kHz view of the input, and a turn detector on its frame decisions.

Semantics (all times in ms of audio, counted from the first sample written to the detector, so
they do not depend on when or in what chunks audio arrives):

- A frame (``frame_ms``: 10, 20 or 30) is *voiced* when webrtcvad says speech **and** its RMS level
  is at least ``energy_floor_dbfs``. OpenAI's ``threshold`` (0..1, "higher needs louder audio")
  sets both: webrtcvad's aggressiveness ``min(3, int(4 * threshold))`` and the energy floor
  ``-70 + 50 * threshold`` dBFS (-45 dBFS at the default 0.5).
- Speech starts after ``min_speech_ms`` of consecutive voiced frames. ``SpeechStarted`` reports
  ``speech_start_ms`` (the first voiced frame) and ``audio_start_ms = speech_start_ms -
  prefix_padding_ms`` (not below 0): the span the user item will hold, as OpenAI's
  ``input_audio_buffer.speech_started.audio_start_ms`` does.
- Speech stops after ``silence_duration_ms`` of consecutive unvoiced frames. ``SpeechStopped``
  reports ``audio_end_ms``, the end of the frame that completed the silence window (so it
  includes the window, as OpenAI's ``speech_stopped.audio_end_ms`` does), and ``speech_end_ms``,
  the end of the last voiced frame.
- Between the two, for speculation (the engine may start an answer that it holds back until the
  turn is confirmed): ``SpeechPaused`` after ``candidate_ms`` of consecutive unvoiced frames (a
  candidate end; only when ``candidate_ms`` is shorter than the silence window), and
  ``SpeechResumed`` when a voiced frame comes after a ``SpeechPaused`` and before the turn ended
  (the candidate was not the end). Every ``SpeechPaused`` is followed by exactly one
  ``SpeechResumed`` or ``SpeechStopped``, unless the caller ends the turn (:meth:`end_turn`).
- ``semantic_vad`` has no turn model here: it runs as server VAD with a silence window derived
  from ``eagerness`` (low 1200 ms, medium/auto 700 ms, high 350 ms). OpenAI's semantic maxima
  (8 / 4 / 2 s) are not used: without a model deciding that the user is done, every turn would
  wait that long.

Streaming equals offline: the resampler (soxr, exact across chunkings) and the framer carry their
state, so pushing audio in any chunking yields the same events as one push of the whole signal.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import webrtcvad

from streaming.audio import SAMPLE_RATE, Framer, StreamResampler, as_pcm16
from streaming.protocol.session_config import TurnDetection

VAD_RATE = 16000
FRAME_MS_CHOICES = (10, 20, 30)

#: OpenAI's server_vad defaults
DEFAULT_THRESHOLD = 0.5
DEFAULT_PREFIX_PADDING_MS = 300
DEFAULT_SILENCE_DURATION_MS = 500
#: our additions
DEFAULT_MIN_SPEECH_MS = 100  # webrtcvad's false positives on clicks and breaths are 1-3 frames long
DEFAULT_FRAME_MS = 20
DEFAULT_CANDIDATE_MS = 200  # a pause this long is worth speculating on (humans answer in ~200 ms)
SEMANTIC_SILENCE_MS = {"low": 1200, "medium": 700, "auto": 700, "high": 350}


@dataclasses.dataclass(frozen=True)
class VadConfig:
    threshold: float = DEFAULT_THRESHOLD
    prefix_padding_ms: int = DEFAULT_PREFIX_PADDING_MS
    silence_duration_ms: int = DEFAULT_SILENCE_DURATION_MS
    min_speech_ms: int = DEFAULT_MIN_SPEECH_MS
    frame_ms: int = DEFAULT_FRAME_MS
    candidate_ms: int = DEFAULT_CANDIDATE_MS  # 0: no SpeechPaused / SpeechResumed

    def __post_init__(self) -> None:
        if self.frame_ms not in FRAME_MS_CHOICES:
            raise ValueError(f"frame_ms must be one of {FRAME_MS_CHOICES} (webrtcvad), got {self.frame_ms}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")

    @property
    def mode(self) -> int:
        """webrtcvad aggressiveness, 0 (least) to 3 (most eager to call a frame non-speech)."""
        return min(3, int(4 * self.threshold))

    @property
    def energy_floor_dbfs(self) -> float:
        return -70.0 + 50.0 * self.threshold

    @classmethod
    def from_turn_detection(cls, td: TurnDetection, **overrides: int) -> VadConfig:
        """Map OpenAI's ``turn_detection`` object (server_vad or semantic_vad) to a VAD config."""
        if td.type == "semantic_vad":
            return cls(silence_duration_ms=SEMANTIC_SILENCE_MS[td.eagerness or "auto"], **overrides)
        return cls(
            threshold=DEFAULT_THRESHOLD if td.threshold is None else td.threshold,
            prefix_padding_ms=DEFAULT_PREFIX_PADDING_MS
            if td.prefix_padding_ms is None
            else td.prefix_padding_ms,
            silence_duration_ms=(
                DEFAULT_SILENCE_DURATION_MS if td.silence_duration_ms is None else td.silence_duration_ms
            ),
            **overrides,
        )


def resolve_turn_detection(td: TurnDetection | None) -> TurnDetection | None:
    """The turn_detection object with OpenAI's defaults filled in (what ``session.updated`` shows)."""
    if td is None:
        return None
    filled = td.model_dump()
    filled["create_response"] = True if td.create_response is None else td.create_response
    filled["interrupt_response"] = True if td.interrupt_response is None else td.interrupt_response
    if td.type == "server_vad":
        filled["threshold"] = DEFAULT_THRESHOLD if td.threshold is None else td.threshold
        filled["prefix_padding_ms"] = (
            DEFAULT_PREFIX_PADDING_MS if td.prefix_padding_ms is None else td.prefix_padding_ms
        )
        filled["silence_duration_ms"] = (
            DEFAULT_SILENCE_DURATION_MS if td.silence_duration_ms is None else td.silence_duration_ms
        )
        del filled["eagerness"]
    else:
        filled["eagerness"] = td.eagerness or "auto"
        for key in ("threshold", "prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms"):
            del filled[key]
    return TurnDetection.model_validate(filled)


@dataclasses.dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int  # speech_start_ms minus the prefix padding
    speech_start_ms: int


@dataclasses.dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: int  # includes the silence window
    speech_end_ms: int


@dataclasses.dataclass(frozen=True)
class SpeechPaused:
    """A candidate end of turn: ``candidate_ms`` of silence, the turn still open."""

    audio_end_ms: int  # end of the frame that completed the candidate window
    speech_end_ms: int


@dataclasses.dataclass(frozen=True)
class SpeechResumed:
    """Speech again after a ``SpeechPaused``, before the turn ended."""

    speech_ms: int  # start of the voiced frame


VadEvent = SpeechStarted | SpeechStopped | SpeechPaused | SpeechResumed


class FrameClassifier:
    """pcm16 at ``sample_rate`` in, one voiced/unvoiced decision per ``frame_ms`` frame out."""

    def __init__(self, config: VadConfig, sample_rate: int = SAMPLE_RATE) -> None:
        self.config = config
        self._vad = webrtcvad.Vad(config.mode)
        self._resampler = StreamResampler(sample_rate, VAD_RATE)
        self._framer = Framer(VAD_RATE * config.frame_ms // 1000)
        self._floor = 32768.0**2 * 10 ** (config.energy_floor_dbfs / 10)  # mean square at the floor
        self.frames_done = 0

    def push(self, pcm16: np.ndarray) -> np.ndarray:
        frames = self._framer.push(self._resampler.process(as_pcm16(pcm16)))  # (n, frame_samples)
        voiced = np.zeros(len(frames), dtype=bool)
        for i, frame in enumerate(frames):
            loud = float(np.mean(frame.astype(np.float64) ** 2)) >= self._floor
            voiced[i] = loud and self._vad.is_speech(frame.tobytes(), VAD_RATE)
        self.frames_done += len(frames)
        return voiced


class TurnState(enum.Enum):
    SILENCE = "silence"
    SPEECH = "speech"


class TurnDetector:
    """Turns frame decisions into speech start/stop events (see the module docstring)."""

    def __init__(self, config: VadConfig, sample_rate: int = SAMPLE_RATE) -> None:
        self.config = config
        self.sample_rate = sample_rate
        self._frames = FrameClassifier(config, sample_rate)
        self.state = TurnState.SILENCE
        self._run = 0  # consecutive voiced frames (in SILENCE) or unvoiced frames (in SPEECH)
        self._last_voiced_end_ms = 0
        self._paused = False  # a SpeechPaused is open (no SpeechResumed / SpeechStopped yet)

    @property
    def speaking(self) -> bool:
        return self.state is TurnState.SPEECH

    @property
    def decided_ms(self) -> int:
        """Audio time up to which frames have been classified."""
        return self._frames.frames_done * self.config.frame_ms

    def push(self, pcm16: np.ndarray) -> list[VadEvent]:
        events: list[VadEvent] = []
        frame_ms = self.config.frame_ms
        first = self._frames.frames_done
        for i, voiced in enumerate(self._frames.push(pcm16)):
            start_ms = (first + i) * frame_ms
            end_ms = start_ms + frame_ms
            if voiced:
                self._last_voiced_end_ms = end_ms
            if self.state is TurnState.SILENCE:
                self._run = self._run + 1 if voiced else 0
                if self._run * frame_ms >= self.config.min_speech_ms:
                    speech_start = end_ms - self._run * frame_ms
                    events.append(
                        SpeechStarted(max(0, speech_start - self.config.prefix_padding_ms), speech_start)
                    )
                    self.state, self._run = TurnState.SPEECH, 0
            else:
                events += self._in_speech(voiced, start_ms, end_ms)
        return events

    def _in_speech(self, voiced: bool, start_ms: int, end_ms: int) -> list[VadEvent]:
        cfg = self.config
        if voiced:
            self._run = 0
            if self._paused:
                self._paused = False
                return [SpeechResumed(start_ms)]
            return []
        self._run += 1
        silence_ms = self._run * cfg.frame_ms
        if silence_ms >= cfg.silence_duration_ms:
            self.end_turn()
            return [SpeechStopped(end_ms, self._last_voiced_end_ms)]
        if silence_ms - cfg.frame_ms < cfg.candidate_ms <= silence_ms:  # the window just filled
            self._paused = True
            return [SpeechPaused(end_ms, self._last_voiced_end_ms)]
        return []

    def end_turn(self) -> None:
        """Forget the current turn (after a manual commit or clear) without restarting the clock."""
        self.state, self._run, self._paused = TurnState.SILENCE, 0, False


def detect_turns(pcm16: np.ndarray, config: VadConfig, sample_rate: int = SAMPLE_RATE) -> list[VadEvent]:
    """Offline: the events of one whole signal, including those its trailing frame completes."""
    detector = TurnDetector(config, sample_rate)
    return detector.push(pcm16)
