"""Shared test setup: semantic_vad's end-of-turn model is there before any test needs it.

``semantic_vad`` sessions (the Realtime tests, openai-agents-js's default) load Smart Turn v3.2.
CI fetches it beforehand (``.ci/run``); elsewhere the first run fetches it the same way (``mimo-agent
fetch-turn-model``: the pipecat-ai wheel from PyPI, 12 MB, only the model kept), so the README's
install-and-test command stays true.
"""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture(scope="session", autouse=True)
def _turn_model() -> None:
    from streaming import turn_model

    try:
        turn_model.find_model()
    except turn_model.TurnModelMissing:
        try:
            turn_model.fetch_model()
        except turn_model.TurnModelMissing as exc:  # no registry: only the tests that need the model fail
            warnings.warn(f"semantic_vad's model is missing and could not be fetched: {exc}", stacklevel=1)
