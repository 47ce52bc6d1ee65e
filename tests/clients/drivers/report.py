"""What every Python driver shares (stdlib only: drivers run in the clients' own environments)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
import wave
from collections.abc import Awaitable, Callable

RATE = 24_000
#: the drivers interrupt the spoken turn's answer once this much of its audio arrived
INTERRUPT_AT_MS = 400


def speech(path: str) -> bytes:
    """pcm16 mono 24 kHz bytes of a recording."""
    with wave.open(path) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2), path
        return w.readframes(w.getnframes())


def chunks(pcm: bytes, ms: int = 100) -> list[bytes]:
    step = 2 * RATE * ms // 1000
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


def audio_ms(nbytes: int, rate: int = RATE) -> float:
    return nbytes / 2 * 1000 / rate


@dataclasses.dataclass
class Report:
    """The scenario's outcome, printed as the driver's last line (see tests/clients/harness.py)."""

    errors: list[str] = dataclasses.field(default_factory=list)
    text_audio_ms: float = 0.0
    speech_audio_ms: float = 0.0  # of the spoken turn's answer, before the interrupt
    after_interrupt_audio_ms: float = 0.0  # of that answer, after the interrupt
    #: of that answer, after the server acknowledged the interrupt (``conversation.item.truncated``),
    #: for clients that show the server's events (None for the others)
    after_ack_audio_ms: float | None = None
    interrupted: bool = False
    transcripts: list[str] = dataclasses.field(default_factory=list)
    notes: dict = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.monotonic)

    async def transcript(self, seconds: float = 30) -> None:
        """Wait for the first input transcript (it follows the answer's first audio)."""
        for _ in range(int(seconds * 10)):
            if self.transcripts:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError("no input transcript")

    def emit(self) -> None:
        out = dataclasses.asdict(self)
        out["wall_s"] = round(time.monotonic() - out.pop("started"), 2)
        print("REPORT " + json.dumps(out), flush=True)


def http_base(ws_url: str) -> str:
    """``ws://h:p/v1/realtime`` -> ``http://h:p/v1`` (what SDKs take as their base URL)."""
    return ws_url.replace("ws://", "http://").removesuffix("/realtime")


def run(scenario: Callable[[Report], Awaitable[None]], timeout: float = 150) -> None:
    """Play ``scenario`` and print its report, also when it fails (then with what went wrong).
    The process then exits at once: a client whose session died may not wind down its tasks."""
    report = Report()

    async def main() -> None:
        try:
            await asyncio.wait_for(scenario(report), timeout)
        except Exception as exc:  # the report carries it to the test
            report.errors.append(f"driver: {type(exc).__name__}: {exc}")
        report.emit()
        sys.stderr.flush()
        os._exit(0)

    asyncio.run(main())
