"""Third-party Realtime clients driven against a real server, with their own code.

Each client runs a *driver* (``drivers/``) in the client's own environment (``.clients/NAME``,
made by ``.ci/clients.sh``, so its pins never meet ours) against a live server on loopback. A driver
plays the same scenario with whatever API its client offers:

1. connect, with input transcription on (turns driven by the client, or its default server VAD);
2. a text turn (the user's message as text, the answer in audio);
3. a spoken turn from a real recording, interrupted by the client mid-answer;

and prints one line ``REPORT {json}``: audio received per turn, the input transcripts, how much
audio of the interrupted response arrived after the interrupt (and, where the client shows the
server's events, after the server acknowledged it), and every error the client logged or received.
:func:`check_report` holds what every client must see.

Outside CI a missing environment skips the test with the command that makes it; under CI
(``CI=true`` or ``MIMO_REQUIRE_CLIENTS=1``) it fails, as a missing feature must.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENVS = ROOT / ".clients"
DRIVERS = Path(__file__).resolve().parent / "drivers"
SPEECH = ROOT / "tests" / "data" / "speech_hello_padded.wav"

#: audio of an interrupted response that may still arrive after the client's interrupt: what was
#: already on the wire when the server read the cancel (the server sends audio at most its lead,
#: 0.3 s, ahead of real time). Before interrupts acted at once, the rest of the response (seconds)
#: followed.
INTERRUPT_TAIL_MS = 800


def clients_required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("MIMO_REQUIRE_CLIENTS") == "1"


def client_env(name: str, probe: str) -> Path:
    """``.clients/NAME`` when ``probe`` (a path inside it) exists; else skip, or fail under CI."""
    env = ENVS / name
    if not (env / probe).exists():
        message = f"client environment {env} is missing: run .ci/clients.sh"
        if clients_required():
            pytest.fail(message)
        pytest.skip(message)
    return env


def run_driver(command: list[str], server_url: str, timeout: float = 240) -> dict[str, Any]:
    """Run a driver; its ``REPORT`` line, with its stderr (the client's logs) as ``log``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([*command, server_url, str(SPEECH)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    if done.returncode != 0 or not lines:
        raise AssertionError(f"driver {command[-1]} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}"
                             f"\n--- stderr\n{done.stderr[-8000:]}")
    report = json.loads(lines[-1].removeprefix("REPORT "))
    report["log"] = done.stderr
    return report


def check_report(report: dict[str, Any]) -> None:
    """What every client must see: no error, audio for both turns, the input transcript, and
    the interrupt stopping the answer."""
    shown = {k: v for k, v in report.items() if k != "log"}
    context = f"report: {json.dumps(shown)}\nclient log (tail):\n{report['log'][-6000:]}"
    assert report["errors"] == [], context
    assert report["text_audio_ms"] > 0, context
    assert report["speech_audio_ms"] > 0, context
    assert report["transcripts"], context
    assert report["interrupted"], context
    assert report["after_interrupt_audio_ms"] <= INTERRUPT_TAIL_MS, context
    # once the server has acknowledged the interrupt (its conversation.item.truncated, which no
    # longer waits behind paced audio), nothing more of that response may come
    assert report["after_ack_audio_ms"] in (None, 0), context


def python_of(env: Path) -> str:
    return str(env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python"))
