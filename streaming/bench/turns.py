"""``mimo-agent bench-turns``: turn taking on recorded speech with spliced mid-turn pauses.

The material: each recording (``--audio``, real speech) is a turn. Mid-turn *hold* pauses of
``--pauses`` ms (200-700 by default) are spliced in at quiet points inside its speech (local
minima of the 10 ms energy, between words), filled with the recording's own room tone (its
quietest 100 ms, tiled), so the detector hears a speaker who stops and goes on; the end of the
recording is the *end* of the turn. Every hold and end is labelled on the audio's own clock.

Two measurements, in one run:

1. **Offline sweep** of the release rule (the detector of ``streaming.vad`` run on the same audio,
   exactly what the server runs, since streaming equals offline): for ``server_vad`` every silence
   window of ``--sweep-silence`` (webrtcvad and Silero frames), for ``semantic_vad`` every threshold
   of ``--sweep-threshold``; per rule, false cut-ins per hold pause (a ``speech_stopped`` inside a
   hold), by pause length, and the detection delay on ends (``speech_stopped.audio_end_ms`` - the
   last speech sample). "Latency at a 5% false-cut-in budget" is the quickest rule, per family, whose
   false cut-ins stay within the budget: its detection delay p50 plus the server's own part
   (``speech_stopped`` received -> first audio, p50 of the live runs).
2. **Live runs**: the turns played in real time (20 ms appends, an open microphone) to a real
   server (``--url`` or ``--spawn``), once per configuration of ``--configs`` (OpenAI's default
   ``server_vad`` always among them). Per configuration: user-perceived first audio on ends (the
   chunk holding the last speech sample sent -> the answer's first audio delta received; p50/p90),
   false cut-ins per hold pause by length (a ``speech_stopped`` whose ``audio_end_ms`` lies inside a
   hold), and the wasted speculative patches per turn from the server's ``/metrics`` (counters named
   ``*specul*wast*``; reported absent when the server has none).

``--quick`` shrinks everything (one recording, a few pauses, two configurations) for a test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from streaming.audio import SAMPLE_RATE
from streaming.bench.stats import percentiles
from streaming.bench.users import Utterance

MS = SAMPLE_RATE // 1000
DEFAULT_PAUSES = "200,300,400,500,600,700"
DEFAULT_SWEEP_SILENCE = "200,300,400,500,600,700,800,1000,1200"
DEFAULT_SWEEP_THRESHOLD = "0.5,0.7,0.8,0.9,0.95,0.98,0.99"
DEFAULT_CONFIGS = "server_vad,server_vad:silero,semantic_vad:auto,semantic_vad:high"
BUDGET = 0.05
EDGE_MS = 500  # no hold closer than this to the speech's start or end
MIN_GAP_MS = 350  # between two hold points
TAIL_MS = 9000  # silence after the end in the offline sweep: longer than any wait (semantic low: 8 s)
CUT_SLACK_MS = 100  # a stop this soon after a hold ends still came from the hold (frames, filter delay)


# -------------------------------------------------------------------------------------- material
@dataclasses.dataclass(frozen=True)
class Turn:
    """One turn of the benchmark: audio (pcm16 24 kHz, no trailing silence) with labels in ms."""

    name: str
    pcm: np.ndarray
    holds: tuple[tuple[int, int], ...]  # (start ms, length ms) of each spliced pause
    speech_end_ms: int  # the end of the turn: its last speech sample

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "holds": [list(h) for h in self.holds], "speech_end_ms": self.speech_end_ms,
                "duration_ms": len(self.pcm) // MS}


def _frame_db(pcm: np.ndarray, frame: int = 10 * MS) -> np.ndarray:
    n = len(pcm) // frame
    x = pcm[: n * frame].astype(np.float32).reshape(n, frame) / 32768.0  # (frames, 240)
    return 10 * np.log10(np.mean(x * x, axis=1) + 1e-12)


def hold_points(utt: Utterance) -> list[int]:
    """Quiet points inside the speech (10 ms frame indices): minima of the smoothed energy over
    +-150 ms, at least EDGE_MS from the speech's ends and MIN_GAP_MS apart, quietest first."""
    db = np.convolve(_frame_db(utt.pcm), np.ones(5) / 5, mode="same")
    lo, hi = utt.speech_start // (10 * MS) + EDGE_MS // 10, utt.speech_end // (10 * MS) - EDGE_MS // 10
    minima = [i for i in range(lo, hi) if db[i] == db[max(0, i - 15) : i + 16].min()]
    chosen: list[int] = []
    for i in sorted(minima, key=lambda i: db[i]):
        if all(abs(i - j) * 10 >= MIN_GAP_MS for j in chosen):
            chosen.append(i)
    return sorted(chosen)


def room_tone(pcm: np.ndarray, ms: int) -> np.ndarray:
    """``ms`` of the recording's quietest 100 ms, tiled."""
    db = np.convolve(_frame_db(pcm), np.ones(10) / 10, mode="valid")
    quiet = pcm[int(np.argmin(db)) * 10 * MS :][: 100 * MS]
    return np.resize(quiet, ms * MS).astype(np.int16)


def build_turns(utterances: list[Utterance], pauses: list[int]) -> list[Turn]:
    """Per recording, one turn per pause length: every hold point gets a pause, the lengths rotated
    over the points from turn to turn, so each point meets every length once. Each turn ends with
    the recording's own end (its trailing silence cut: the player adds its own)."""
    turns = []
    for utt in utterances:
        points = hold_points(utt)
        name = utt.path.rsplit("/", 1)[-1]
        for r in range(len(pauses)):
            pieces, holds, pos, shift = [], [], 0, 0
            for j, p in enumerate(points):
                ms, cut = pauses[(r + j) % len(pauses)], p * 10 * MS
                pieces += [utt.pcm[pos:cut], room_tone(utt.pcm, ms)]
                holds.append((cut // MS + shift, ms))
                pos, shift = cut, shift + ms
            pieces.append(utt.pcm[pos : utt.speech_end])
            turns.append(Turn(name, np.concatenate(pieces), tuple(holds), utt.speech_end // MS + shift))
    return turns


# ------------------------------------------------------------------------------------ the sweep
def count_cuts(turn: Turn, stops_ms: list[int], offset_ms: int = 0) -> tuple[list[bool], int | None]:
    """Per hold, whether a stop (``audio_end_ms``, on a clock where the turn begins at ``offset_ms``)
    fell inside it; and the first stop at or after the end of the turn's speech (None: none yet)."""
    cut = [any(offset_ms + s < t <= offset_ms + s + ms + CUT_SLACK_MS for t in stops_ms) for s, ms in turn.holds]
    end = next((t for t in sorted(stops_ms) if t > offset_ms + turn.speech_end_ms), None)
    return cut, end


class CachedScorer:
    """The end-of-turn model with its answers remembered by input: rules that see the same audio
    (every threshold, until one cuts in) pay for each distinct input once."""

    def __init__(self, scorer: Callable[[np.ndarray], float]) -> None:
        self.scorer = scorer
        self.cache: dict[bytes, float] = {}
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, audio: np.ndarray) -> float:
        key = hashlib.sha1(audio.tobytes()).digest()
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = self.scorer(audio)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
        return self.cache[key]


def detect(turn: Turn, config: Any, scorer: CachedScorer | None) -> tuple[list[bool], int | None]:
    from streaming.vad import SpeechStopped, TurnDetector

    detector = TurnDetector(config)
    if scorer is not None:
        detector.scorer = scorer
    tail = np.zeros(TAIL_MS * MS, np.int16)
    events = detector.push(np.concatenate([turn.pcm, tail]))
    return count_cuts(turn, [e.audio_end_ms for e in events if isinstance(e, SpeechStopped)])


def _rule_row(family: str, value: Any, turns: list[Turn], results: list[tuple[list[bool], int | None]],
              pauses: list[int]) -> dict[str, Any]:
    by_len: dict[int, list[bool]] = {ms: [] for ms in pauses}
    for turn, (cuts, _) in zip(turns, results, strict=True):
        for (_, ms), c in zip(turn.holds, cuts, strict=True):
            by_len[ms].append(c)
    allcuts = [c for cs in by_len.values() for c in cs]
    delays = [end - t.speech_end_ms for t, (_, end) in zip(turns, results, strict=True) if end is not None]
    return {"family": family, "rule": value, "holds": len(allcuts),
            "false_cut_in": round(sum(allcuts) / max(1, len(allcuts)), 4),
            "false_cut_in_by_pause_ms": {str(ms): round(sum(c) / max(1, len(c)), 4) for ms, c in by_len.items()},
            "ends": len(turns), "ends_detected": len(delays),
            "detect_ms": percentiles(delays, (50, 90))}


#: semantic_vad variants measured besides the plain rule (score once, then the silence window)
SEMANTIC_VARIANTS = {"semantic_vad": {}, "semantic_vad:rescore": {"rescore_ms": 200},
                     "semantic_vad:maxima": {"unsure_below": 0.1, "max_silence_ms": 4000}}


def _rules(family: str, silences: list[int], thresholds: list[float], windows: list[int]) -> list[tuple[Any, Any]]:
    """(rule as reported, VadConfig) for every rule of a family."""
    from streaming.vad import SILERO_FRAME_MS, VadConfig

    if family.startswith("server_vad"):
        silero = family.endswith(":silero")
        frame = {"classifier": "silero", "frame_ms": SILERO_FRAME_MS} if silero else {}
        return [(ms, VadConfig(silence_duration_ms=ms, **frame)) for ms in silences]
    extra = SEMANTIC_VARIANTS[family]
    return [({"threshold": th, "silence_ms": w}, VadConfig(silence_duration_ms=w, end_threshold=th, **extra))
            for th in thresholds for w in windows]


def sweep(turns: list[Turn], pauses: list[int], silences: list[int], thresholds: list[float],
          windows: list[int], families: list[str],
          progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every rule of every family on every turn (see the module docstring)."""
    from streaming.turn_model import shared_model

    rows = []
    scorer = None
    for family in families:
        if not family.startswith("server_vad"):
            scorer = scorer or CachedScorer(shared_model().probability)
        for rule, cfg in _rules(family, silences, thresholds, windows):
            use = scorer if cfg.end_threshold is not None else None
            rows.append(_rule_row(family, rule, turns, [detect(t, cfg, use) for t in turns], pauses))
            progress(f"{family} {rule}")
    out: dict[str, Any] = {"rules": rows}
    if scorer is not None:
        out["model_calls"] = scorer.calls
        out["model_ms_per_call"] = round(1000 * scorer.seconds / max(1, scorer.calls), 1)
    return out


def at_budget(rows: list[dict[str, Any]], server_ms: float | None, budget: float = BUDGET) -> dict[str, Any]:
    """Per family, the quickest rule within the false-cut-in budget, and its latency."""
    out = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        ok = [r for r in rows if r["family"] == family and r["false_cut_in"] <= budget
              and r["ends_detected"] == r["ends"] and r["detect_ms"].get("p50") is not None]
        best = min(ok, key=lambda r: r["detect_ms"]["p50"], default=None)
        if best is None:
            out[family] = None
            continue
        p50 = best["detect_ms"]["p50"]
        out[family] = {"rule": best["rule"], "false_cut_in": best["false_cut_in"], "detect_ms_p50": p50,
                       "first_audio_ms_p50": None if server_ms is None else round(p50 + server_ms, 1)}
    return out
