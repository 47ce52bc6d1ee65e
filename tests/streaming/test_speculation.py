"""Speculative answers over a real socket: a server that speculates at a candidate end of turn (the
default) and one that does not (``--no-speculate``) send a stock client the same events for the same
recorded speech; a speculation dropped because the user went on, or cleared the turn, sends nothing."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import pytest

from tests.streaming import realtime_client as rc
from tests.streaming.live_server import start_server

pytestmark = pytest.mark.timeout(180)

SESSION = {"max_output_tokens": 10, "audio": {"input": {"transcription": None}}}  # OpenAI's default server_vad
HELLO = rc.wav_pcm16("speech_hello_padded.wav")  # speech 0.6 .. 2.87 s, then 1 s of silence


@pytest.fixture(scope="module")
def servers():
    # held answers start at the candidate end (a lead over the window), as the client sends faster than real time
    on, off = start_server("--speculate-lead-ms", "1000"), start_server("--no-speculate")
    yield on, off
    on.stop()
    off.stop()


def shape(events: list[dict]) -> list[str]:
    """Event types in order, a run of deltas counted once as ``deltas``: how many text and audio
    deltas an answer has, and in which order, is its content (a speculated answer hears the turn up to
    its candidate end, and the sessions sample)."""
    kinds: list[str] = []
    for kind in rc.types(events):
        kind = "deltas" if kind.endswith(".delta") else kind
        if not (kinds and kinds[-1] == kind == "deltas"):
            kinds.append(kind)
    return kinds


async def turn(server, audio: bytes) -> list[dict]:
    """A stock client's spoken turn: the events until its answer is done."""
    ws = await rc.connect(server.ws_url)
    try:
        await rc.update(ws, **SESSION)
        await rc.append(ws, audio)
        events: list[dict] = []
        await rc.until(ws, "response.done", events=events)
        return events
    finally:
        await ws.close()


async def until(check, what: str) -> None:
    """Poll the engine's state (the bound only guards against a hang)."""
    for _ in range(6000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {what}")


async def speculations(server) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=server.url) as http:
        text = (await http.get("/metrics")).text
    counts = {m[0]: float(m[1]) for m in re.findall(r'^mimo_speculations_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}
    wasted = re.search(r"^mimo_speculation_wasted_patches_total (\S+)$", text, re.M)
    cpu = re.search(r"^mimo_engine_cpu_seconds_total (\S+)$", text, re.M)
    return {**counts, "wasted_patches": float(wasted.group(1)) if wasted else 0.0,
            "engine_cpu_s": float(cpu.group(1)) if cpu else 0.0}


async def test_a_stock_client_sees_the_same_events_with_and_without_speculation(servers):
    on, off = servers
    before = await speculations(on)
    with_spec, without = await turn(on, HELLO), await turn(off, HELLO)
    assert shape(with_spec) == shape(without)
    assert shape(with_spec)[:7] == [
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "conversation.item.added", "conversation.item.done", "response.created", "rate_limits.updated"]
    assert len(rc.audio_of(with_spec)) > 0 and with_spec[-1]["response"]["status"] == "incomplete"
    after = await speculations(on)
    assert after["started"] == before.get("started", 0) + 1 and after["confirmed"] == before.get("confirmed", 0) + 1
    assert after.get("abandoned", 0) == before.get("abandoned", 0)
    assert (await speculations(off)).get("started", 0) == 0
    assert after["engine_cpu_s"] > before["engine_cpu_s"]  # the model's work, what speculation adds to


async def test_speech_after_a_pause_drops_the_speculation_and_sends_nothing_of_it(servers):
    on, off = servers
    pcm = np.frombuffer(HELLO, np.int16)
    # the user pauses 300 ms (a candidate end at 200 ms, no end of turn at 500 ms) and goes on
    audio = np.concatenate([pcm[:24 * 2900], np.zeros(24 * 300, np.int16), pcm[24 * 600:24 * 2900],
                            np.zeros(24 * 1000, np.int16)]).tobytes()
    before = await speculations(on)
    with_spec, without = await turn(on, audio), await turn(off, audio)
    assert shape(with_spec) == shape(without)
    assert rc.types(with_spec).count("response.created") == 1
    after = await speculations(on)
    assert after["abandoned"] == before.get("abandoned", 0) + 1  # at the pause
    assert after["confirmed"] == before.get("confirmed", 0) + 1  # at the turn's end


async def test_a_cleared_turn_takes_its_held_answer_with_it(servers):
    on, _ = servers
    ws = await rc.connect(on.ws_url)
    try:
        await rc.update(ws, **SESSION)
        before = await speculations(on)
        await rc.append(ws, HELLO[:2 * 24 * 3100])  # 230 ms into the silence: past the candidate end

        def held(patches: int) -> bool:  # the engine holds an answer with that many patches
            return any(s.speculation is not None and len(s.speculation.answer.patches) >= patches
                       for s in list(on.engine._sessions.values()))
        await until(lambda: held(2), "a held answer")
        abandoned = on.engine.speculations["abandoned"]
        await rc.send(ws, {"type": "input_audio_buffer.clear"})
        await until(lambda: on.engine.speculations["abandoned"] > abandoned, "the abandon")  # counted once done
        events: list[dict] = []
        await rc.send(ws, {"type": "conversation.item.retrieve", "item_id": "none"})  # a round trip after it
        await rc.until(ws, "error", events=events)
        assert rc.types(events) == ["input_audio_buffer.speech_started", "input_audio_buffer.cleared", "error"]
        after = await speculations(on)
        assert after["abandoned"] == before.get("abandoned", 0) + 1
        assert after["wasted_patches"] >= before.get("wasted_patches", 0) + 2
    finally:
        await ws.close()
