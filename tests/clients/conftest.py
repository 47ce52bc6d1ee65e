from __future__ import annotations

import pytest

from tests.streaming.live_server import start_server


@pytest.fixture(scope="package")
def server():
    """One live server (tiny preset, CPU) for every client test. Its answers run at least 24 patches
    (~3 s of speech) and its audio is paced without a lead, so an interrupt 400 ms into the answer
    always lands while the answer is still playing, however fast the machine generates."""
    live = start_server("--max-sessions", "2", "--api-key", "sk-clients", "--audio-lead", "0",
                        "--min-output-patches", "24")
    yield live
    live.stop()
