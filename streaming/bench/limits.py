"""``mimo-agent bench-limits``: what an abusive WebRTC signalling client costs a server.

On a server it starts (``serve`` with the tiny preset, so that its memory is its own to read):

- a vanished offer: an SDP offer posted and its answer never applied (the peer never connects).
  How long it holds a session slot (``/healthz`` ``sessions``), and how long until the server
  drops it (it no longer counts in ``sessions`` or ``calls_connecting``);
- oversized offer bodies (``--body-mb``, 200 MB by default): ``application/sdp`` with its
  ``Content-Length``, the same streamed (chunked, no length), and a multipart form with it as the
  ``sdp`` part. Per body: the answer (status and error code), the time to it on the client (which
  sends the whole body before it reads), and the server's RSS growth, now and at its peak.

``--before DIR`` also starts a server from another source tree (a checkout of an older commit)
and measures it first, for before/after figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from streaming.bench.users import BenchError

POLL_S = 0.05
DROP_WAIT_S = 60.0  # a vanished offer still held after this is reported as such
CHUNK = 1 << 20
BOUNDARY = "mimo-bench-limits"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--body-mb", type=int, default=200, help="size of the oversized offer bodies (default 200)")
    parser.add_argument("--before", metavar="DIR",
                        help="also start a server from this source tree (e.g. a git worktree of an older commit)")
    parser.add_argument("--json", help="write the figures to this file")


async def vanished_offer(base: str) -> dict[str, Any]:
    """Post an offer and never apply the answer; seconds the server counts it as a session
    (a slot), and until it forgets it."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    from streaming.bench.webrtc import EVENTS_CHANNEL, _post_offer, calls_url

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel(EVENTS_CHANNEL)
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    try:
        t0 = time.monotonic()
        await asyncio.to_thread(_post_offer, calls_url(base), pc.localDescription.sdp, None, 30.0)
        held_s, dropped_s = 0.0, None
        while time.monotonic() - t0 < DROP_WAIT_S:
            health = await asyncio.to_thread(_health, base)
            now = time.monotonic() - t0
            if health["sessions"]:
                held_s = now  # still counted as a session: it holds a slot
            if not health["sessions"] and not health.get("calls_connecting"):
                dropped_s = now
                break
            await asyncio.sleep(POLL_S)
        return {"slot_held_s": held_s, "dropped_after_s": dropped_s}
    finally:
        await pc.close()


def _health(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/healthz", timeout=30) as response:
        return json.loads(response.read())


def oversized(base: str, size: int, kind: str) -> tuple[int, str]:
    """POST an offer body of ``size`` bytes; (status, error code)."""
    body = b"v=0\r\n" + b"a" * (size - 5)
    headers = {"Content-Type": "application/sdp"}
    data: Any = body
    if kind == "streamed":
        data = (body[i:i + CHUNK] for i in range(0, len(body), CHUNK))  # urllib sends it chunked
    elif kind == "multipart":
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        data = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="sdp"\r\n\r\n'.encode() + body
                + f"\r\n--{BOUNDARY}--\r\n".encode())
    request = urllib.request.Request(base + "/v1/realtime/calls", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, "accepted"
    except urllib.error.HTTPError as exc:
        try:
            code = json.loads(exc.read())["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = "?"
        return exc.code, code
    except OSError as exc:
        return 0, f"connection failed: {exc}"


def measure(server: Any, body_mb: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{server.port}"
    figures: dict[str, Any] = {"vanished_offer": asyncio.run(vanished_offer(base)), "bodies": {}}
    for kind in ("declared", "streamed", "multipart"):
        before, peak_before = server.rss_mb("VmRSS"), server.rss_mb()
        t0 = time.monotonic()
        status, code = oversized(base, body_mb << 20, kind)
        figures["bodies"][kind] = {
            "status": status, "code": code, "answer_s": round(time.monotonic() - t0, 2),
            "rss_growth_mb": round(server.rss_mb("VmRSS") - before),
            "peak_growth_mb": round(max(0.0, server.rss_mb() - peak_before))}
    return figures


def render(results: dict[str, dict[str, Any]], body_mb: int) -> str:
    def secs(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f} s"

    lines = [f"{'server':<8} {'vanished offer: slot held':>26} {'dropped after':>14}   "
             f"{body_mb} MB offer bodies: answer, time to it, server RSS growth (peak growth)"]
    for label, figures in results.items():
        offer = figures["vanished_offer"]
        cells = [f"{kind} {b['status']} {b['code']} {b['answer_s']:.1f} s {b['rss_growth_mb']:+d} MB "
                 f"({b['peak_growth_mb']:+d})" for kind, b in figures["bodies"].items()]
        lines.append(f"{label:<8} {secs(offer['slot_held_s']):>26} {secs(offer['dropped_after_s']):>14}   "
                     + "; ".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from streaming.bench.spawn import SpawnedServer

    targets: list[tuple[str, dict[str, str] | None]] = [("after", None)]
    if args.before:
        targets.insert(0, ("before", {"PYTHONPATH": os.path.abspath(args.before)}))
    results: dict[str, dict[str, Any]] = {}
    try:
        for label, env in targets:
            print(f"{label}: measuring ...", file=sys.stderr)
            with SpawnedServer(["--no-warmup", "--max-sessions", "2"], env=env) as server:
                results[label] = measure(server, args.body_mb)
    except BenchError as exc:
        print(f"mimo-agent bench-limits: {exc}", file=sys.stderr)
        return 2
    print(render(results, args.body_mb))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0
