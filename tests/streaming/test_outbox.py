"""The outbox on its own: what may overtake paced audio, what may not, and the byte budget."""

from __future__ import annotations

import asyncio

import pytest

from streaming import protocol as p
from streaming.audio import b64encode_audio
from streaming.outbox import Outbox, OutboxFull
from streaming.pipeline import _cancelled

pytestmark = pytest.mark.timeout(30)

HANG_GUARD_S = 5.0  # far beyond any wait these tests expect; a wait this long means a hang


def delta(response_id: str, n: int = 4800) -> p.ResponseOutputAudioDelta:
    return p.ResponseOutputAudioDelta(response_id=response_id, item_id="item_1", output_index=0, content_index=0,
                                      delta=b64encode_audio(bytes(2 * n)))


def audio_done(response_id: str) -> p.ResponseOutputAudioDone:
    return p.ResponseOutputAudioDone(response_id=response_id, item_id="item_1", output_index=0, content_index=0)


def error(message: str) -> p.ErrorEvent:
    return p.ErrorEvent(error=p.ErrorDetail(type="invalid_request_error", code="invalid_value", message=message))


async def take(outbox: Outbox, n: int) -> list:
    return [await asyncio.wait_for(outbox.get(), HANG_GUARD_S) for _ in range(n)]


async def test_control_events_overtake_paced_audio_but_a_response_keeps_its_order():
    outbox = Outbox(lead_s=0.0)
    for _ in range(3):
        outbox.put(delta("resp_1", 480), audio_s=0.02, response_id="resp_1")
    outbox.put(audio_done("resp_1"), response_id="resp_1")
    outbox.put(delta("resp_2", 480), audio_s=0.02, response_id="resp_2")  # the next response follows
    outbox.put(error("late"))
    got = await take(outbox, 6)
    kinds = [(e.type, getattr(e, "response_id", None)) for e in got]
    # the first delta is due at once; the error does not wait for the pacing clock
    assert kinds[:2] == [("response.output_audio.delta", "resp_1"), ("error", None)]
    assert kinds[2:] == [("response.output_audio.delta", "resp_1")] * 2 + [
        ("response.output_audio.done", "resp_1"), ("response.output_audio.delta", "resp_2")]


async def test_events_already_due_keep_their_queue_order():
    outbox = Outbox(pace_audio=False)
    outbox.put(delta("resp_1"), audio_s=0.2, response_id="resp_1")
    outbox.put(error("a"))
    outbox.put(audio_done("resp_1"), response_id="resp_1")
    outbox.put(error("b"))
    got = await take(outbox, 4)
    assert [e.type for e in got] == ["response.output_audio.delta", "error", "response.output_audio.done", "error"]


async def test_flushing_a_response_releases_its_closing_events_at_once():
    outbox = Outbox(lead_s=0.0)
    for _ in range(3):
        outbox.put(delta("resp_1"), audio_s=60.0, response_id="resp_1")  # a minute each: only a flush frees them
    await take(outbox, 1)  # the first is due at once
    waiting = asyncio.ensure_future(outbox.get())
    await asyncio.sleep(0)
    outbox.put(audio_done("resp_1"), response_id="resp_1")
    assert outbox.flush_audio("resp_1") == 120.0
    assert (await asyncio.wait_for(waiting, HANG_GUARD_S)).type == "response.output_audio.done"
    assert outbox.queued_audio_s == 0 and outbox.queued_bytes == 0
    outbox.put(delta("resp_2"), audio_s=60.0, response_id="resp_2")  # the next response plays at once
    assert (await take(outbox, 1))[0].response_id == "resp_2"


async def test_the_byte_budget_and_failing():
    event = delta("resp_1")
    size = len(event.to_json().encode())
    outbox = Outbox(max_bytes=3 * size, pace_audio=False)
    for _ in range(3):
        outbox.put(event, audio_s=0.2, response_id="resp_1")
    assert outbox.queued_bytes == outbox.peak_bytes == 3 * size
    with pytest.raises(OutboxFull, match=f"limit of {3 * size} bytes"):
        outbox.put(error("one more"))
    await take(outbox, 1)
    outbox.put(error("fits again"))  # sending made room
    outbox.fail(error("closing: the client is not reading"))
    assert outbox.closed and outbox.failed and outbox.queued_bytes == 0
    outbox.put(error("after the close: ignored"))
    assert [e.error.message for e in await take(outbox, 1)] == ["closing: the client is not reading"]
    assert await outbox.get() is None


async def test_a_response_stopped_while_it_plays_is_done_cancelled_if_its_done_was_still_queued():
    """A response generated in full but cancelled while its paced audio plays: for the client it
    was still running (no response.done yet), so the response.done it gets says cancelled."""
    outbox = Outbox(lead_s=0.0)
    for _ in range(3):
        outbox.put(delta("resp_1", 4800), audio_s=0.2, response_id="resp_1")
    item = p.ConversationItem(id="item_1", type="message", role="assistant", status="completed", content=[])
    outbox.put(p.ResponseOutputItemDone(response_id="resp_1", output_index=0, item=item), response_id="resp_1")
    outbox.put(p.ResponseDone(response=p.RealtimeResponse(id="resp_1", status="completed", output=[item])),
               response_id="resp_1")
    outbox.flush_audio("resp_1")
    outbox.rewrite("resp_1", lambda event: _cancelled(event, "client_cancelled"))
    item_done, done = await take(outbox, 2)
    assert item_done.type == "response.output_item.done" and item_done.item.status == "incomplete"
    assert done.type == "response.done" and done.response.status == "cancelled"
    assert done.response.status_details.reason == "client_cancelled" and done.response.output[0].status == "incomplete"
