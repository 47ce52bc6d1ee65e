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
- Frames are classified by webrtcvad (default) or, with ``session.mimo.vad = "silero"``, by Silero
  VAD (its ONNX model from the ``silero-vad`` wheel, 32 ms frames, voiced when its speech
  probability is at least ``threshold``; the energy floor applies to both).
- ``semantic_vad`` (``end_threshold`` set): at the candidate end (``candidate_ms`` of silence) the
  learned end-of-turn model (:mod:`streaming.turn_model`, Smart Turn v3.2) scores the turn so far
  (from 500 ms before its speech start, at most the last 8 s). A score of at least
  ``end_threshold`` ends the turn there; otherwise the turn ends after the silence window
  (``silence_duration_ms``), or after ``max_silence_ms`` (OpenAI's semantic_vad maxima: low 8 s,
  medium/auto 4 s, high 2 s) when the score is below ``unsure_below``. ``rescore_ms`` scores again
  as the silence goes on. ``eagerness`` sets the threshold and the window; the values, and the
  choice of leaving ``unsure_below`` and ``rescore_ms`` off, are measured in BENCHMARKS.md
  (``mimo-agent bench-turns``).

The server does not call the model inline: its detectors defer their scores (``defer_scores``: a
:class:`ScoreNeeded` event, answered with :meth:`TurnDetector.scored` once the model ran on its own
thread) and decide the frames that came meanwhile afterwards, as if the score had come at once.

Streaming equals offline: the resampler (soxr, exact across chunkings), the framer and Silero's state
carry over, and the end-of-turn model sees audio chosen by frame positions only, so pushing audio
in any chunking, with scores answered however late, yields the same events as one push of the
whole signal.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import importlib.util
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import webrtcvad

from streaming.audio import SAMPLE_RATE, Framer, StreamResampler, as_pcm16
from streaming.protocol.session_config import TurnDetection

VAD_RATE = 16000
FRAME_MS_CHOICES = (10, 20, 30)
SILERO_FRAME_MS = 32  # 512 samples at 16 kHz, what the model takes
SILERO_CONTEXT = 64  # samples of the previous frame that the model sees before each frame
Classifier = Literal["webrtcvad", "silero"]

#: OpenAI's server_vad defaults
DEFAULT_THRESHOLD = 0.5
DEFAULT_PREFIX_PADDING_MS = 300
DEFAULT_SILENCE_DURATION_MS = 500
#: our additions
DEFAULT_MIN_SPEECH_MS = 100  # webrtcvad's false positives on clicks and breaths are 1-3 frames long
DEFAULT_FRAME_MS = 20
DEFAULT_CANDIDATE_MS = 200  # a pause this long is worth speculating on (humans answer in ~200 ms)
#: semantic_vad: the longest wait (OpenAI's maxima) and the end-of-turn score that ends a turn early
SEMANTIC_MAX_SILENCE_MS = {"low": 8000, "medium": 4000, "auto": 4000, "high": 2000}
SEMANTIC_END_THRESHOLD = {"low": 0.995, "medium": 0.98, "auto": 0.98, "high": 0.95}
SEMANTIC_SILENCE_MS = {"low": 1000, "medium": 800, "auto": 800, "high": 600}
SEMANTIC_UNSURE_BELOW = 0.0  # measured: waiting the maxima on low scores only delays real ends
PRE_SPEECH_MS = 500  # audio before the speech start that the end-of-turn model sees
HISTORY_SLACK_S = 4  # audio kept beyond the model's window: frames that come while a deferred score is awaited


@dataclasses.dataclass(frozen=True)
class VadConfig:
    threshold: float = DEFAULT_THRESHOLD
    prefix_padding_ms: int = DEFAULT_PREFIX_PADDING_MS
    silence_duration_ms: int = DEFAULT_SILENCE_DURATION_MS
    min_speech_ms: int = DEFAULT_MIN_SPEECH_MS
    frame_ms: int = DEFAULT_FRAME_MS
    candidate_ms: int = DEFAULT_CANDIDATE_MS  # 0: no SpeechPaused / SpeechResumed
    classifier: Classifier = "webrtcvad"
    #: semantic_vad (module docstring): P(end) that ends the turn at the candidate; below
    #: ``unsure_below`` the wait is ``max_silence_ms`` instead of the silence window; ``rescore_ms``
    #: (0: off) scores again after that much more silence
    end_threshold: float | None = None
    #: the threshold falls as the silence goes on: by this much in log-odds per 100 ms of silence
    #: after the candidate (0: fixed; with ``rescore_ms``, a later score may end the turn with less)
    end_threshold_slope: float = 0.0
    unsure_below: float = SEMANTIC_UNSURE_BELOW
    max_silence_ms: int = 0
    rescore_ms: int = 0
    turn_model: str | None = None  # semantic_vad: the model file (None: streaming.turn_model.find_model)

    def __post_init__(self) -> None:
        if self.classifier == "silero":
            if self.frame_ms != SILERO_FRAME_MS:
                raise ValueError(f"frame_ms must be {SILERO_FRAME_MS} with Silero VAD, got {self.frame_ms}")
        elif self.frame_ms not in FRAME_MS_CHOICES:
            raise ValueError(f"frame_ms must be one of {FRAME_MS_CHOICES} (webrtcvad), got {self.frame_ms}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        if self.end_threshold_slope and not (self.end_threshold is not None and 0.0 < self.end_threshold < 1.0):
            raise ValueError(f"a falling end threshold starts within (0, 1), got {self.end_threshold}")
        if self.end_threshold is not None and self.candidate_ms <= 0:
            raise ValueError("an end-of-turn model needs candidate_ms above 0 (it scores candidate ends)")

    def threshold_after(self, silence_ms: int) -> float:
        """The end-of-turn score that ends the turn after ``silence_ms`` of silence."""
        if not self.end_threshold_slope or silence_ms <= self.candidate_ms:
            return self.end_threshold
        drop = self.end_threshold_slope * (silence_ms - self.candidate_ms) / 100
        return 1.0 / (1.0 + math.exp(drop - math.log(self.end_threshold / (1.0 - self.end_threshold))))

    @property
    def mode(self) -> int:
        """webrtcvad aggressiveness, 0 (least) to 3 (most eager to call a frame non-speech)."""
        return min(3, int(4 * self.threshold))

    @property
    def energy_floor_dbfs(self) -> float:
        return -70.0 + 50.0 * self.threshold

    @classmethod
    def from_turn_detection(cls, td: TurnDetection, classifier: Classifier = "webrtcvad", **overrides) -> VadConfig:
        """Map OpenAI's ``turn_detection`` object (server_vad or semantic_vad) to a VAD config."""
        if classifier == "silero":
            overrides["frame_ms"] = SILERO_FRAME_MS
        overrides["classifier"] = classifier
        if td.type == "semantic_vad":
            eagerness = td.eagerness or "auto"
            return cls(silence_duration_ms=SEMANTIC_SILENCE_MS[eagerness],
                       end_threshold=SEMANTIC_END_THRESHOLD[eagerness],
                       max_silence_ms=SEMANTIC_MAX_SILENCE_MS[eagerness], **overrides)
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


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreNeeded:
    """semantic_vad with deferred scores: the end-of-turn model must score ``audio16k`` (the turn so
    far, float at 16 kHz, up to ``audio_end_ms``); answer with ``TurnDetector.scored(request_id, p)``."""

    request_id: int
    audio16k: np.ndarray
    audio_end_ms: int
    silence_ms: int  # the silence before audio_end_ms: candidate_ms, or more for a re-score


VadEvent = SpeechStarted | SpeechStopped | SpeechPaused | SpeechResumed | ScoreNeeded
_REQUEST_IDS = itertools.count(1)  # unique in the process: an answer meant for a replaced detector is not taken


class SileroMissing(RuntimeError):
    """The ``silero-vad`` package (which ships the model) is not installed."""


@functools.cache
def _silero_session():  # one ONNX session for the process; each stream keeps its own state
    import onnxruntime as ort

    spec = importlib.util.find_spec("silero_vad")  # found, not imported: its import sets torch's threads
    if spec is None or not spec.submodule_search_locations:
        raise SileroMissing("session.mimo.vad 'silero' needs the silero-vad package: pip install silero-vad")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _Silero:
    """Silero VAD's speech probability per 512-sample frame at 16 kHz, state carried across frames."""

    def __init__(self) -> None:
        self._session = _silero_session()
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros(SILERO_CONTEXT, np.float32)
        self._rate = np.array(VAD_RATE, np.int64)

    def probability(self, frame: np.ndarray) -> float:
        x = np.concatenate([self._context, frame.astype(np.float32) / 32768.0])
        prob, self._state = self._session.run(None, {"input": x[None], "state": self._state, "sr": self._rate})
        self._context = x[-SILERO_CONTEXT:]
        return float(prob[0, 0])


class FrameClassifier:
    """pcm16 at ``sample_rate`` in, one voiced/unvoiced decision per ``frame_ms`` frame out (with the
    frames themselves, 16 kHz pcm16)."""

    def __init__(self, config: VadConfig, sample_rate: int = SAMPLE_RATE) -> None:
        self.config = config
        if config.classifier == "silero":
            silero = _Silero()
            self._is_speech: Callable[[np.ndarray], bool] = lambda f: silero.probability(f) >= config.threshold
        else:
            vad = webrtcvad.Vad(config.mode)
            self._is_speech = lambda f: vad.is_speech(f.tobytes(), VAD_RATE)
        self._resampler = StreamResampler(sample_rate, VAD_RATE)
        self._framer = Framer(VAD_RATE * config.frame_ms // 1000)
        self._floor = 32768.0**2 * 10 ** (config.energy_floor_dbfs / 10)  # mean square at the floor
        self.frames_done = 0

    def push(self, pcm16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(frames (n, frame_samples) pcm16 at 16 kHz, voiced (n,) bool)."""
        frames = self._framer.push(self._resampler.process(as_pcm16(pcm16)))
        voiced = np.zeros(len(frames), dtype=bool)
        for i, frame in enumerate(frames):
            loud = float(np.mean(frame.astype(np.float64) ** 2)) >= self._floor
            voiced[i] = self._is_speech(frame) and loud  # Silero's state needs every frame
        self.frames_done += len(frames)
        return frames, voiced


class _History:
    """The last ``seconds`` of the 16 kHz stream, addressed by absolute sample index."""

    def __init__(self, seconds: float) -> None:
        self._buf = np.zeros(int(2 * seconds * VAD_RATE), np.int16)
        self._keep = int(seconds * VAD_RATE)
        self._start = 0  # absolute index of _buf[0]
        self._len = 0

    def write(self, x: np.ndarray) -> None:
        if self._len + len(x) > len(self._buf):
            drop = max(0, self._len + len(x) - self._keep)
            keep = self._buf[drop : self._len].copy()
            self._buf[: len(keep)] = keep
            self._start, self._len = self._start + drop, len(keep)
            x = x[max(0, len(x) - self._keep) :]
        self._buf[self._len : self._len + len(x)] = x
        self._len += len(x)

    def span(self, start: int, end: int) -> np.ndarray:
        start = max(start, self._start)
        return self._buf[start - self._start : end - self._start].astype(np.float32) / 32768.0


class TurnState(enum.Enum):
    SILENCE = "silence"
    SPEECH = "speech"


class TurnDetector:
    """Turns frame decisions into speech start/stop events (see the module docstring).

    The end-of-turn model (semantic_vad) is called inline by default (``scorer``, the shared model).
    With ``defer_scores`` the detector calls nothing: where a score is due it returns a
    :class:`ScoreNeeded` and stops there, keeping the frames that come meanwhile, until the caller
    answers with :meth:`scored` (the server runs the model off its event loop). The frames are then
    decided as if the score had come at once, so the events are those of the inline detector, only
    later."""

    def __init__(self, config: VadConfig, sample_rate: int = SAMPLE_RATE, *, defer_scores: bool = False) -> None:
        self.config = config
        self.sample_rate = sample_rate
        self._frames = FrameClassifier(config, sample_rate)
        self._todo: collections.deque[tuple[int, bool]] = collections.deque()  # classified, not decided
        self._done = 0  # frames decided
        self.state = TurnState.SILENCE
        self._run = 0  # consecutive voiced frames (in SILENCE) or unvoiced frames (in SPEECH)
        self._last_voiced_end_ms = 0
        self._paused = False  # a SpeechPaused is open (no SpeechResumed / SpeechStopped yet)
        self._speech_start_ms = 0
        self._window_ms = config.silence_duration_ms  # this pause's silence window (semantic: may grow)
        self.scorer: Callable[[np.ndarray], float] | None = None  # 16 kHz float audio -> P(end of turn)
        self.scores: collections.deque[tuple[int, float | None]] = collections.deque(maxlen=1024)
        self._waiting: ScoreNeeded | None = None  # the score the detector waits for
        self._history: _History | None = None
        if config.end_threshold is not None:
            from streaming.turn_model import WINDOW_S, find_model, shared_model

            if defer_scores:
                find_model(config.turn_model)  # a missing model is refused now, not at the first pause
            else:
                self.scorer = shared_model(config.turn_model).probability
            self._history = _History(WINDOW_S + HISTORY_SLACK_S)

    @property
    def speaking(self) -> bool:
        return self.state is TurnState.SPEECH

    @property
    def decided_ms(self) -> int:
        """Audio time up to which frames have been decided."""
        return self._done * self.config.frame_ms

    @property
    def waiting(self) -> ScoreNeeded | None:
        """The score asked for and not given yet (deferred scores only)."""
        return self._waiting

    def push(self, pcm16: np.ndarray) -> list[VadEvent]:
        first = self._frames.frames_done
        frames, decisions = self._frames.push(pcm16)
        if self._history is not None:
            self._history.write(frames.reshape(-1))
        self._todo.extend(zip(range(first, first + len(decisions)), decisions.tolist(), strict=True))
        return self._decide()

    def scored(self, request_id: int, probability: float | None) -> list[VadEvent]:
        """The answer to a :class:`ScoreNeeded` (None: the model failed, the silence window decides),
        and the events of the frames that waited for it. An answer nobody waits for (the turn was
        ended meanwhile) is ignored."""
        if self._waiting is None or self._waiting.request_id != request_id:
            return []
        return self._apply_score(probability) + self._decide()

    def _decide(self) -> list[VadEvent]:
        events: list[VadEvent] = []
        frame_ms = self.config.frame_ms
        while self._todo and self._waiting is None:
            index, voiced = self._todo.popleft()
            self._done = index + 1
            start_ms = index * frame_ms
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
                    self.state, self._run, self._speech_start_ms = TurnState.SPEECH, 0, speech_start
            else:
                events += self._in_speech(voiced, start_ms, end_ms)
            if self._waiting is not None:
                if self.scorer is None:
                    events.append(self._waiting)
                else:
                    events += self._apply_score(self.scorer(self._waiting.audio16k))
        return events

    def _in_speech(self, voiced: bool, start_ms: int, end_ms: int) -> list[VadEvent]:
        cfg = self.config
        if voiced:
            self._run, self._window_ms = 0, cfg.silence_duration_ms
            if self._paused:
                self._paused = False
                return [SpeechResumed(start_ms)]
            return []
        self._run += 1
        silence_ms = self._run * cfg.frame_ms
        if silence_ms >= self._window_ms:
            self.end_turn()
            return [SpeechStopped(end_ms, self._last_voiced_end_ms)]
        events: list[VadEvent] = []
        if silence_ms - cfg.frame_ms < cfg.candidate_ms <= silence_ms:  # the window just filled
            self._paused = True
            events.append(SpeechPaused(end_ms, self._last_voiced_end_ms))
        if self._history is not None and self._score_due(silence_ms):
            per_ms = VAD_RATE // 1000
            start = max(0, self._speech_start_ms - PRE_SPEECH_MS)
            audio = self._history.span(start * per_ms, end_ms * per_ms)
            self._waiting = ScoreNeeded(next(_REQUEST_IDS), audio, end_ms, silence_ms)
        return events

    def _apply_score(self, score: float | None) -> list[VadEvent]:
        """A score of the turn up to the frame that asked for it: that frame is the last decided."""
        cfg, asked, self._waiting = self.config, self._waiting, None
        self.scores.append((asked.audio_end_ms, score))
        if score is None:
            return []
        if score >= cfg.threshold_after(asked.silence_ms):
            self.end_turn()
            return [SpeechStopped(asked.audio_end_ms, self._last_voiced_end_ms)]
        if score < cfg.unsure_below and asked.silence_ms < cfg.candidate_ms + cfg.frame_ms:
            self._window_ms = max(cfg.max_silence_ms, cfg.silence_duration_ms)
        return []

    def _score_due(self, silence_ms: int) -> bool:
        """On the frames that fill candidate_ms, then candidate_ms + k * rescore_ms, of silence."""
        cfg = self.config
        since = silence_ms - cfg.candidate_ms
        if since < 0 or (since >= cfg.frame_ms and not cfg.rescore_ms):
            return False
        return since < cfg.frame_ms or since // cfg.rescore_ms * cfg.rescore_ms > since - cfg.frame_ms

    def end_turn(self) -> None:
        """Forget the current turn (after a manual commit or clear) without restarting the clock. A
        score asked for is no longer awaited; the frames that waited for it are decided next time."""
        self.state, self._run, self._paused, self._waiting = TurnState.SILENCE, 0, False, None
        self._window_ms = self.config.silence_duration_ms


def detect_turns(pcm16: np.ndarray, config: VadConfig, sample_rate: int = SAMPLE_RATE) -> list[VadEvent]:
    """Offline: the events of one whole signal, including those its trailing frame completes."""
    detector = TurnDetector(config, sample_rate)
    return detector.push(pcm16)
