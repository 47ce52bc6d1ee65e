"""Interrupts and the send queue, end to end on the real server (loopback, tiny model on the CPU).

The engine generates ahead of real time and the server paces audio to the listener, so while an
answer plays, seconds of its audio wait in the session's outbox. An interrupt must drop them at
once, control events must not wait behind them, and a client that stops reading must not grow the
server without bound."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json

import pytest
import websockets

from streaming import protocol as p
from streaming.app import new_bridge
from streaming.outbox import Outbox
from streaming.session import Transport
from tests.streaming import realtime_client as rc
from tests.streaming.live_server import assert_heard_in_context, start_server

pytestmark = pytest.mark.timeout(120)

LONG = {"max_output_tokens": 200, "mimo": {"min_output_tokens": 200}}  # 32 s of speech
QUEUED_S = 0.6  # audio the outbox holds when the tests interrupt


@pytest.fixture(scope="module")
def server():
    # no pacing lead: what can be on its way when an interrupt arrives is at most one delta, so a
    # loaded CPU (the engine barely ahead of real time) still tells queued audio from in-flight audio
    live = start_server("--max-sessions", "4", "--audio-lead", "0")
    yield live
    live.stop()


def _bridge_of(server, response_id: str):
    return next(b for b in server.app.state.bridges
                if response_id in b.session._responses)


async def _talking(server, ws, events: list[dict], queued_s: float = QUEUED_S):
    """Start a long spoken answer and read it until the server holds ``queued_s`` of its audio
    unsent (the engine is ahead of the listener); returns (first audio delta, outbox)."""
    await rc.update(ws, audio={"input": {"turn_detection": None}}, **LONG)
    await rc.send(ws, {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}})
    await rc.send(ws, {"type": "response.create"})
    first = await rc.until(ws, "response.output_audio.delta", events=events)
    outbox = _bridge_of(server, first["response_id"]).outbox
    for _ in range(1600):  # the tiny model is far ahead of real time on an idle CPU
        if outbox.queued_audio_s >= queued_s:
            return first, outbox
        with contextlib.suppress(TimeoutError):
            events.append(await rc.recv(ws, timeout=0.05))
    raise AssertionError(f"the engine never got {queued_s} s ahead of playback (is the CPU that busy?)")


def _audio_s(events: list[dict], response_id: str) -> float:
    return len(rc.audio_of([e for e in events if e.get("response_id") == response_id])) / rc.RATE


def _in_flight_s(server) -> float:
    """Audio that may have left before the server saw the interrupt: the pacing lead and one delta."""
    return server.app.state.config.audio_lead_s + 0.2


async def test_cancel_stops_the_audio_at_once(server):
    ws = await rc.connect(server.ws_url)
    try:
        events: list[dict] = []
        first, outbox = await _talking(server, ws, events)
        rid = first["response_id"]
        await rc.send(ws, {"type": "response.cancel"})
        await rc.send(ws, {"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief."}})
        after: list[dict] = []
        await rc.until(ws, "session.updated", events=after)
    finally:
        await ws.close()
    kinds = rc.types(after)
    assert "response.done" in kinds, kinds  # the cancel completed before the next event's reply
    done = after[kinds.index("response.done")]["response"]
    assert done["id"] == rid and done["status"] == "cancelled"
    assert "response.output_audio.delta" not in kinds[kinds.index("response.done"):]
    # what was queued never left: only what was already on its way arrives after the cancel
    assert _audio_s(after, rid) <= _in_flight_s(server)
    assert outbox.queued_audio_s == 0


async def test_control_events_do_not_wait_behind_paced_audio(server):
    ws = await rc.connect(server.ws_url)
    try:
        events: list[dict] = []
        first, _ = await _talking(server, ws, events)
        await rc.send(ws, {"type": "conversation.item.retrieve", "item_id": first["item_id"]})
        await rc.send(ws, {"type": "response.cancel", "response_id": "resp_unknown"})
        after: list[dict] = []
        await rc.until(ws, "error", events=after)
        await rc.send(ws, {"type": "response.cancel"})
        await rc.until(ws, "response.done", events=after)
    finally:
        await ws.close()
    kinds = rc.types(after)
    assert kinds.index("conversation.item.retrieved") < kinds.index("error")
    before_reply = after[: kinds.index("error")]
    assert _audio_s(before_reply, first["response_id"]) <= _in_flight_s(server)


async def test_truncate_right_after_cancel_holds(server):
    """Clients send cancel and truncate back to back; the end of the response must not undo it."""
    ws = await rc.connect(server.ws_url)
    try:
        events: list[dict] = []
        first, _ = await _talking(server, ws, events, queued_s=0)
        item_id = first["item_id"]
        while _audio_s(events, first["response_id"]) < 0.5:  # the listener heard 480 ms
            events.append(await rc.recv(ws))
        await rc.send(ws, {"type": "response.cancel"})
        await rc.send(ws, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                           "audio_end_ms": 480})
        after: list[dict] = []
        truncated = await rc.until(ws, "conversation.item.truncated", events=after)
        assert "response.done" in rc.types(after)  # the cancel completed first
        assert truncated["audio_end_ms"] == 480
        await asyncio.sleep(0.5)  # the engine applies the cancel and the truncate on its thread
        assert_heard_in_context(server, item_id, 480)
        # the item is 480 ms long now, for the server as for the model: a later truncate is refused
        await rc.send(ws, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                           "audio_end_ms": 800})
        error = await rc.until(ws, "error")
        assert error["error"]["param"] == "audio_end_ms"
        assert not any(e["type"] == "error" for e in after)
    finally:
        await ws.close()


async def test_delete_right_after_cancel_deletes(server):
    """LiveKit's truncate(audio_end_ms=0): cancel, then delete the item, in one breath."""
    ws = await rc.connect(server.ws_url)
    try:
        events: list[dict] = []
        first, _ = await _talking(server, ws, events, queued_s=0)
        item_id = first["item_id"]
        await rc.send(ws, {"type": "response.cancel"})
        await rc.send(ws, {"type": "conversation.item.delete", "item_id": item_id})
        after: list[dict] = []
        deleted = await rc.until(ws, "conversation.item.deleted", events=after)
        assert deleted["item_id"] == item_id
        assert not any(e["type"] == "error" for e in after), after
        # a short text answer: the engine has handled the jobs before it, so it no longer holds the item
        await rc.send(ws, {"type": "response.create", "response": {"output_modalities": ["text"],
                                                                   "max_output_tokens": 4}})
        done = await rc.until(ws, "response.done")
        assert done["response"]["status"] in ("completed", "incomplete")
        assert not any(it.item_id == item_id for s in server.engine._sessions.values() for it in s.items)
    finally:
        await ws.close()


def _speech_item(seconds: float) -> dict:
    speech = rc.wav_pcm16("speech_hello_padded.wav")
    pcm = (speech * int(seconds * rc.RATE * 2 // len(speech) + 1))[: int(seconds * rc.RATE) * 2]
    part = {"type": "input_audio", "audio": base64.b64encode(pcm).decode()}
    return {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [part]}}


async def test_a_client_that_never_reads_is_closed_with_the_reason(server):
    """The retrieve flood: each retrieve of a long item queues megabytes; a client that never
    reads must not grow the server past its budget (it was +1.2 GB for 300 retrieves)."""
    config = server.app.state.config
    saved = config.max_queued_bytes
    config.max_queued_bytes = 2 * 2**20
    ws = await rc.connect(server.ws_url, max_queue=1)
    try:
        await rc.update(ws, audio={"input": {"turn_detection": None}})
        await ws.send(json.dumps(_speech_item(10.0)))
        item_id = (await rc.until(ws, "conversation.item.done"))["item"]["id"]
        bridge = next(b for b in server.app.state.bridges if item_id in b.session.conversation)
        # ~640 KB per answer; the client reads none of them
        for _ in range(200):
            await rc.send(ws, {"type": "conversation.item.retrieve", "item_id": item_id})
            if bridge.closed:
                break
            await asyncio.sleep(0.005)
        assert bridge.closed and bridge.outbox.failed
        assert bridge.outbox.peak_bytes <= config.max_queued_bytes
        assert bridge not in server.app.state.bridges or bridge.handle.closed
        # the client reads at last: what was on its way, then the reason, then the close
        last = None
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                last = await rc.recv(ws, timeout=30)
    finally:
        config.max_queued_bytes = saved
        await ws.close()
    assert last is not None and last["type"] == "error" and last["error"]["code"] == "send_queue_full"
    assert "not reading" in last["error"]["message"]
    assert closed.value.rcvd.code == 1008


async def test_an_event_from_the_engine_that_does_not_fit_closes_the_session(server):
    """The outbox overflows while engine feedback is delivered (audio deltas): the session is closed
    with the reason, never left open with the event dropped."""
    outbox = Outbox(max_bytes=64 * 1024)
    bridge = new_bridge(server.app, Transport.WEBSOCKET, outbox)
    bridge.open()
    try:
        bridge.start(server.app.state.config.session_defaults, model="mimo-test")
        for event in [
            {"type": "session.update", "session": {"type": "realtime", **LONG,
                                                   "audio": {"input": {"turn_detection": None}}}},
            {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                          "content": [{"type": "input_text", "text": "Hi!"}]}},
            {"type": "response.create"},
        ]:
            bridge.receive(json.dumps(event))
        for _ in range(600):  # nobody sends: the deltas pile up
            if outbox.closed:
                break
            await asyncio.sleep(0.05)
        assert bridge.closed and outbox.failed and bridge.handle.closed
        assert outbox.peak_bytes <= outbox.max_bytes
        error = await outbox.get()
        assert isinstance(error, p.ErrorEvent) and error.error.code == "send_queue_full"
        assert f"limit of {64 * 1024} bytes" in error.error.message and "not reading" in error.error.message
    finally:
        bridge.close()
    assert await outbox.get() is None


async def test_the_interrupt_benchmark_measures_each_cancel(server):
    """``mimo-agent bench-interrupts``' measurement on this server: two interrupts in one session."""
    from streaming.bench.interrupts import measure, summarize

    args = argparse.Namespace(sessions=1, after="0.2,0.3", answer_patches=200, seed=0, timeout=60.0, api_key=None)
    records = await measure(server.url, args, "server", "websocket", 2)
    summary = summarize(records)
    assert summary["interrupts"] == 2 and summary["statuses"] == ["cancelled"]
    assert all(r.cancel_at < r.done_at for r in records)
    assert records[0].next_first_audio_at > records[0].done_at  # the next answer, after the cancelled one
    assert summary["cancel_to_done_ms"]["n"] == 2 and summary["audio_after_cancel_ms"]["n"] == 2
