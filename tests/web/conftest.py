"""What the demo-page tests share: a server that asks for an API key (``keyed_live``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.web.browser import require_browser

KEY = "k3y"


@pytest.fixture(scope="module")
def keyed_live() -> Iterator:
    """A real server (tiny preset, two sessions) that admits ``KEY``; one per test module."""
    require_browser()
    from tests.streaming.live_server import start_server

    server = start_server("--max-sessions", "2", "--api-key", KEY)
    yield server
    server.stop()
