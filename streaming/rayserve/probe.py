"""``python3 -m streaming.rayserve.probe --url URL``: how long a client waits for ``server_busy``
when every slot is taken. Fills the server's slots (the ``slots`` figures of ``/healthz``: every
replica's behind Ray Serve), then times ``--tries`` more sessions from the connect to the error
event, and prints the figures. Works against a single server too."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request
from typing import Any

from websockets.asyncio.client import connect

from streaming.client import realtime_url


def total_slots(url: str) -> int:
    base = url.replace("ws://", "http://").replace("wss://", "https://").split("/v1/")[0]
    with urllib.request.urlopen(base.rstrip("/") + "/healthz", timeout=10) as response:
        health = json.load(response)
    replicas = health.get("replicas") or [{"slots": health["max_sessions"]}]
    return sum(r["slots"] for r in replicas)


async def first_event(ws: Any) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), 30))


async def probe(url: str, tries: int) -> list[float]:
    slots = total_slots(url)
    held = []
    try:
        for _ in range(slots):
            ws = await connect(realtime_url(url), max_size=2**24)
            held.append(ws)
            event = await first_event(ws)
            if event["type"] != "session.created":
                raise SystemExit(f"session {len(held)} of {slots} was not admitted: {event}")
        waits = []
        for _ in range(tries):
            start = time.perf_counter()
            async with connect(realtime_url(url)) as ws:
                event = await first_event(ws)
                waits.append(time.perf_counter() - start)
            if event.get("error", {}).get("code") != "server_busy":
                raise SystemExit(f"expected server_busy with every slot taken, got {event}")
        return waits
    finally:
        for ws in held:
            await ws.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m streaming.rayserve.probe", description=__doc__)
    parser.add_argument("--url", required=True, help="the server's origin or realtime URL")
    parser.add_argument("--tries", type=int, default=20, help="refused sessions timed (default 20)")
    args = parser.parse_args(argv)
    waits = sorted(asyncio.run(probe(args.url, args.tries)))
    ms = [1000 * w for w in waits]
    print(f"{args.url}: {total_slots(args.url)} slots taken; server_busy after p50 {statistics.median(ms):.1f} ms, "
          f"max {ms[-1]:.1f} ms over {len(ms)} refused sessions (connect -> error event)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
