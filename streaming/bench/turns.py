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
   ``*specul*wast*``; reported absent when the server has none) and the engine thread's CPU time per
   turn (``mimo_engine_cpu_seconds``: the model's compute, speculations included; against a
   ``--no-speculate`` server, the compute ratio).

``--quick`` shrinks everything (one recording, a few pauses, two configurations) for a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import re
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np

from streaming.audio import SAMPLE_RATE
from streaming.bench.report import publish
from streaming.bench.stats import percentiles
from streaming.bench.users import BenchError, Mic, Utterance, WebSocketLink, b64_samples, load_utterance
from streaming.vad import DEFAULT_CANDIDATE_MS

MS = SAMPLE_RATE // 1000
DEFAULT_PAUSES = "200,300,400,500,600,700"
DEFAULT_SWEEP_SILENCE = "200,300,400,500,600,700,800,1000,1200"
DEFAULT_SWEEP_THRESHOLD = "0.5,0.7,0.8,0.9,0.95,0.98,0.99,0.995"
DEFAULT_CONFIGS = "server_vad,server_vad:silero,semantic_vad:auto,semantic_vad:high"
DEFAULT_SWEEP_WINDOW = "600,800,1000"
DEFAULT_FAMILIES = "server_vad,server_vad:silero,semantic_vad,semantic_vad:maxima"
DEFAULT_SWEEP_SLOPE = "0.5,1,2,3"
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


#: semantic_vad variants measured besides the plain rule (score once, then the silence window);
#: ``slope``: scored every 100 ms of silence, the threshold falling with the silence (``--sweep-slope``)
SEMANTIC_VARIANTS = {"semantic_vad": {}, "semantic_vad:rescore": {"rescore_ms": 200},
                     "semantic_vad:maxima": {"unsure_below": 0.1, "max_silence_ms": 4000},
                     "semantic_vad:slope": {"rescore_ms": 100}}


def _rules(family: str, silences: list[int], thresholds: list[float], windows: list[int],
           slopes: list[float] = (), candidates: list[int] = (DEFAULT_CANDIDATE_MS,)) -> list[tuple[Any, Any]]:
    """(rule as reported, VadConfig) for every rule of a family; semantic rules for every candidate
    end (the silence at which the model first scores; reported when not the default)."""
    from streaming.vad import SILERO_FRAME_MS, VadConfig

    if family.startswith("server_vad"):
        silero = family.endswith(":silero")
        frame = {"classifier": "silero", "frame_ms": SILERO_FRAME_MS} if silero else {}
        return [(ms, VadConfig(silence_duration_ms=ms, **frame)) for ms in silences]
    if family not in SEMANTIC_VARIANTS:
        raise BenchError(f"--families: no family {family!r} (server_vad[:silero], {', '.join(SEMANTIC_VARIANTS)})")
    extra = SEMANTIC_VARIANTS[family]
    return [({"threshold": th, "silence_ms": w, **({"slope": k} if k else {}),
              **({"candidate_ms": c} if c != DEFAULT_CANDIDATE_MS else {})},
             VadConfig(silence_duration_ms=w, end_threshold=th, end_threshold_slope=k, candidate_ms=c, **extra))
            for c in candidates for th in thresholds for w in windows
            for k in (slopes if family.endswith(":slope") else [0.0]) if not k or th < 1.0]


def sweep(turns: list[Turn], pauses: list[int], silences: list[int], thresholds: list[float],
          windows: list[int], families: list[str], slopes: list[float] = (),
          progress: Callable[[str], None] = lambda _: None,
          candidates: list[int] = (DEFAULT_CANDIDATE_MS,)) -> dict[str, Any]:
    """Every rule of every family on every turn (see the module docstring), and per family the rule
    chosen without the recording it is reported on (:func:`held_out`)."""
    from streaming.turn_model import shared_model

    rows, per_rule = [], {}
    scorer = None
    for family in families:
        rules = _rules(family, silences, thresholds, windows, slopes, candidates)
        if not family.startswith("server_vad"):
            scorer = scorer or CachedScorer(shared_model().probability)
        for rule, cfg in rules:
            use = scorer if cfg.end_threshold is not None else None
            results = [detect(t, cfg, use) for t in turns]
            rows.append(_rule_row(family, rule, turns, results, pauses))
            per_rule[(family, json.dumps(rule))] = results
            progress(f"{family} {rule}")
    out: dict[str, Any] = {"rules": rows, "held_out": held_out(turns, rows, per_rule, pauses)}
    if scorer is not None:
        out["model_calls"] = scorer.calls
        out["model_ms_per_call"] = round(1000 * scorer.seconds / max(1, scorer.calls), 1)
    return out


def _quickest(rows: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    """The rule with the shortest detection p50 among those within the false-cut-in budget that
    detect every end."""
    ok = [r for r in rows if r["false_cut_in"] <= budget and r["ends_detected"] == r["ends"]
          and r["detect_ms"].get("p50") is not None]
    return min(ok, key=lambda r: (r["detect_ms"]["p50"], r["detect_ms"]["p90"]), default=None)


def held_out(turns: list[Turn], rows: list[dict[str, Any]], per_rule: dict[tuple[str, str], list],
             pauses: list[int], budget: float = BUDGET) -> dict[str, Any]:
    """Leave one recording out: per family and recording, the quickest rule within the budget on the
    *other* recordings' turns, applied to this recording's turns; the results pooled. The rule is
    never chosen on the pauses and ends it is reported on (the plain sweep's best rule is)."""
    names = list(dict.fromkeys(t.name for t in turns))
    out = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        if len(names) < 2:
            out[family] = None
            continue
        chosen, pooled_turns, pooled = {}, [], []
        for name in names:
            train = [i for i, t in enumerate(turns) if t.name != name]
            test = [i for i, t in enumerate(turns) if t.name == name]
            scored = []
            for r in rows:
                if r["family"] != family:
                    continue
                results = per_rule[(family, json.dumps(r["rule"]))]
                scored.append({**_rule_row(family, r["rule"], [turns[i] for i in train],
                                           [results[i] for i in train], pauses), "results": results})
            best = _quickest(scored, budget)
            chosen[name] = None if best is None else best["rule"]
            if best is None:  # no rule within the budget on the others: the recording is not reported
                continue
            pooled_turns += [turns[i] for i in test]
            pooled += [best["results"][i] for i in test]
        out[family] = {"chosen": chosen, **(_rule_row(family, "held out", pooled_turns, pooled, pauses)
                                             if pooled else {})}
    return out


def at_budget(rows: list[dict[str, Any]], server_ms: float | None, budget: float = BUDGET) -> dict[str, Any]:
    """Per family, the quickest rule within the false-cut-in budget, and its latency."""
    out = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        best = _quickest([r for r in rows if r["family"] == family], budget)
        if best is None:
            out[family] = None
            continue
        p50 = best["detect_ms"]["p50"]
        out[family] = {"rule": best["rule"], "false_cut_in": best["false_cut_in"], "detect_ms_p50": p50,
                       "detect_ms_p90": best["detect_ms"]["p90"],
                       "first_audio_ms_p50": None if server_ms is None else round(p50 + server_ms, 1)}
    return out


# ------------------------------------------------------------------------------------- live runs
@dataclasses.dataclass
class LiveTurn:
    """What one played turn measured (client clock, seconds since the run began)."""

    name: str
    holds: list[list[int]]
    start_ms: int = 0  # where the turn began on the server's input clock
    t_turn_start: float | None = None  # set by the Mic
    t_speech_end: float | None = None  # set by the Mic: the chunk holding the last speech sample was sent
    cuts: list[bool] = dataclasses.field(default_factory=list)
    end_stop_ms: int | None = None
    user_first_audio_ms: float | None = None
    server_first_audio_ms: float | None = None  # speech_stopped received -> first audio received
    status: str = "ok"


def parse_config(text: str) -> dict[str, Any]:
    """``server_vad``, ``server_vad:silero``, ``semantic_vad:EAGERNESS[:silero]`` -> session settings."""
    parts = text.split(":")
    kind, rest = parts[0], parts[1:]
    silero = "silero" in rest
    rest = [r for r in rest if r != "silero"]
    if kind == "server_vad" and not rest:
        td: dict[str, Any] = {"type": "server_vad"}
    elif kind == "semantic_vad" and len(rest) <= 1 and (not rest or rest[0] in ("low", "medium", "high", "auto")):
        td = {"type": "semantic_vad", "eagerness": rest[0] if rest else "auto"}
    else:
        raise BenchError(f"--configs: {text!r} is not server_vad[:silero] or semantic_vad[:low|medium|high|auto]"
                         "[:silero]")
    return {"label": text, "turn_detection": td, "vad": "silero" if silero else None}


def _counter_sum(metrics_text: str, name: str) -> float | None:
    """The sum of the server's counters whose name matches the regex ``name``, None when it has none."""
    values = [float(m.group(2)) for m in re.finditer(rf"^({name})(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$",
                                                     metrics_text, re.M) if not m.group(1).endswith("_created")]
    return sum(values) if values else None


def wasted_patches(metrics_text: str) -> float | None:
    """The sum of the server's speculative-waste counters (``*specul*wast*``), None when it has none."""
    return _counter_sum(metrics_text, r"\w*specul\w*wast\w*")


def engine_cpu_s(metrics_text: str) -> float | None:
    """The engine thread's CPU seconds (``mimo_engine_cpu_seconds``), None when the server has none."""
    return _counter_sum(metrics_text, r"mimo_engine_cpu_seconds_total")


def _counter_delta(before: str | None, after: str | None, read: Callable[[str], float | None]) -> float | None:
    if before is None or after is None or read(after) is None:
        return None
    return read(after) - (read(before) or 0.0)


def _metrics(url: str) -> str | None:
    from streaming.bench.spawn import http_base

    try:
        with urllib.request.urlopen(http_base(url) + "/metrics", timeout=10) as r:
            return r.read().decode()
    except OSError:
        return None


class TurnsPlayer:
    """One session: plays every turn in real time through an open microphone and records what the
    server answered (see the module docstring)."""

    def __init__(self, link: Any, config: dict[str, Any], *, chunk_ms: int, response_tokens: int, gap_s: float,
                 timeout_s: float) -> None:
        self.link, self.config = link, config
        self.chunk_ms, self.response_tokens, self.gap_s, self.timeout_s = chunk_ms, response_tokens, gap_s, timeout_s
        self.epoch = time.perf_counter()
        self.stops: list[tuple[int, float]] = []  # (audio_end_ms, received)
        self.created: list[tuple[float, str]] = []
        self.first_audio: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.audio_s: dict[str, float] = {}
        self.errors: list[str] = []
        self._changed = asyncio.Event()

    def now(self) -> float:
        return time.perf_counter() - self.epoch

    async def _read(self) -> None:
        async for arrival, event in self.link.events():
            t, kind = arrival - self.epoch, event.get("type")
            if kind == "input_audio_buffer.speech_stopped":
                self.stops.append((event["audio_end_ms"], t))
            elif kind == "response.created":
                self.created.append((t, event["response"]["id"]))
            elif kind == "response.output_audio.delta":
                rid = event["response_id"]
                self.first_audio.setdefault(rid, t)
                self.audio_s[rid] = self.audio_s.get(rid, 0.0) + b64_samples(event["delta"]) / SAMPLE_RATE
            elif kind == "response.done":
                self.done[event["response"]["id"]] = t
            elif kind == "error":
                self.errors.append(json.dumps(event.get("error")))
            self._changed.set()

    async def _until(self, check: Callable[[], Any], timeout_s: float) -> Any:
        deadline = time.perf_counter() + timeout_s
        while (found := check()) is None:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return found

    def _answer(self, rec: LiveTurn, turn: Turn) -> tuple[float, float, str] | None:
        """(stop received, first audio, response id) of the answer to the turn's end, once it is done."""
        rec.cuts, rec.end_stop_ms = count_cuts(turn, [ms for ms, _ in self.stops], rec.start_ms)
        if rec.end_stop_ms is None:
            return None
        t_stop = next(t for ms, t in self.stops if ms == rec.end_stop_ms)
        rid = next((r for t, r in self.created if t >= t_stop), None)
        if rid is None or rid not in self.done:
            return None
        return t_stop, self.first_audio.get(rid, float("nan")), rid

    async def run(self, turns: list[Turn]) -> list[LiveTurn]:
        td = self.config["turn_detection"]
        session: dict[str, Any] = {"type": "realtime", "audio": {"input": {"turn_detection": td}},
                                   "max_output_tokens": self.response_tokens,
                                   "mimo": {"min_output_tokens": self.response_tokens}}
        if self.config["vad"]:
            session["mimo"]["vad"] = self.config["vad"]
        reader = asyncio.create_task(self._read())
        mic = Mic(self.link, self.chunk_ms, self.now, open_mic=True)
        mic_task = None
        records = []
        try:
            await self.link.send_event({"type": "session.update", "session": session})
            mic_task = asyncio.create_task(mic.run())
            for turn in turns:
                rec = LiveTurn(turn.name, [list(h) for h in turn.holds])
                records.append(rec)
                await mic.say(turn.pcm, turn.speech_end_ms * MS, rec)
                rec.start_ms = mic.utterance_at // MS
                max_wait = 8.0 + self.timeout_s  # the longest silence window, then the answer
                found = await self._until(lambda rec=rec, turn=turn: self._answer(rec, turn), max_wait)
                if self.errors:
                    raise BenchError(f"the server refused the run: {self.errors[0]}")
                if found is None:
                    rec.status = "timeout"
                    continue
                t_stop, t_audio, rid = found
                rec.user_first_audio_ms = round(1000 * (t_audio - rec.t_speech_end), 1)
                rec.server_first_audio_ms = round(1000 * (t_audio - t_stop), 1)
                play_end = t_audio + self.audio_s.get(rid, 0.0)
                await asyncio.sleep(max(0.0, play_end - self.now()) + self.gap_s)
        finally:
            mic.stop()
            for task in (mic_task, reader):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        return records


async def play(url: str, config: dict[str, Any], turns: list[Turn], args: Any) -> list[LiveTurn]:
    link = await WebSocketLink.open(url, api_key=args.api_key)
    try:
        player = TurnsPlayer(link, config, chunk_ms=args.chunk_ms, response_tokens=args.response_tokens,
                             gap_s=args.gap, timeout_s=args.timeout)
        return await player.run(turns)
    finally:
        await link.close()


def summarize_live(label: str, records: list[LiveTurn], pauses: list[int], wasted: float | None,
                   cpu_s: float | None = None) -> dict[str, Any]:
    by_len: dict[int, list[bool]] = {ms: [] for ms in pauses}
    for rec in records:
        for (_, ms), c in zip(rec.holds, rec.cuts, strict=False):
            by_len.setdefault(ms, []).append(c)
    allcuts = [c for cs in by_len.values() for c in cs]
    ok = [r for r in records if r.user_first_audio_ms is not None]
    return {
        "label": label, "turns": len(records), "answered": len(ok), "holds": len(allcuts),
        "false_cut_ins": sum(allcuts),
        "false_cut_in": round(sum(allcuts) / max(1, len(allcuts)), 4),
        "false_cut_in_by_pause_ms": {str(ms): round(sum(c) / max(1, len(c)), 4) for ms, c in by_len.items() if c},
        "user_first_audio_ms": percentiles([r.user_first_audio_ms for r in ok], (50, 90)),
        "server_first_audio_ms": percentiles([r.server_first_audio_ms for r in ok], (50, 90)),
        "wasted_speculative_patches_per_turn": None if wasted is None else round(wasted / max(1, len(records)), 2),
        "engine_cpu_ms_per_turn": None if cpu_s is None else round(1000 * cpu_s / max(1, len(records)), 1),
        "records": [dataclasses.asdict(r) for r in records],
    }


# ------------------------------------------------------------------------------------------ cli
def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise BenchError(f"{flag} needs positive values, got {text!r}")
    return values


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from streaming.server import add_model_arguments

    t = parser.add_argument_group("target")
    where = t.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server: its origin or realtime URL")
    where.add_argument("--spawn", action="store_true", help="start a server (serve's model options below)")
    t.add_argument("--api-key", default=None, help="the server's API key (--url)")
    w = parser.add_argument_group("material")
    w.add_argument("--audio", nargs="+", default=None,
                   help="recordings, 16-bit WAV, each a turn (default: the packaged test speech; the figures in "
                        "BENCHMARKS.md use /work/shared/data/*.wav)")
    w.add_argument("--pauses", default=DEFAULT_PAUSES, help=f"hold pauses, ms (default {DEFAULT_PAUSES})")
    w.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"live configurations, server_vad[:silero] or semantic_vad[:EAGERNESS][:silero]; OpenAI's "
                        f"default server_vad is always added (default {DEFAULT_CONFIGS})")
    w.add_argument("--rounds", type=int, default=None,
                   help="live runs play the first N turns of each recording (default: all, one per pause length)")
    s = parser.add_argument_group("sweep (offline, the same detector)")
    s.add_argument("--sweep-silence", default=DEFAULT_SWEEP_SILENCE,
                   help=f"server_vad silence windows, ms (default {DEFAULT_SWEEP_SILENCE})")
    s.add_argument("--sweep-threshold", default=DEFAULT_SWEEP_THRESHOLD,
                   help=f"semantic_vad end-of-turn thresholds (default {DEFAULT_SWEEP_THRESHOLD})")
    s.add_argument("--sweep-window", default=DEFAULT_SWEEP_WINDOW,
                   help=f"semantic_vad silence windows when unsure, ms (default {DEFAULT_SWEEP_WINDOW})")
    s.add_argument("--sweep-slope", default=DEFAULT_SWEEP_SLOPE,
                   help="semantic_vad:slope: how fast the end threshold falls, log-odds per 100 ms of silence "
                        f"(default {DEFAULT_SWEEP_SLOPE})")
    s.add_argument("--sweep-candidate", default=str(DEFAULT_CANDIDATE_MS),
                   help=f"semantic_vad: silences (ms) at which the model first scores (default {DEFAULT_CANDIDATE_MS}, "
                        "serve's --speculate-ms)")
    s.add_argument("--families", default=DEFAULT_FAMILIES,
                   help=f"rule families to sweep (default {DEFAULT_FAMILIES}; also semantic_vad:rescore and "
                        "semantic_vad:slope, a model call every 100 ms of silence)")
    p = parser.add_argument_group("playing")
    p.add_argument("--chunk-ms", type=int, default=20, help="audio per append message (default 20)")
    p.add_argument("--response-tokens", type=int, default=8, help="every answer this many patches (default 8)")
    p.add_argument("--gap", type=float, default=0.5, help="seconds after an answer has played (default 0.5)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer (default 30)")
    p.add_argument("--quick", action="store_true",
                   help="seconds, for a test: one recording, pauses 250,900, a small sweep, server_vad and "
                        "semantic_vad:auto")
    parser.add_argument("--json", help="write every turn, rule and summary to this file")
    add_model_arguments(parser)


def _quick(args: argparse.Namespace) -> None:
    args.pauses, args.configs, args.sweep_silence = "250,900", "semantic_vad:auto", "500,1000"
    args.sweep_threshold, args.sweep_window, args.families = "0.98", "800", "server_vad,semantic_vad"
    args.response_tokens, args.gap = min(args.response_tokens, 4), min(args.gap, 0.1)


def run(args: argparse.Namespace) -> int:
    from streaming.bench.spawn import fetch_health, machine

    if args.quick:
        _quick(args)
    try:
        if not args.url and not args.spawn:
            raise BenchError("give --url URL (a running server) or --spawn (start one)")
        pauses = _ints(args.pauses, "--pauses")
        utterances = [load_utterance(a) for a in (args.audio or [None])]
        turns = build_turns(utterances, pauses)
        configs = [parse_config("server_vad")]
        configs += [parse_config(c) for c in args.configs.split(",") if c.strip() and c.strip() != "server_vad"]
        rounds = args.rounds or len(pauses)
        live_turns = [t for i, t in enumerate(turns) if i % len(pauses) < rounds]
        result: dict[str, Any] = {
            "command": ["mimo-agent", "bench-turns", *sys.argv[2:]] if sys.argv[1:2] == ["bench-turns"] else None,
            "machine": machine(), "material": [t.to_json() for t in turns],
            "config": {"pauses_ms": pauses, "configs": [c["label"] for c in configs], "chunk_ms": args.chunk_ms,
                       "response_tokens": args.response_tokens, "audio": [u.path for u in utterances],
                       "live_turns_per_config": len(live_turns)},
            "live": [],
        }
        server_cm = _spawned(args) if args.spawn else contextlib.nullcontext(None)
        with server_cm as server:
            url = server.url if server is not None else args.url
            result["server"] = server.health if server is not None else fetch_health(url, args.api_key)
            for config in configs:
                before = _metrics(url)
                records = asyncio.run(play(url, config, live_turns, args))
                after = _metrics(url)
                result["live"].append(summarize_live(config["label"], records, pauses,
                                                     _counter_delta(before, after, wasted_patches),
                                                     _counter_delta(before, after, engine_cpu_s)))
                print(f"  live {config['label']}: {len(records)} turns", file=sys.stderr)
        families = [f for f in args.families.split(",") if f.strip()]
        result["sweep"] = sweep(turns, pauses, _ints(args.sweep_silence, "--sweep-silence"),
                                _floats(args.sweep_threshold, "--sweep-threshold"),
                                _ints(args.sweep_window, "--sweep-window"), families,
                                _floats(args.sweep_slope, "--sweep-slope"),
                                progress=lambda m: print(f"  sweep {m}", file=sys.stderr),
                                candidates=_ints(args.sweep_candidate, "--sweep-candidate"))
        server_ms = [r["server_first_audio_ms"] for run_ in result["live"] for r in run_["records"]
                     if r["server_first_audio_ms"] is not None]
        result["server_part_ms_p50"] = round(statistics.median(server_ms), 1) if server_ms else None
        result["at_budget"] = at_budget(result["sweep"]["rules"], result["server_part_ms_p50"])
        result["targets"] = targets(result)
    except BenchError as exc:
        print(f"mimo-agent bench-turns: {exc}", file=sys.stderr)
        return 2
    publish(render(result), result, args.json)
    return 0 if all(run_["answered"] for run_ in result["live"]) else 1


def _spawned(args: argparse.Namespace) -> Any:
    from streaming.bench.spawn import SpawnedServer, serve_argv

    return SpawnedServer(serve_argv(args))


TARGET_P50_MS, TARGET_CUT_IN = 300.0, 0.05


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's target per live configuration and per swept family at its budget rule."""
    out = []
    for run_ in result["live"]:
        p50 = run_["user_first_audio_ms"].get("p50")
        out.append({"what": f"live {run_['label']}", "p50_ms": p50, "false_cut_in": run_["false_cut_in"],
                    "meets": p50 is not None and p50 <= TARGET_P50_MS and run_["false_cut_in"] <= TARGET_CUT_IN})
    for family, best in result["at_budget"].items():
        p50 = best and best["first_audio_ms_p50"]
        out.append({"what": f"sweep {family} at 5%", "p50_ms": p50, "false_cut_in": best and best["false_cut_in"],
                    "meets": p50 is not None and p50 <= TARGET_P50_MS})
    return out


def _fmt(p: dict[str, Any], key: str) -> str:
    v = p.get(key)
    return "-" if v is None else f"{v:.0f}"


def _rule(rule: Any) -> str:
    if not isinstance(rule, dict):
        return str(rule)
    slope = f", falling {rule['slope']:g}/100 ms" if rule.get("slope") else ""
    at = f" at {rule['candidate_ms']} ms" if rule.get("candidate_ms") else ""
    return f"p>={rule['threshold']}{at}{slope}, {rule['silence_ms']} ms"


def _chosen(chosen: dict[str, Any]) -> str:
    return "; ".join(f"{name.rsplit('.', 1)[0]}: {'-' if rule is None else _rule(rule)}"
                     for name, rule in chosen.items())


def render(result: dict[str, Any]) -> str:
    pauses = result["config"]["pauses_ms"]
    holds = sum(len(t["holds"]) for t in result["material"])
    lines = [f"bench-turns: {len(result['material'])} turns from {len(result['config']['audio'])} recordings, "
             f"{holds} hold pauses ({', '.join(map(str, pauses))} ms); live: "
             f"{result['config']['live_turns_per_config']} turns per configuration",
             "", "live (real server, real time)",
             "| configuration | user first audio p50 / p90 ms | server part p50 ms | false cut-ins | "
             + " | ".join(f"{ms} ms" for ms in pauses) + " | wasted spec. patches / turn | engine CPU ms / turn |",
             "|---|---|---|---|" + "---|" * len(pauses) + "---|---|"]
    for r in result["live"]:
        u, s = r["user_first_audio_ms"], r["server_first_audio_ms"]
        by = r["false_cut_in_by_pause_ms"]
        wasted, cpu = r["wasted_speculative_patches_per_turn"], r.get("engine_cpu_ms_per_turn")
        lines.append(f"| {r['label']} | {_fmt(u, 'p50')} / {_fmt(u, 'p90')} | {_fmt(s, 'p50')} | "
                     f"{r['false_cut_ins']}/{r['holds']} ({100 * r['false_cut_in']:.0f}%) | "
                     + " | ".join(f"{100 * by[str(ms)]:.0f}%" if str(ms) in by else "-" for ms in pauses)
                     + f" | {'absent' if wasted is None else wasted} | {'absent' if cpu is None else cpu} |")
    lines += ["", "sweep (offline detector on the same audio): false cut-ins per hold, detection delay on ends",
              "| family | rule | false cut-ins | " + " | ".join(f"{ms} ms" for ms in pauses)
              + " | detect p50 / p90 ms |", "|---|---|---|" + "---|" * len(pauses) + "---|"]
    for r in result["sweep"]["rules"]:
        by, d = r["false_cut_in_by_pause_ms"], r["detect_ms"]
        lines.append(f"| {r['family']} | {_rule(r['rule'])} | {100 * r['false_cut_in']:.1f}% | "
                     + " | ".join(f"{100 * by[str(ms)]:.0f}%" for ms in pauses)
                     + f" | {_fmt(d, 'p50')} / {_fmt(d, 'p90')} |")
    if "model_calls" in result["sweep"]:
        lines.append(f"end-of-turn model: {result['sweep']['model_calls']} calls, "
                     f"{result['sweep']['model_ms_per_call']} ms each")
    lines += ["", "held out (per recording, the quickest rule within the budget on the other recordings):",
              "| family | rules chosen | false cut-ins | " + " | ".join(f"{ms} ms" for ms in pauses)
              + " | ends | detect p50 / p90 ms |", "|---|---|---|" + "---|" * len(pauses) + "---|---|"]
    for family, r in result["sweep"]["held_out"].items():
        if not r or "false_cut_in" not in r:
            lines.append(f"| {family} | {'-' if not r else _chosen(r['chosen'])} | no rule within the budget |")
            continue
        by, d = r["false_cut_in_by_pause_ms"], r["detect_ms"]
        lines.append(f"| {family} | {_chosen(r['chosen'])} | {100 * r['false_cut_in']:.1f}% | "
                     + " | ".join(f"{100 * by[str(ms)]:.0f}%" for ms in pauses)
                     + f" | {r['ends']} | {_fmt(d, 'p50')} / {_fmt(d, 'p90')} |")
    lines += ["", f"at a {100 * BUDGET:.0f}% false-cut-in budget (detection p50 + the live server part p50 "
              f"{result['server_part_ms_p50']} ms):"]
    for family, best in result["at_budget"].items():
        lines.append(f"  {family}: " + ("no rule within the budget" if best is None else
                     f"rule {_rule(best['rule'])}, {100 * best['false_cut_in']:.1f}% cut-ins, detection p50 / p90 "
                     f"{best['detect_ms_p50']:.0f} / {best['detect_ms_p90']:.0f} ms, first audio p50 "
                     f"~{best['first_audio_ms_p50']} ms"))
    lines += ["", f"target (issue 13): p50 <= {TARGET_P50_MS:.0f} ms on ends with <= {100 * TARGET_CUT_IN:.0f}% "
              "false cut-ins"]
    for t in result["targets"]:
        lines.append(f"  {t['what']}: p50 {t['p50_ms']} ms, cut-ins {t['false_cut_in']} -> "
                     f"{'meets' if t['meets'] else 'misses'}")
    return "\n".join(lines)
