"""``mimo-agent serve`` as a user starts it: what its start-up lines say, and nothing else."""

from __future__ import annotations

import pytest

from streaming.bench.spawn import SpawnedServer

pytestmark = pytest.mark.timeout(120)


def test_serve_says_which_model_it_loaded_and_what_to_expect_without_warnings() -> None:
    """With random weights it says so (the packaged trained default is tests/agent/test_presets.py')."""
    with SpawnedServer(["--preset", "tiny", "--no-warmup", "--log-level", "info"]) as server:
        health = server.health
        log = server._log.read_text()
        port = server.port
    assert health["model_card"]["weights"] == "random" and health["model_card"]["name"] == "mimo-audio-tiny"
    assert "model mimo-audio-tiny: random weights: every stage runs for real, but what it says is noise" in log
    # uvicorn's protocol choice used to print a deprecation warning on every start
    assert "Warning" not in log and "warn" not in log.lower(), log
    assert "Uvicorn running on http://127.0.0.1:" in log
    assert f"demo page: open http://127.0.0.1:{port}/ in a browser" in log
