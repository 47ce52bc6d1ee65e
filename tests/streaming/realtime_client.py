"""A deliberately plain Realtime client for the server tests: raw websockets and JSON, so the tests
check the wire protocol itself rather than the project's SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import wave
from pathlib import Path
from typing import Any

import numpy as np
import websockets

DATA = Path(__file__).resolve().parents[1] / "data"
RATE = 24_000


def wav_pcm16(name: str) -> bytes:
    """pcm16 mono 24 kHz bytes of a test recording in tests/data."""
    with wave.open(str(DATA / name)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2), name
        return w.readframes(w.getnframes())


def silence(ms: int) -> bytes:
    return bytes(2 * RATE * ms // 1000)


async def connect(url: str, **kwargs: Any) -> Any:
    kwargs.setdefault("subprotocols", ["realtime"])
    kwargs.setdefault("max_size", 2**24)
    ws = await websockets.connect(url + "?model=mimo-test", **kwargs)
    created = await recv(ws)
    assert created["type"] == "session.created", created
    return ws


async def send(ws: Any, event: dict) -> None:
    await ws.send(json.dumps(event))


async def recv(ws: Any, timeout: float = 30.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def update(ws: Any, **session: Any) -> dict:
    await send(ws, {"type": "session.update", "session": {"type": "realtime", **session}})
    return await until(ws, "session.updated")


async def append(ws: Any, pcm: bytes, *, chunk_ms: int = 20, realtime: bool = False) -> None:
    step = 2 * RATE * chunk_ms // 1000
    for i in range(0, len(pcm), step):
        await send(ws, {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()})
        if realtime:
            await asyncio.sleep(chunk_ms / 1000)


async def until(ws: Any, kind: str, timeout: float = 30.0, events: list | None = None) -> dict:
    """Read events until one of type ``kind`` (collected into ``events`` when given)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        event = await recv(ws, max(0.01, deadline - loop.time()))
        if events is not None:
            events.append(event)
        if event["type"] == kind:
            return event


def audio_of(events: list[dict]) -> np.ndarray:
    """The pcm16 samples of all ``response.output_audio.delta`` events."""
    chunks = [base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"]
    return np.frombuffer(b"".join(chunks), dtype=np.int16)


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]
