"""``mimo-agent talk``: arguments, the session it asks for, playback bookkeeping, missing PortAudio."""

from __future__ import annotations

import argparse
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streaming import protocol as p
from streaming import talk


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    talk.add_arguments(parser, "talk")
    return parser.parse_args(list(argv))


def test_session_fields_are_a_valid_session_update():
    args = _args("--instructions", "Be brief.", "--voice", "cedar", "--silence-ms", "700")
    event = p.parse_client_event({"type": "session.update", "session": talk.session_fields(args)})
    td = event.session.audio.input.turn_detection
    assert (td.type, td.silence_duration_ms, td.interrupt_response) == ("server_vad", 700, True)
    assert event.session.audio.output.voice == "cedar" and event.session.instructions == "Be brief."
    assert event.session.audio.output.format.type == "audio/pcm"


def test_speaker_counts_what_was_played_and_drops_the_rest():
    speaker = talk.Speaker(device_rate=48000)
    speaker.feed("item_a", np.full(2400, 1000, np.int16))  # 100 ms at 24 kHz -> 4800 samples at 48 kHz
    out = np.zeros((960, 1), np.int16)  # 20 ms
    speaker.fill(out)
    speaker.fill(out)
    item, played_ms = speaker.stop()
    assert (item, played_ms) == ("item_a", 40)
    speaker.feed("item_a", np.full(2400, 1000, np.int16))  # a late delta of the interrupted item
    speaker.fill(out)
    assert not out.any()  # silence, not the stale reply
    speaker.feed("item_b", np.full(2400, 1000, np.int16))
    for _ in range(5):
        speaker.fill(out)
    assert speaker.stop()[0] == "item_b"


def test_missing_sounddevice_gives_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # makes `import sounddevice` fail
    assert talk.run(_args()) == 1
    assert "sounddevice" in capsys.readouterr().err


def _talk(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streaming.cli", "talk", *argv], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])


def test_a_missing_audio_device_is_a_clear_error():
    """With PortAudio there (libportaudio2) but no such device: one line naming the device and the
    option to choose another, before any connection is tried; no traceback."""
    if ctypes.util.find_library("portaudio") is None:
        missing = "PortAudio is not installed (apt-get install libportaudio2)"
        if os.environ.get("CI") or os.environ.get("MIMO_REQUIRE_CLIENTS"):
            pytest.fail(f"required but {missing}", pytrace=False)
        pytest.skip(missing)
    done = _talk("--input-device", "99999", "--url", "ws://127.0.0.1:9/v1/realtime")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "mimo-agent talk: no input device 99999 (" in done.stderr
    assert "choose one with --input-device NAME|INDEX" in done.stderr
    done = _talk("--input-device", "no such microphone", "--url", "ws://127.0.0.1:9/v1/realtime")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "no input device 'no such microphone' (No input device matching 'no such microphone')" in done.stderr
