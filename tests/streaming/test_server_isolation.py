"""One session's trouble stays its own, end to end: the real server on loopback, the tiny model.
A regenerated answer (delete the answer, ``response.create``) and a fault inside the engine while
serving one session leave another session's answer, mid-stream, untouched."""

from __future__ import annotations

import pytest

from tests.streaming import realtime_client as rc
from tests.streaming.live_server import start_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    live = start_server("--max-sessions", "4")
    yield live
    live.stop()


async def _say(ws, text: str) -> None:
    await rc.send(ws, {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    await rc.until(ws, "conversation.item.added")


async def _talking(server) -> tuple[object, list[dict]]:
    """A session in the middle of a long spoken answer."""
    ws = await rc.connect(server.ws_url)
    await rc.update(ws, audio={"input": {"turn_detection": None}}, max_output_tokens=120,
                    mimo={"min_output_tokens": 120, "interleave": "1:3"})
    await _say(ws, "Tell me a long story about the sea")
    await rc.send(ws, {"type": "response.create"})
    events: list[dict] = []
    await rc.until(ws, "response.output_audio.delta", events=events)
    return ws, events


async def _finishes_with_its_audio(ws, events: list[dict]) -> None:
    done = await rc.until(ws, "response.done", events=events)
    response = done["response"]
    assert response["status"] in ("completed", "incomplete"), response
    assert "error" not in rc.types(events)
    speech = response["mimo"]["timings"]["speech_patches"]
    assert speech > 0 and len(rc.audio_of(events)) == speech * 3840


async def test_regenerate_answers_again_while_another_session_talks(server):
    b, b_events = await _talking(server)
    a = await rc.connect(server.ws_url)
    try:
        await rc.update(a, audio={"input": {"turn_detection": None}}, output_modalities=["text"])
        await _say(a, "What time is it?")
        await rc.send(a, {"type": "response.create"})
        first = (await rc.until(a, "response.done"))["response"]
        assert first["status"] in ("completed", "incomplete")
        await rc.send(a, {"type": "conversation.item.delete", "item_id": first["output"][0]["id"]})
        await rc.until(a, "conversation.item.deleted")
        await rc.send(a, {"type": "response.create"})
        events: list[dict] = []
        again = (await rc.until(a, "response.done", events=events))["response"]
        assert again["status"] in ("completed", "incomplete"), again
        assert "error" not in rc.types(events)
        # the prompt was all cached: its last position is computed again, for its hidden state
        assert again["mimo"]["timings"]["prefill_positions"] == 1
        await _finishes_with_its_audio(b, b_events)
    finally:
        await a.close()
        await b.close()


async def test_a_fault_serving_one_session_fails_it_alone(server, monkeypatch):
    engine = server.engine
    b, b_events = await _talking(server)
    a = await rc.connect(server.ws_url)
    real = engine.lm.prefill

    def prefill(cache, slot, emb):
        if slot == max(engine._sessions.values(), key=lambda s: s.sid).slot:  # a's, the newest session
            raise RuntimeError("injected fault")
        return real(cache, slot, emb)

    monkeypatch.setattr(engine.lm, "prefill", prefill)
    try:
        await rc.update(a, audio={"input": {"turn_detection": None}}, output_modalities=["text"])
        await _say(a, "Hello")
        await rc.send(a, {"type": "response.create"})
        events: list[dict] = []
        done = (await rc.until(a, "response.done", events=events))["response"]
        assert done["status"] == "failed"
        error = await rc.until(a, "error", events=events)
        assert error["error"]["type"] == "server_error"
        assert "prefill failed: RuntimeError: injected fault" in error["error"]["message"]
        await _finishes_with_its_audio(b, b_events)
        monkeypatch.setattr(engine.lm, "prefill", real)
        # the failed session goes on
        await _say(a, "Still there?")
        await rc.send(a, {"type": "response.create"})
        after = (await rc.until(a, "response.done"))["response"]
        assert after["status"] in ("completed", "incomplete")
    finally:
        await a.close()
        await b.close()
