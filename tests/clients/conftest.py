from __future__ import annotations

import pytest

from tests.streaming.live_server import start_server


@pytest.fixture(scope="package")
def server():
    """One live server (tiny preset, CPU) for every client test."""
    live = start_server("--max-sessions", "2", "--api-key", "sk-clients")
    yield live
    live.stop()
