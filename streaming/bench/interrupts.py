"""``mimo-agent bench-interrupts``: how fast a client's interrupt stops the answer.

``--sessions`` sessions at once each ask for long spoken answers (``--answer-patches``, 32 s by
default) and send ``response.cancel`` ``--after`` seconds into each answer's audio, then ask for the
next answer at once, until ``--interrupts`` interrupts were made in all. Per interrupt, on the
client's clock from the moment the cancel was sent:

- cancel -> last audio: the last audio of the cancelled answer to arrive (WebSocket: its last
  ``response.output_audio.delta``; WebRTC: the last frame on the agent's track louder than silence);
  0 when none arrived after the cancel;
- audio after cancel: how much of its audio still arrived (ms of speech);
- cancel -> ``response.done`` of the cancelled answer;
- cancel -> the next answer's first audio (the user interrupted to be heard: this is when the agent
  answers them, model latency included).

Against a running server (``--url``) or one it starts (``--spawn``, with ``serve``'s model
options); ``--before DIR`` also starts a server from another source tree (a checkout of an older
commit) with the same options and measures it in the same run, for before/after figures: both
servers run side by side and are measured in alternating blocks (``--blocks``), so a change in the
machine's load during the run weighs on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from streaming.bench.report import publish
from streaming.bench.stats import percentiles
from streaming.bench.users import BenchError, WebSocketLink, b64_samples

SAMPLE_RATE = 24_000
QUIET_S = 0.5  # after response.done, audio is watched this long (a server that plays on is caught)
PERCENTILES = (50, 99)
PROMPT = "Tell me a long story about the sea."


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from streaming.server import add_model_arguments

    t = parser.add_argument_group("target")
    where = t.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server: its origin or realtime URL")
    where.add_argument("--spawn", action="store_true", help="start a server (serve's model options below)")
    t.add_argument("--before", metavar="DIR",
                   help="also start a server from this source tree (e.g. a git worktree of an older commit) "
                        "with the same options, and measure it in the same run (with --spawn)")
    t.add_argument("--api-key", default=None, help="the server's API key (--url)")
    t.add_argument("--transport", choices=["websocket", "webrtc", "both"], default="both",
                   help="the transports measured")
    w = parser.add_argument_group("workload")
    w.add_argument("--sessions", type=int, default=4, help="concurrent sessions (default 4)")
    w.add_argument("--interrupts", type=int, default=50, help="interrupts in all, per transport (default 50)")
    w.add_argument("--blocks", type=int, default=5,
                   help="with --before: measure the servers in this many alternating blocks (default 5)")
    w.add_argument("--after", default="0.8,1.6",
                   help="MIN,MAX seconds of the answer's audio received before the cancel (default 0.8,1.6)")
    w.add_argument("--answer-patches", type=int, default=200, help="every answer this many patches (default 200)")
    w.add_argument("--seed", type=int, default=0, help="seed of when each cancel is sent")
    w.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for any one event (default 60)")
    parser.add_argument("--json", help="write every interrupt and the summaries to this file")
    add_model_arguments(parser)


@dataclass
class Interrupt:
    server: str
    transport: str
    session: int
    response_id: str
    cancel_at: float  # perf_counter
    last_audio_at: float | None = None  # last audio of the response that arrived after the cancel
    audio_after_samples: int = 0
    done_at: float | None = None
    next_first_audio_at: float | None = None
    status: str | None = None

    def figures(self) -> dict[str, float | None]:
        ms = lambda t: None if t is None else round((t - self.cancel_at) * 1000, 2)  # noqa: E731
        return {"cancel_to_last_audio_ms": ms(self.last_audio_at) if self.last_audio_at else 0.0,
                "audio_after_cancel_ms": round(self.audio_after_samples * 1000 / SAMPLE_RATE, 1),
                "cancel_to_done_ms": ms(self.done_at),
                "cancel_to_next_audio_ms": ms(self.next_first_audio_at)}


class _Events:
    """A link's events with deadlines (read by a task into a queue: a timed-out wait must not end
    the link's event generator)."""

    def __init__(self, link: Any, timeout_s: float) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.timeout_s = timeout_s
        self.reader = asyncio.ensure_future(self._read(link))

    async def _read(self, link: Any) -> None:
        try:
            async for item in link.events():
                self.queue.put_nowait(item)
        finally:
            self.queue.put_nowait(None)

    async def next(self, timeout_s: float | None = None) -> tuple[float, dict]:
        item = await asyncio.wait_for(self.queue.get(), self.timeout_s if timeout_s is None else timeout_s)
        if item is None:
            self.queue.put_nowait(None)
            raise BenchError("the server closed the session")
        return item

    async def until(self, kind: str, on_event: Any = None) -> tuple[float, dict]:
        while True:
            at, event = await self.next()
            if event.get("type") == "error":
                raise BenchError(f"server error: {event.get('error')}")
            if on_event is not None:
                on_event(at, event)
            if event.get("type") == kind:
                return at, event


def _audio_samples(event: dict) -> int:
    if "samples" in event:  # WebRTC: a loud frame on the track
        return event["samples"]
    return b64_samples(event.get("delta") or "")


async def _session(link: Any, index: int, count: int, args: argparse.Namespace, server: str, transport: str,
                   out: list[Interrupt]) -> None:
    events = _Events(link, args.timeout)
    try:
        await _interrupts(link, index, count, args, server, transport, out, events)
    finally:
        events.reader.cancel()


async def _interrupts(link: Any, index: int, count: int, args: argparse.Namespace, server: str, transport: str,
                      out: list[Interrupt], events: _Events) -> None:
    rng = random.Random(args.seed * 7919 + index)
    lo, hi = (float(x) for x in args.after.split(","))
    await events.until("session.created")
    await link.send_event({"type": "session.update", "session": {
        "type": "realtime", "audio": {"input": {"turn_detection": None}},
        "max_output_tokens": args.answer_patches, "mimo": {"min_output_tokens": args.answer_patches}}})
    await events.until("session.updated")
    previous: Interrupt | None = None
    for _ in range(count):
        await link.send_event({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": PROMPT}]}})
        await link.send_event({"type": "response.create"})
        _, created = await events.until("response.created")
        rid = created["response"]["id"]
        heard = 0
        while True:  # the answer plays until the user interrupts
            at, event = await events.next()
            if event.get("type") == "error":
                raise BenchError(f"server error: {event.get('error')}")
            if event.get("type") == "response.output_audio.delta" and event.get("response_id") == rid:
                if previous is not None and previous.next_first_audio_at is None:
                    previous.next_first_audio_at = at
                heard += _audio_samples(event)
                if heard >= rng.uniform(lo, hi) * SAMPLE_RATE:
                    break
            if event.get("type") == "response.done":
                raise BenchError(f"the answer ended after {heard / SAMPLE_RATE:.1f} s, before the interrupt: "
                                 "raise --answer-patches")
        rec = Interrupt(server, transport, index, rid, time.perf_counter())
        await link.send_event({"type": "response.cancel"})

        def watch(at: float, event: dict, rec: Interrupt = rec) -> None:
            if event.get("type") == "response.output_audio.delta" and event.get("response_id") == rec.response_id:
                rec.last_audio_at = at
                rec.audio_after_samples += _audio_samples(event)

        while rec.done_at is None:
            at, event = await events.until("response.done", watch)
            if event["response"]["id"] == rid:
                rec.done_at, rec.status = at, event["response"]["status"]
        quiet_until = time.perf_counter() + QUIET_S
        with contextlib.suppress(TimeoutError):
            while (left := quiet_until - time.perf_counter()) > 0:
                at, event = await events.next(left)
                watch(at, event)
                if rec.last_audio_at == at:
                    quiet_until = at + QUIET_S
        out.append(rec)
        previous = rec  # the last interrupt of a session has no next answer


async def _open(url: str, transport: str, api_key: str | None) -> Any:
    if transport == "webrtc":
        from streaming.bench.webrtc import WebRTCLink

        return await WebRTCLink.open(url, api_key=api_key)
    return await WebSocketLink.open(url, api_key=api_key)


async def measure(url: str, args: argparse.Namespace, server: str, transport: str, total: int) -> list[Interrupt]:
    """``total`` interrupts over ``args.sessions`` concurrent sessions."""
    counts = [total // args.sessions + (i < total % args.sessions) for i in range(args.sessions)]
    try:
        links = await asyncio.gather(*(_open(url, transport, args.api_key) for _ in counts))
    except BenchError:
        raise
    except Exception as exc:
        raise BenchError(f"cannot open {args.sessions} {transport} sessions at {url}: {exc}") from None
    out: list[Interrupt] = []
    try:
        await asyncio.gather(*(_session(link, i, n, args, server, transport, out)
                               for i, (link, n) in enumerate(zip(links, counts, strict=True))))
    finally:
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
    return out


def summarize(records: list[Interrupt]) -> dict[str, Any]:
    figures = [r.figures() for r in records]
    summary: dict[str, Any] = {"interrupts": len(records),
                               "statuses": sorted({r.status for r in records if r.status}),
                               "with_audio_after_cancel": sum(r.audio_after_samples > 0 for r in records)}
    for key in figures[0] if figures else ():
        summary[key] = percentiles([f[key] for f in figures], PERCENTILES)
    return summary


COLUMNS = (("cancel_to_last_audio_ms", "cancel -> last audio"), ("audio_after_cancel_ms", "audio after cancel"),
           ("cancel_to_done_ms", "cancel -> response.done"), ("cancel_to_next_audio_ms", "cancel -> next audio"))


def render(result: dict[str, Any]) -> str:
    head = f"{'server':<10} {'transport':<10} {'n':>3}  " + "  ".join(f"{label + ' ms':>26}" for _, label in COLUMNS)
    lines = [f"{result['sessions']} concurrent sessions, cancel {result['after']} s into each answer; "
             "p50 / p99 (max), client clock", head]
    for run in result["runs"]:
        s = run["summary"]
        cells = []
        for key, _ in COLUMNS:
            st = s.get(key, {})
            cells.append(f"{st.get('p50', float('nan')):>8.1f} / {st.get('p99', float('nan')):>7.1f} "
                         f"({st.get('max', float('nan')):>6.0f})")
        lines.append(f"{run['server']:<10} {run['transport']:<10} {s['interrupts']:>3}  " + "  ".join(
            f"{c:>26}" for c in cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from streaming.bench.spawn import SpawnedServer, fetch_health, machine, serve_argv

    transports = ["websocket", "webrtc"] if args.transport == "both" else [args.transport]
    result: dict[str, Any] = {"command": ["mimo-agent", *sys.argv[1:]], "machine": machine(),
                              "sessions": args.sessions, "after": args.after, "runs": []}
    try:
        if not args.url and not args.spawn:
            raise BenchError("give --url URL (a running server) or --spawn (start one)")
        if args.before and not args.spawn:
            raise BenchError("--before starts its own servers: use it with --spawn")
        if args.sessions < 1 or args.interrupts < args.sessions:
            raise BenchError("--sessions must be at least 1 and --interrupts at least --sessions")
        targets: list[tuple[str, dict[str, str] | None]] = [("after", None)]
        if args.before:
            targets.insert(0, ("before", {"PYTHONPATH": os.path.abspath(args.before)}))
        with contextlib.ExitStack() as stack:
            urls = {}
            for label, env in targets if args.spawn else []:
                argv = serve_argv(args, max_sessions=max(args.sessions, args.max_sessions))
                urls[label] = stack.enter_context(SpawnedServer(argv, env=env)).url
            if not args.spawn:
                urls["server"] = args.url
            result["servers"] = {label: fetch_health(url, args.api_key) for label, url in urls.items()}
            blocks = max(1, min(args.blocks, args.interrupts // args.sessions)) if len(urls) > 1 else 1
            sizes = [args.interrupts // blocks + (b < args.interrupts % blocks) for b in range(blocks)]
            for transport in transports:
                records: dict[str, list[Interrupt]] = {label: [] for label in urls}
                for size in sizes:
                    for label, url in urls.items():
                        print(f"{label}: {size} interrupts over {transport} ...", file=sys.stderr)
                        records[label] += asyncio.run(measure(url, args, label, transport, size))
                for label, recs in records.items():
                    result["runs"].append({"server": label, "transport": transport, "summary": summarize(recs),
                                           "interrupts": [asdict(r) | r.figures() for r in recs]})
        result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    except BenchError as exc:
        print(f"mimo-agent bench-interrupts: {exc}", file=sys.stderr)
        return 2
    publish(render(result), result, args.json)
    return 0
