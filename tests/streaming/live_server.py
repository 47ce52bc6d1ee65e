"""A real server on a real loopback socket, in this process: uvicorn on its own thread and event
loop, the engine on its thread, the tiny preset on the CPU. Tests talk to it over WebSocket/HTTP
like any client, and may also look at the engine (cache lengths) to check what the protocol says.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from streaming.server import add_arguments, build_server, uvicorn_config


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    ws_url: str  # ws://127.0.0.1:PORT/v1/realtime
    engine: Any
    app: Any
    runtime: Any
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()


def serve_args(*argv: str, default_model: bool = False) -> argparse.Namespace:
    """``serve``'s options for a test: the random-weight ``tiny`` preset unless ``argv`` names a model
    (tests of the protocol need a model that never stops early and costs nothing to run; the
    packaged trained preset, serve's own default when installed, only with ``default_model``)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, "serve")
    pinned = [] if default_model or "--model" in argv or "--preset" in argv else ["--preset", "tiny"]
    args = parser.parse_args(["--port", "0", "--no-warmup", *pinned, *argv])
    args.command = "serve"
    return args


def start_server(*argv: str, default_model: bool = False) -> LiveServer:
    app = build_server(serve_args(*argv, default_model=default_model))
    engine, rt = app.state.engine, app.state.runtime
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, log_level="warning", loop="asyncio"))

    def run() -> None:
        with contextlib.suppress(Exception):
            asyncio.run(server.serve())

    thread = threading.Thread(target=run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            engine.stop()
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/realtime", engine, app, rt,
                      server, thread)


def assert_heard_in_context(live: LiveServer, item_id: str, heard_ms: int) -> None:
    """The engine holds assistant item ``item_id`` cut at ``heard_ms`` (the speech patches at least
    partly heard, one per 160 ms) and its KV cache holds the conversation as heard: up to the end of
    that item, and no more."""
    from agent.conversation import common_prefix

    session = next(s for s in live.engine._sessions.values() if any(it.item_id == item_id for it in s.items))
    item = next(it for it in session.items if it.item_id == item_id)
    assert int((item.patches.text_ids == live.engine.specials.empty).sum()) == -(-heard_ms // 160)
    rendering = live.engine.renderer.render(session.items, instructions=session.instructions)
    start, end = rendering.spans[item_id]
    assert live.engine.cache.length(session.slot) == len(session.cached) <= end
    assert common_prefix(session.cached, rendering.prompt) == len(session.cached)
    assert len(session.cached) > start
