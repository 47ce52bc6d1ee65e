"""``mimo-agent bench``: first-audio latency of a realtime server under N simulated users.

Against a running server (``--url``) or one it starts (``--spawn``, with ``serve``'s model and
engine options). Each simulated user streams a recorded utterance in real time, turn after turn,
and the benchmark reports, per number of concurrent sessions, the user-perceived and the server's
first-audio times with their stages, the VAD silence window, playback continuity and the real-time
factor (p50/p90/p99, warm-up turns excluded and counted). ``--floor`` times the bare model work of
one turn in-process for comparison; ``--compare-batching`` counts the sessions that stay real time
with the batched engine and with batching off. See BENCHMARKS.md for figures and commands.

Modules: :mod:`.users` (simulated users, transports), :mod:`.stats` (per-turn records and
statistics), :mod:`.floor` (the in-process floor), :mod:`.spawn` (the spawned server, machine
description), :mod:`.report` (table and plots).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any

from streaming.bench.stats import TurnRecord, summarize
from streaming.bench.users import BenchError, SimulatedUser, UserPlan, Utterance, WebSocketLink, load_utterance

DEFAULT_COMPARE_LEVELS = "1,2,3,4,6,8,12,16,24,32"
FLOOR_BLOCK_TURNS = 4  # floor turns timed before the first run and after each


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from streaming.server import add_model_arguments

    t = parser.add_argument_group("target")
    where = t.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server: its origin (http://127.0.0.1:8000) or realtime URL (ws://.../v1/realtime)")
    where.add_argument("--spawn", action="store_true",
                       help="start a server (mimo-agent serve with the model options below) on 127.0.0.1")
    t.add_argument("--api-key", default=None, help="the server's API key (--url)")
    t.add_argument("--transport", choices=["websocket", "webrtc"], default="websocket",
                   help="how the simulated users connect")
    w = parser.add_argument_group("workload")
    w.add_argument("--sessions", default="1",
                   help="concurrent simulated users; a list (1,2,4,8) runs a sweep (default 1)")
    w.add_argument("--turns", type=int, default=5, help="measured turns per user (default 5)")
    w.add_argument("--warmup", type=int, default=1, help="turns per user before measuring (default 1)")
    w.add_argument("--audio", default=None, help="the utterance, a 16-bit WAV (default: the packaged test speech)")
    w.add_argument("--commit", choices=["vad", "manual"], default="vad",
                   help="server VAD ends the turn (default), or the client commits right after the speech")
    w.add_argument("--chunk-ms", type=int, default=20, help="audio per append message (default 20)")
    w.add_argument("--stagger", default="spread",
                   help="start times: 'spread' (session i waits i/N of the utterance), or seconds between "
                        "sessions (0: all at once, the worst case)")
    w.add_argument("--gap", default="0.5,1.5", help="think time MIN,MAX seconds after each answer has played")
    w.add_argument("--max-output-tokens", type=int, default=None, help="cap each response (patches)")
    w.add_argument("--response-tokens", type=int, default=None,
                   help="every response exactly this many patches (stop tokens banned before): a fixed load, "
                        "e.g. for random-weight presets, which stop as early as they may")
    w.add_argument("--seed", type=int, default=0, help="seed of the simulated users' pauses between turns")
    w.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a response (default 60)")
    o = parser.add_argument_group("output")
    o.add_argument("--json", help="write every sample and the summaries to this file")
    o.add_argument("--plot", help="write latency CDFs and the stage breakdown to this PNG")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    x = parser.add_argument_group("comparisons")
    x.add_argument("--floor", action="store_true",
                   help="also time the bare model work of one turn in-process, and the server's ratio to it")
    x.add_argument("--compare-batching", action="store_true",
                   help="count the real-time sessions with batching and with --max-batch 1 (spawns both)")
    x.add_argument("--compare-levels", default=DEFAULT_COMPARE_LEVELS,
                   help=f"session counts tried by --compare-batching, ascending (default {DEFAULT_COMPARE_LEVELS})")
    add_model_arguments(parser)


def _levels(text: str, flag: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag} takes a number or a comma-separated list, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise BenchError(f"{flag} needs positive session counts, got {text!r}")
    return levels


def _gap(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise BenchError(f"--gap takes MIN,MAX seconds, got {text!r}") from None
    if not 0 <= lo <= hi:
        raise BenchError(f"--gap needs 0 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _stagger(text: str, utterance: Utterance, level: int) -> list[float]:
    if text == "spread":
        return [i * utterance.duration_s / level for i in range(level)]
    try:
        step = float(text)
    except ValueError:
        raise BenchError(f"--stagger takes 'spread' or seconds, got {text!r}") from None
    return [i * step for i in range(level)]


def _check_args(args: argparse.Namespace) -> None:
    if not args.url and not args.spawn:
        raise BenchError("give --url URL (a running server) or --spawn (start one)")
    if args.compare_batching and not args.spawn:
        raise BenchError("--compare-batching starts its own servers: use it with --spawn")
    if args.turns < 1 or args.warmup < 0:
        raise BenchError("--turns must be at least 1 and --warmup at least 0")
    if args.chunk_ms < 10 or args.chunk_ms > 1000:
        raise BenchError(f"--chunk-ms must be within 10..1000, got {args.chunk_ms}")
    if args.transport == "webrtc" and importlib.util.find_spec("streaming.webrtc") is None:
        raise BenchError("--transport webrtc needs the server's WebRTC transport (streaming/webrtc.py, "
                         "POST /v1/realtime/calls), which this build does not include yet; use --transport websocket")


# ------------------------------------------------------------------------------------------ runs
async def run_level(url: str, level: int, utterance: Utterance, plan: UserPlan, *, label: str, stagger: str,
                    transport: str, api_key: str | None, seed: int, progress: Any = None) -> list[TurnRecord]:
    """``level`` users at once against ``url``; every turn's record, in (session, turn) order."""

    async def open_link() -> Any:
        if transport == "webrtc":
            from streaming.bench.webrtc import WebRTCLink

            return await WebRTCLink.open(url, api_key=api_key)
        return await WebSocketLink.open(url, api_key=api_key)

    try:
        links = await asyncio.gather(*(open_link() for _ in range(level)))
    except BenchError:
        raise
    except Exception as exc:
        raise BenchError(f"cannot open {level} sessions at {url}: {type(exc).__name__}: {exc}") from None
    epoch = time.perf_counter()

    def on_turn(_rec: TurnRecord) -> None:
        if progress is not None:
            progress.update(1)

    users = [SimulatedUser(link, utterance, plan, level=level, index=i, epoch=epoch, label=label, seed=seed,
                           on_turn=on_turn) for i, link in enumerate(links)]
    try:
        results = await asyncio.gather(*(u.run(d) for u, d in zip(users, _stagger(stagger, utterance, level),
                                                                  strict=True)))
    finally:
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
    return [rec for recs in results for rec in recs]


def _run_dict(label: str, level: int, records: list[TurnRecord]) -> dict[str, Any]:
    return {"label": label, "level": level, "summary": summarize(records), "turns": [r.to_json() for r in records]}


def _progress(args: argparse.Namespace, total: int, desc: str) -> Any:
    if args.no_progress:
        return nullcontext()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="turn", file=sys.stderr, leave=False, dynamic_ncols=True)


def sweep(args: argparse.Namespace, url: str, levels: list[int], utterance: Utterance, plan: UserPlan,
          label: str = "", stop_when_not_realtime: bool = False, server: Any = None,
          floor: Any = None) -> list[dict[str, Any]]:
    """One run per level, in order; with a spawned ``server``, the CPU time it used in each; with a
    ``floor``, a block of floor turns before the first run and after each."""
    runs = []
    if floor is not None:
        floor.block(FLOOR_BLOCK_TURNS)
    for level in levels:
        total = level * (plan.turns + plan.warmup)
        cpu0, t0 = server.cpu_s() if server else None, time.perf_counter()
        with _progress(args, total, f"{label + ' ' if label else ''}{level} sessions") as bar:
            records = asyncio.run(run_level(url, level, utterance, plan, label=label, stagger=args.stagger,
                                            transport=args.transport, api_key=args.api_key, seed=args.seed,
                                            progress=bar))
        runs.append(_run_dict(label, level, records))
        runs[-1]["wall_s"] = round(time.perf_counter() - t0, 2)
        if cpu0 is not None and (cpu1 := server.cpu_s()) is not None:
            runs[-1]["server_cpu_s"] = round(cpu1 - cpu0, 2)
        if floor is not None:
            floor.block(FLOOR_BLOCK_TURNS)
        if stop_when_not_realtime and not runs[-1]["summary"]["realtime"]:
            break
    return runs


def _spawned(args: argparse.Namespace, **overrides: Any) -> Any:
    from streaming.bench.spawn import SpawnedServer, serve_argv

    return SpawnedServer(serve_argv(args, **overrides))


def compare_batching(args: argparse.Namespace, utterance: Utterance, plan: UserPlan) -> dict[str, Any]:
    """The most concurrent sessions that stay real time, batched and with ``--max-batch 1``."""
    levels = sorted(set(_levels(args.compare_levels, "--compare-levels")))
    out: dict[str, Any] = {"levels": levels, "runs": []}
    for label, overrides in (("batched", {}), ("unbatched", {"max_batch": 1})):
        with _spawned(args, max_sessions=max(max(levels), args.max_sessions), **overrides) as server:
            runs = sweep(args, server.url, levels, utterance, plan, label=label, stop_when_not_realtime=True,
                         server=server)
            out.setdefault("peak_rss_mb", {})[label] = server.rss_mb()
        ok = [r["level"] for r in runs if r["summary"]["realtime"]]
        out[label] = {"realtime_sessions": max(ok, default=0),
                      "first_failure": next((r["level"] for r in runs if not r["summary"]["realtime"]), None)}
        out["runs"] += runs
    b, u = out["batched"]["realtime_sessions"], out["unbatched"]["realtime_sessions"]
    out["ratio"] = round(b / u, 2) if u else None
    ceiling = "" if out["batched"]["first_failure"] else f" (batched held at every level tried, up to {levels[-1]})"
    out["ratio_text"] = (f"{out['ratio']}x" if u else "batching off: none") + ceiling
    return out


def floor_input(utterance: Utterance, commit: str) -> Any:
    """The audio the server committed in a turn: the speech span plus the VAD's padding (default 300 ms
    before, the 500 ms silence window after), or what push-to-talk sent."""
    import numpy as np

    if commit == "manual":
        return utterance.pcm[: utterance.speech_end]
    start = max(0, utterance.speech_start - 300 * 24)
    end = utterance.speech_end + 500 * 24
    pcm = utterance.pcm[start:end]
    return np.concatenate([pcm, np.zeros(max(0, end - start - len(pcm)), np.int16)])


def _stage_medians(turns: list[dict[str, Any]]) -> dict[str, float]:
    """The server's own engine stages of the measured turns, comparable one to one with the floor's."""
    spans = {"encode": ("encode_ms", None), "prefill": ("prefill_ms", None),
             "steps": ("first_speech_patch_ms", "prefill_done_ms"),
             "codec": ("first_audio_ms", "first_speech_patch_ms")}
    out = {}
    for name, (end, start) in spans.items():
        xs = [t["server_timings"][end] - (t["server_timings"][start] if start else 0.0) for t in turns
              if t["ok"] and not t["warmup"] and end in t["server_timings"]
              and (start is None or start in t["server_timings"])]
        if xs:
            out[name] = statistics.median(xs)
    return out


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the project's speed targets are stated in, from this run's numbers only."""
    out: dict[str, Any] = {"lines": []}
    main = [r for r in result["runs"] if not r["label"]]
    one = next((r for r in main if r["level"] == 1), None)
    floor = result.get("floor")
    if one and floor and one["summary"]["server_first_audio_ms"].get("n"):
        p50 = one["summary"]["server_first_audio_ms"]["p50"]
        out["server_over_floor"] = round(p50 / floor["total_ms"], 3)
        out["lines"].append(f"server first audio at 1 session, p50 {p50:.1f} ms / floor {floor['total_ms']:.1f} ms "
                            f"= {out['server_over_floor']:.2f}x")
        cpu = [t["server_timings"]["first_audio_cpu_ms"] for t in one["turns"]
               if t["ok"] and not t["warmup"] and "first_audio_cpu_ms" in t["server_timings"]]
        if cpu and floor.get("cpu_ms"):
            engine_cpu = statistics.median(cpu)
            out["engine_cpu_over_floor_cpu"] = ratio = round(engine_cpu / floor["cpu_ms"], 3)
            out["lines"].append(
                f"  CPU time (what machine load cannot inflate): engine thread to first audio, p50 "
                f"{engine_cpu:.1f} ms / floor {floor['cpu_ms']:.1f} ms = {ratio:.2f}x")
        stages = _stage_medians(one["turns"])
        pairs = [("encode", "encode_ms"), ("prefill", "prefill_ms"), ("steps", "steps_ms"), ("codec", "codec_ms")]
        out["stages_server_vs_floor_ms"] = {k: [stages.get(k), floor[f]] for k, f in pairs}
        out["lines"].append("  stage by stage, server p50 / floor median (ms): " + ", ".join(
            f"{k} {stages[k]:.1f}/{floor[f]:.1f}" for k, f in pairs if stages.get(k) is not None))
    if one and one["summary"]["server_first_audio_ms"].get("n"):
        base = one["summary"]["server_first_audio_ms"]["p50"]
        for r in main:
            s = r["summary"]["server_first_audio_ms"]
            if r["level"] > 1 and s.get("n"):
                key = f"p99_at_{r['level']}_over_p50_at_1"
                out[key] = round(s["p99"] / base, 3)
                out["lines"].append(f"server first audio p99 at {r['level']} sessions {s['p99']:.1f} ms / p50 at 1 "
                                    f"session {base:.1f} ms = {out[key]:.2f}x")
    return out


def run(args: argparse.Namespace) -> int:
    from streaming.bench import report
    from streaming.bench.spawn import fetch_health, machine

    try:
        _check_args(args)
        levels = _levels(args.sessions, "--sessions")
        utterance = load_utterance(args.audio)
        plan = UserPlan(turns=args.turns, warmup=args.warmup, commit=args.commit, chunk_ms=args.chunk_ms,
                        gap_s=_gap(args.gap), timeout_s=args.timeout,
                        max_output_tokens=args.response_tokens or args.max_output_tokens,
                        min_output_tokens=args.response_tokens)
        result: dict[str, Any] = {
            "command": ["mimo-agent", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else None,
            "machine": machine(),
            "config": {"audio": utterance.path, "audio_s": round(utterance.duration_s, 3),
                       "speech_s": round(utterance.speech_s, 3), "transport": args.transport, "commit": args.commit,
                       "chunk_ms": args.chunk_ms, "turns": args.turns, "warmup": args.warmup,
                       "stagger": args.stagger, "gap_s": list(plan.gap_s), "sessions": levels,
                       "max_output_tokens": plan.max_output_tokens, "min_output_tokens": plan.min_output_tokens,
                       "spawn": bool(args.spawn), "url": args.url},
            "runs": [],
            "peak_rss_mb": {},
        }
        floor = None
        if args.floor:
            from streaming.bench.floor import Floor

            floor = Floor(args, floor_input(utterance, args.commit), max_output_tokens=plan.max_output_tokens,
                          min_output_tokens=plan.min_output_tokens)
        if args.spawn:
            with _spawned(args, max_sessions=max(max(levels), args.max_sessions)) as server:
                result["server"] = server.health
                result["runs"] = sweep(args, server.url, levels, utterance, plan, server=server, floor=floor)
                result["peak_rss_mb"]["server"] = server.rss_mb()
        else:
            result["server"] = fetch_health(args.url, args.api_key)
            result["runs"] = sweep(args, args.url, levels, utterance, plan, floor=floor)
        if args.compare_batching:
            cmp = compare_batching(args, utterance, plan)
            result["runs"] += cmp.pop("runs")
            result["peak_rss_mb"].update({f"server ({k})": v for k, v in cmp.pop("peak_rss_mb").items()})
            result["compare_batching"] = cmp
        if floor is not None:
            from streaming.bench.floor import backbone_report

            result["floor"] = floor.summary()
            result["backbone"] = backbone_report(floor)
        result["ratios"] = ratios(result)
        result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
        result["peak_rss_mb"]["bench"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except BenchError as exc:
        print(f"mimo-agent bench: {exc}", file=sys.stderr)
        return 2
    report.publish(report.render(result), result, args.json)
    if args.plot:
        report.plot(result, args.plot)
    return 0 if all(r["summary"]["measured_turns"] for r in result["runs"] if not r["label"]) else 1
