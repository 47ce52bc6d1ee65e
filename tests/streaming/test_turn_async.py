"""semantic_vad's end-of-turn model over a real socket: its call runs off the event loop, so a slow
call holds up only the turn it scores (another session's events flow meanwhile), and the answer
speculated at the candidate end is already running when a confident score ends the turn there.

The model's call is replaced by a deliberately slow (or instant) one at the model class the server
uses, so nothing here depends on its speed or on its scores for real speech."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from agent.engine import Engine
from streaming import turn_model as M
from streaming.bench.turns import room_tone
from tests.streaming import realtime_client as rc
from tests.streaming.live_server import start_server

pytestmark = pytest.mark.timeout(180)

EN_M = np.frombuffer(rc.wav_pcm16("real_speech_en_m.wav"), np.int16)  # speech 0.10 .. 4.22 s
SEMANTIC = {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}, "transcription": None}},
            "max_output_tokens": 6}
HANG_GUARD_S = 20  # only ends a test whose event never comes


@pytest.fixture(scope="module")
def server():
    live = start_server("--max-sessions", "3")
    yield live
    live.stop()


class Gate:
    """A model call that blocks until released, then says the turn has ended (P = 1)."""

    def __init__(self) -> None:
        self.entered, self.release, self.calls = threading.Event(), threading.Event(), 0

    def probability(self, model: M.SmartTurn, audio16k: np.ndarray) -> float:
        self.calls += 1
        self.entered.set()
        self.release.wait(2 * HANG_GUARD_S)
        return 1.0


def turn_audio(silence_ms: int = 1500) -> bytes:
    return np.concatenate([EN_M, room_tone(EN_M, silence_ms)]).tobytes()


async def test_another_session_flows_while_one_is_scoring_the_end_of_its_turn(server, monkeypatch):
    gate = Gate()
    monkeypatch.setattr(M.SmartTurn, "probability", lambda model, audio: gate.probability(model, audio))
    a, b = await rc.connect(server.ws_url), await rc.connect(server.ws_url)
    try:
        await rc.update(a, **SEMANTIC)
        await rc.append(a, turn_audio())
        assert await asyncio.to_thread(gate.entered.wait, HANG_GUARD_S), "the model was never called"
        # while A's turn is being scored, B's messages are answered and A's audio is still taken
        await rc.send(b, {"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief."}})
        updated = await rc.until(b, "session.updated", timeout=HANG_GUARD_S)
        assert updated["session"]["instructions"] == "Be brief."
        await rc.append(a, bytes(2 * 24 * 100))
        assert gate.calls == 1 and not gate.release.is_set()
        gate.release.set()
        events: list[dict] = []
        stopped = await rc.until(a, "input_audio_buffer.speech_stopped", events=events)
        assert rc.types(events) == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"]
        started = events[0]
        # ended at the candidate (200 ms into the silence), where the score was asked for
        assert 4200 <= stopped["audio_end_ms"] <= 4500 and stopped["item_id"] == started["item_id"]
        done = await rc.until(a, "response.done", events=events)
        assert done["response"]["status"] in ("completed", "incomplete") and "error" not in rc.types(events)
    finally:
        gate.release.set()
        await a.close()
        await b.close()


@pytest.mark.parametrize("engine_lag_ms", [0, 10])
async def test_a_confident_score_releases_the_answer_speculated_at_the_candidate(server, monkeypatch, engine_lag_ms):
    """Also with the engine's thread taking ``engine_lag_ms`` over each part of streamed audio, as
    on a loaded machine, while the client sends faster than real time: a job per 20 ms append then
    queued more than the speculation's headroom allows, and the answer was not speculated."""
    monkeypatch.setattr(M.SmartTurn, "probability", lambda model, audio: 1.0)
    if engine_lag_ms:
        take = Engine._stream_audio

        def lagging(engine: Engine, session: object, job: object) -> None:
            time.sleep(engine_lag_ms / 1000)
            take(engine, session, job)
        monkeypatch.setattr(Engine, "_stream_audio", lagging)
    before = dict(server.engine.speculations)
    ws = await rc.connect(server.ws_url)
    try:
        await rc.update(ws, **SEMANTIC)
        await rc.append(ws, turn_audio())
        events: list[dict] = []
        done = await rc.until(ws, "response.done", events=events)
        assert rc.types(events)[:3] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                        "input_audio_buffer.committed"]
        assert rc.types(events).count("response.created") == 1 and "error" not in rc.types(events)
        # the answer had been started at the candidate end, before the score: the release sent it
        assert "speculated_ms" in done["response"]["mimo"]["timings"], server.engine.speculations
        after = server.engine.speculations
        assert after["started"] == before["started"] + 1 and after["confirmed"] == before["confirmed"] + 1
        assert after["abandoned"] == before["abandoned"]
    finally:
        await ws.close()
