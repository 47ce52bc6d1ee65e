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
