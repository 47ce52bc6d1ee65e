"""What one benchmark turn measured, and the statistics over many (numpy only, no I/O).

A :class:`TurnRecord` holds the raw clocks of one turn (client ``perf_counter`` seconds since the
run began) and the server's own timings from ``response.done``; its derived figures are
properties, so the JSON dump carries both. Conventions (``research/perf_anchors.md`` 5):

- user first audio: the moment the audio chunk holding the last speech sample was sent -> the first
  ``response.output_audio.delta`` received (client clock; it includes the VAD silence window);
- server first audio: the commit (VAD ``speech_stopped`` or ``input_audio_buffer.commit``) -> the
  first audio delta written to the socket (server clock, ``server_first_audio_ms``);
- VAD silence window: last speech sample sent -> ``speech_stopped`` received (client clock);
- continuity: a player that starts at the first chunk and plays in real time; every stall longer
  than :data:`UNDERRUN_MS` is an underrun (vLLM-Omni's audible-gap threshold);
- real-time factor: (last audio received - commit) / audio duration (vLLM-Omni's ``audio e2e /
  audio duration``); the server paces audio to real time, so 1 plus a little is the healthy value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SAMPLE_RATE = 24_000
UNDERRUN_MS = 100.0
PERCENTILES = (50, 90, 99)

#: the server's stages, in order: (name, end milestone, start milestone); ``None`` start = the commit
STAGES: tuple[tuple[str, str, str | None], ...] = (
    ("encode + wait", "prefill_start_ms", None),
    ("prefill", "prefill_done_ms", "prefill_start_ms"),
    ("first text patch", "first_text_ms", "prefill_done_ms"),
    ("to first speech patch", "first_speech_patch_ms", "first_text_ms"),
    ("first codec chunk", "first_audio_ms", "first_speech_patch_ms"),
    ("hand-off + send", "server_first_audio_ms", "first_audio_ms"),
)


@dataclass
class Continuity:
    """A real-time player fed by the response's audio chunks (arrival time s, samples)."""

    underruns: int = 0  # stalls longer than UNDERRUN_MS
    stall_ms: float = 0.0  # all stalls together, however short
    max_gap_ms: float = 0.0
    play_end: float | None = None  # when the last sample finishes playing (client clock)

    @classmethod
    def of(cls, chunks: list[tuple[float, int]], threshold_ms: float = UNDERRUN_MS) -> Continuity:
        c = cls()
        for arrival, samples in chunks:
            if c.play_end is None:
                c.play_end = arrival
            gap_ms = (arrival - c.play_end) * 1000
            if gap_ms > 0:
                c.stall_ms += gap_ms
                c.max_gap_ms = max(c.max_gap_ms, gap_ms)
                if gap_ms > threshold_ms:
                    c.underruns += 1
            c.play_end = max(c.play_end, arrival) + samples / SAMPLE_RATE
        return c


@dataclass
class TurnRecord:
    """One user turn and the response to it."""

    level: int  # concurrent sessions in this run
    session: int
    turn: int
    warmup: bool
    label: str = ""  # which server (e.g. "batched" / "unbatched" with --compare-batching)
    status: str = "pending"  # completed | incomplete | cancelled | failed | timeout | error
    error: str | None = None
    t_turn_start: float | None = None  # first chunk of the utterance sent
    t_speech_end: float | None = None  # the chunk holding the last speech sample sent
    t_speech_started: float | None = None
    t_speech_stopped: float | None = None
    t_commit: float | None = None  # speech_stopped received (VAD) or commit sent (manual)
    t_response_created: float | None = None
    t_first_audio: float | None = None
    t_last_audio: float | None = None
    t_done: float | None = None
    audio_samples: int = 0
    audio_chunks: list[tuple[float, int]] = field(default_factory=list)
    server_timings: dict[str, float] = field(default_factory=dict)
    extra_responses: int = 0  # responses to spurious VAD turns inside the utterance

    # ------------------------------------------------------------------------------ derived
    @property
    def ok(self) -> bool:
        """A measured turn: the response spoke (stopped by its token budget counts)."""
        return self.status in ("completed", "incomplete") and self.t_first_audio is not None

    @property
    def user_first_audio_ms(self) -> float | None:
        return _ms(self.t_speech_end, self.t_first_audio)

    @property
    def server_first_audio_ms(self) -> float | None:
        return self.server_timings.get("server_first_audio_ms")

    @property
    def vad_window_ms(self) -> float | None:
        return _ms(self.t_speech_end, self.t_speech_stopped)

    @property
    def audio_ms(self) -> float:
        return self.audio_samples * 1000 / SAMPLE_RATE

    @property
    def continuity(self) -> Continuity:
        return Continuity.of(self.audio_chunks)

    @property
    def rtf(self) -> float | None:
        if self.t_commit is None or self.t_last_audio is None or not self.audio_samples:
            return None
        return (self.t_last_audio - self.t_commit) / (self.audio_samples / SAMPLE_RATE)

    def stages(self) -> dict[str, float]:
        """Durations of the server's stages (ms), from its milestones; missing ones are left out."""
        marks = dict(self.server_timings)
        if "prefill_done_ms" in marks and "prefill_ms" in marks:
            marks["prefill_start_ms"] = marks["prefill_done_ms"] - marks["prefill_ms"]
        if "first_text_ms" not in marks or marks.get("first_text_ms", 0) > marks.get("first_speech_patch_ms", 1e18):
            marks["first_text_ms"] = marks.get("prefill_done_ms", 0.0)  # speech came first: no text stage
        out = {}
        for name, end, start in STAGES:
            if end in marks and (start is None or start in marks):
                out[name] = round(marks[end] - (marks[start] if start else 0.0), 3)
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["audio_chunks"] = [[round(t, 4), n] for t, n in self.audio_chunks]
        c = self.continuity
        d.update(
            ok=self.ok,
            user_first_audio_ms=_round(self.user_first_audio_ms),
            server_first_audio_ms=_round(self.server_first_audio_ms),
            vad_window_ms=_round(self.vad_window_ms),
            audio_ms=round(self.audio_ms, 1),
            underruns=c.underruns, stall_ms=round(c.stall_ms, 1), max_gap_ms=round(c.max_gap_ms, 1),
            rtf=_round(self.rtf, 4),
            stages_ms=self.stages(),
        )
        return d


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (b - a) * 1000


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


# ----------------------------------------------------------------------------------- summaries
def percentiles(values: list[float], ps: tuple[int, ...] = PERCENTILES) -> dict[str, float]:
    """``{"n", "mean", "p50", "p90", "p99", "max"}`` (linear interpolation); empty input: ``{"n": 0}``."""
    xs = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if xs.size == 0:
        return {"n": 0}
    out = {"n": int(xs.size), "mean": round(float(xs.mean()), 2)}
    for p, v in zip(ps, np.percentile(xs, ps), strict=True):
        out[f"p{p}"] = round(float(v), 2)
    out["max"] = round(float(xs.max()), 2)
    return out


#: the per-turn figures summarised for each run: (key, label on the terminal)
METRICS: tuple[tuple[str, str], ...] = (
    ("user_first_audio_ms", "user first audio (ms)"),
    ("server_first_audio_ms", "server first audio (ms)"),
    ("vad_window_ms", "VAD silence window (ms)"),
    ("rtf", "real-time factor"),
)


def summarize(records: list[TurnRecord]) -> dict[str, Any]:
    """Statistics over the measured turns of one run (warm-up and failed turns counted apart)."""
    measured = [r for r in records if not r.warmup]
    good = [r for r in measured if r.ok]
    out: dict[str, Any] = {
        "turns": len(records),
        "warmup_turns": sum(r.warmup for r in records),
        "measured_turns": len(good),
        "failed_turns": len(measured) - len(good),
        "statuses": _count(r.status for r in records),
    }
    for key, _ in METRICS:
        out[key] = percentiles([getattr(r, key) for r in good])
    stages: dict[str, list[float]] = {}
    for r in good:
        for name, ms in r.stages().items():
            stages.setdefault(name, []).append(ms)
    out["stages_ms"] = {name: percentiles(stages[name]) for name, _, _ in STAGES if name in stages}
    conts = [r.continuity for r in good]
    out["underruns"] = sum(c.underruns for c in conts)
    out["turns_with_underruns"] = sum(c.underruns > 0 for c in conts)
    out["max_gap_ms"] = round(max((c.max_gap_ms for c in conts), default=0.0), 1)
    out["realtime"] = bool(good) and out["turns_with_underruns"] == 0 and out["failed_turns"] == 0
    return out


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for x in items:
        counts[x] = counts.get(x, 0) + 1
    return counts
