"""Shared helpers for the streaming tests: fixture and test-audio locations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "realtime"
DATA = ROOT / "tests" / "data"


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


#: Pathological JSON a client may send (name, message, words the ``invalid_json`` error must say).
#: Each is refused at decoding, whichever transport carried it, and the session goes on.
MALFORMED_JSON = [
    ("nested 1,000 deep", '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", '
     '"content": ' + "[" * 1000 + "]" * 1000 + "}}", "recursion limit"),
    ("bare array nested 100,000 deep", "[" * 100_000, "recursion limit"),
    ("an integer of 5,000 digits", '{"type": "response.create", "response": {"max_output_tokens": '
     + "9" * 5000 + "}}", "number out of range"),
    ("NaN (not JSON, though Python's decoder takes it)", '{"type": "session.update", "session": {"type": '
     '"realtime", "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": NaN}}}}}', "line 1"),
    ("an unpaired surrogate escape (no character, cannot be sent back as UTF-8)",
     '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": '
     '[{"type": "input_text", "text": "\\ud800"}]}}', "surrogate"),
]
