"""WebRTC end to end: an aiortc client places calls on the real server (loopback, tiny model on the
CPU), speaks recorded utterances on its microphone track, and reads the agent's track and the
``oai-events`` data channel. Plus the output track and ICE configuration on their own."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import urllib.error
import urllib.request

import httpx
import numpy as np
import pytest
from aiortc import RTCSessionDescription

from streaming.webrtc import (
    FRAME_SAMPLES,
    MAX_OFFER_BYTES,
    AgentAudioTrack,
    MicrophoneReader,
    WebRTCOptions,
    ice_servers,
    parse_ice_server,
)
from tests.streaming import realtime_client as rc
from tests.streaming import rtc_client as rtc
from tests.streaming.helpers import MALFORMED_JSON
from tests.streaming.live_server import assert_heard_in_context, start_server

pytestmark = pytest.mark.timeout(120)

MAX_SESSIONS = 3
LONG_RESPONSE = {"max_output_tokens": 200, "mimo": {"min_output_tokens": 200}}  # 32 s of speech


@pytest.fixture(scope="module")
def server():
    live = start_server("--max-sessions", str(MAX_SESSIONS))
    yield live
    live.stop()


async def _settled(server, target: int = 0, timeout_s: float = 15.0) -> int:
    """Wait (bounded) until the engine's active sessions drop to ``target``; returns the count."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while server.engine.active_sessions > target and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return server.engine.active_sessions


def _call_of(server, call: rtc.RtcCall):
    return server.app.state.calls[call.call_id]


async def test_spoken_turn_over_webrtc(server):
    assert await _settled(server) == 0
    call = await rtc.place_call(server.url)
    try:
        assert re.fullmatch(r"/v1/realtime/calls/rtc_[0-9a-f]{20}", call.location)
        server_call = _call_of(server, call)
        call.mic.say(rc.wav_pcm16("speech_hello_padded.wav"))
        events: list[dict] = []
        done = await call.until("response.done", events=events)
        stopped = await call.until("output_audio_buffer.stopped", events=events)
        sent_samples = server_call.track.audio_samples_sent
    finally:
        await call.close()
    kinds = rtc.types(events)
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "response.created", "output_audio_buffer.started",
             "response.done", "output_audio_buffer.stopped"]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), kinds
    # the transcript's deltas, if the random weights wrote any readable text, within the response
    texts = [i for i, k in enumerate(kinds) if k == "response.output_audio_transcript.delta"]
    assert all(kinds.index("response.created") < i < positions[-2] for i in texts)
    assert "response.output_audio.delta" not in kinds, "audio travels on the media track only"
    response = done["response"]
    assert response["status"] in ("completed", "incomplete")
    started = events[kinds.index("output_audio_buffer.started")]
    assert started["response_id"] == stopped["response_id"] == response["id"]
    transcript = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    assert transcript == events[kinds.index("response.output_audio_transcript.done")]["transcript"]
    assert response["mimo"]["timings"]["server_first_audio_ms"] > 0

    # every sample of the response went out on the track (24 kHz -> 48 kHz), before `stopped`
    audio_ms = response["mimo"]["audio_ms"]
    assert audio_ms > 0 and sent_samples == round(audio_ms * 48)
    # ... and came back out of the Opus decoder on a contiguous media clock at 48 kHz
    frames = call.frames
    assert {f.rate for f in frames} == {48_000}
    steps = {b.pts - a.pts for a, b in itertools.pairwise(frames)}
    assert steps == {FRAME_SAMPLES}, steps
    loud = [f for f in frames if f.peak > 64]
    heard_ms = (loud[-1].pts - loud[0].pts) / 48 + 20
    assert heard_ms == pytest.approx(audio_ms, abs=100)


async def test_barge_in_clears_the_playout_buffer(server):
    assert await _settled(server) == 0
    vad = {"type": "server_vad", "create_response": False, "interrupt_response": True}
    session = {"type": "realtime", **LONG_RESPONSE, "audio": {"input": {"turn_detection": vad}}}
    call = await rtc.place_call(server.url, session=session)
    try:
        server_call = _call_of(server, call)
        call.mic.say(rc.wav_pcm16("speech_hello_padded.wav"))
        await call.until("input_audio_buffer.committed")
        call.send({"type": "response.create"})
        events: list[dict] = []
        started = await call.until("output_audio_buffer.started", events=events)
        await asyncio.sleep(0.5)  # the agent is talking
        call.mic.say(rc.wav_pcm16("speech_hello_padded.wav"))  # the user talks over it
        await call.until("input_audio_buffer.speech_started", events=events)
        done = await call.until("response.done", events=events)
        cleared = next((e for e in events if e["type"] == "output_audio_buffer.cleared"), None)
        if cleared is None:
            cleared = await call.until("output_audio_buffer.cleared", events=events)
        await call.until("input_audio_buffer.committed", events=events)  # the user's second turn
        buffered_after = server_call.track.buffered_s
        dropped = server_call.track.samples_dropped
        frames_at_clear = len([f for f in call.frames if f.at <= cleared["_at"]])
        await asyncio.sleep(1.0)
    finally:
        await call.close()
    assert done["response"]["id"] == started["response_id"] == cleared["response_id"]
    # the server cut the item to what the track had played (it owns playback over WebRTC)
    truncated = next(e for e in events if e["type"] == "conversation.item.truncated")
    assert truncated["item_id"] == done["response"]["output"][0]["id"]
    assert 0 < truncated["audio_end_ms"] < done["response"]["mimo"]["audio_ms"]
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    assert "output_audio_buffer.stopped" not in rtc.types(events)
    # the response was generated ahead of playback: what was buffered was dropped, nothing plays after
    assert dropped > 0 and buffered_after == 0
    late = call.frames[frames_at_clear + 15:]  # 300 ms for frames already in flight
    assert len(late) > 25 and max(f.peak for f in late) <= 64


async def test_cancel_truncates_the_item_to_what_the_track_played(server):
    """Over WebRTC the server owns playback: after an interrupt it cuts the assistant item to what
    went out on the track, as a WebSocket client would with conversation.item.truncate."""
    assert await _settled(server) == 0
    session = {"type": "realtime", **LONG_RESPONSE, "audio": {"input": {"turn_detection": None}}}
    call = await rtc.place_call(server.url, mic=False, session=session)
    try:
        server_call = _call_of(server, call)
        call.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}})
        call.send({"type": "response.create"})
        events: list[dict] = []
        started = await call.until("output_audio_buffer.started", events=events)
        for _ in range(400):  # the engine gets ahead: its audio waits in the track
            if server_call.track.buffered_s >= 1.0:
                break
            await asyncio.sleep(0.05)
        assert server_call.track.buffered_s >= 1.0
        call.send({"type": "response.cancel"})
        truncated = await call.until("conversation.item.truncated", events=events)
        played_samples = server_call.track.audio_samples_sent  # 48 kHz, all of this response
        frames_at_cut = len([f for f in call.frames if f.at <= truncated["_at"]])
        await asyncio.sleep(1.0)  # the engine applies the truncate on its thread; the track stays quiet
        assert server_call.track.audio_samples_sent == played_samples  # nothing plays after the cut
        assert_heard_in_context(server, truncated["item_id"], truncated["audio_end_ms"])
    finally:
        await call.close()
    kinds = rtc.types(events)
    done = events[kinds.index("response.done")]["response"]
    assert done["status"] == "cancelled" and done["id"] == started["response_id"]
    assert kinds.index("output_audio_buffer.cleared") < kinds.index("response.done") < kinds.index(
        "conversation.item.truncated")
    assert done["output"][0]["id"] == truncated["item_id"]
    assert truncated["audio_end_ms"] == played_samples // 48 > 0
    assert done["mimo"]["audio_ms"] - truncated["audio_end_ms"] >= 900  # what was buffered was never heard
    late = call.frames[frames_at_cut + 15:]  # 300 ms for frames already in flight
    assert len(late) > 25 and max(f.peak for f in late) <= 64


async def test_events_sent_as_the_channel_opens_wait_for_the_slot(server):
    """A client may send as soon as its data channel opens, before the server's side of the call has
    taken its engine slot (a race the server loses under load): the events wait for the slot."""
    assert await _settled(server) == 0
    pc, channel = await rtc.make_offer(mic=False)
    got: list[dict] = []
    channel.on("message", lambda message: got.append(json.loads(message)))
    update = {"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief."}}
    try:
        answer = await rtc.post_offer(server.url, pc.localDescription.sdp)
        call = server.app.state.calls[answer.headers["location"].rsplit("/", 1)[-1]]
        # the event reaches the call before its peer connected, as in the race
        call.task.get_loop().call_soon_threadsafe(call.on_client_message, json.dumps(update))
        await pc.setRemoteDescription(RTCSessionDescription(answer.text, "answer"))
        for _ in range(600):
            if {"session.updated", "error"} & set(rtc.types(got)):
                break
            await asyncio.sleep(0.05)
    finally:
        await pc.close()
    assert "error" not in rtc.types(got), got
    assert rtc.types(got)[:2] == ["session.created", "session.updated"]
    assert got[1]["session"]["instructions"] == "Be brief."


async def test_multipart_offer_configures_the_session_and_receive_only_works(server):
    assert await _settled(server) == 0
    session = {"type": "realtime", "model": "ignored", "instructions": "Answer briefly.",
               "max_output_tokens": 20, "audio": {"input": {"turn_detection": None}}}
    call = await rtc.place_call(server.url, mic=False, session=session)
    try:
        created = call.log[0]
        assert created["type"] == "session.created"
        assert created["session"]["instructions"] == "Answer briefly."
        assert created["session"]["audio"]["input"]["turn_detection"] is None
        assert created["session"]["max_output_tokens"] == 20
        call.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}})
        call.send({"type": "response.create"})
        events: list[dict] = []
        done = await call.until("response.done", events=events)
        await call.until("output_audio_buffer.stopped", events=events)
    finally:
        await call.close()
    assert "session.updated" not in rtc.types(call.log)
    assert done["response"]["status"] in ("completed", "incomplete")
    assert any(f.peak > 64 for f in call.frames)


async def test_a_peer_that_closes_without_hanging_up_frees_its_slot(server):
    assert await _settled(server) == 0
    call = await rtc.place_call(server.url)
    call.mic.say(rc.wav_pcm16("speech_hello_padded.wav"))
    await call.until("input_audio_buffer.speech_started")
    assert server.engine.active_sessions == 1
    await call.close()  # no DELETE, no goodbye on the data channel
    assert await _settled(server) == 0
    assert call.call_id not in server.app.state.calls


async def test_a_peer_whose_media_stops_is_dropped(server):
    assert await _settled(server) == 0
    options = server.app.state.webrtc
    saved = options.media_timeout_s
    options.media_timeout_s = 1.0
    call = await rtc.place_call(server.url)
    try:
        call.mic.say(rc.wav_pcm16("speech_yes.wav"))
        await call.until("input_audio_buffer.speech_started")
        call.mic.stall()  # the connection stays up; the microphone goes quiet for good
        assert await _settled(server) == 0
        assert call.call_id not in server.app.state.calls
    finally:
        options.media_timeout_s = saved
        await call.close()


async def test_offers_that_never_connect_hold_no_slot(server):
    """One POST per slot used to keep the server full: an offer holds an engine slot only once its
    peer connects, and one that never does is dropped at the connect deadline."""
    assert await _settled(server) == 0
    options = server.app.state.webrtc
    saved = options.channel_open_timeout_s
    options.channel_open_timeout_s = 3.0
    vanished = [await rtc.make_offer() for _ in range(MAX_SESSIONS)]
    call = None
    try:
        for pc, _ in vanished:
            answered = await rtc.post_offer(server.url, pc.localDescription.sdp)
            assert answered.status_code == 201  # ... and the client never applies the answer
        assert server.engine.active_sessions == 0
        async with httpx.AsyncClient(base_url=server.url) as http:
            health = (await http.get("/healthz")).json()
        assert (health["sessions"], health["calls_connecting"]) == (0, MAX_SESSIONS)
        call = await rtc.place_call(server.url, mic=False)  # a real caller still gets in
        assert server.engine.active_sessions == 1
        for _ in range(100):  # the connect deadline drops the vanished offers (bounded wait)
            if len(server.app.state.calls) == 1:
                break
            await asyncio.sleep(0.1)
        assert list(server.app.state.calls) == [call.call_id]
    finally:
        options.channel_open_timeout_s = saved
        for pc, _ in vanished:
            await pc.close()
        if call is not None:
            await call.close()
    assert await _settled(server) == 0


async def test_calls_waiting_to_connect_are_bounded(server):
    assert await _settled(server) == 0
    options = server.app.state.webrtc
    saved = options.max_pending_calls
    options.max_pending_calls = 2
    peers = [(await rtc.make_offer(mic=False))[0] for _ in range(3)]
    try:
        answers = [await rtc.post_offer(server.url, pc.localDescription.sdp) for pc in peers]
        assert [a.status_code for a in answers] == [201, 201, 503]
        error = answers[2].json()["error"]
        assert error["code"] == "server_busy" and "2 calls are already connecting" in error["message"]
    finally:
        options.max_pending_calls = saved
        for pc in peers:
            await pc.close()
        for call in list(server.app.state.calls.values()):
            call.hangup()
    assert await _settled(server) == 0


async def test_a_call_that_connects_when_every_slot_is_taken_is_told_so(server):
    assert await _settled(server) == 0
    pc, dc = await rtc.make_offer(mic=False)
    sockets = []
    try:
        answered = await rtc.post_offer(server.url, pc.localDescription.sdp)
        assert answered.status_code == 201
        sockets = [await rc.connect(server.ws_url) for _ in range(MAX_SESSIONS)]  # the slots go meanwhile
        received: asyncio.Queue = asyncio.Queue()
        dc.on("message", received.put_nowait)
        closed = asyncio.Event()
        dc.on("close", closed.set)
        await pc.setRemoteDescription(RTCSessionDescription(answered.text, "answer"))
        event = json.loads(await asyncio.wait_for(received.get(), 30))
        assert event["type"] == "error" and event["error"]["code"] == "server_busy", event
        await asyncio.wait_for(closed.wait(), 30)  # ... and the call ends
    finally:
        await pc.close()
        for ws in sockets:
            await ws.close()
    assert await _settled(server) == 0
    assert server.app.state.calls == {}


async def _raw_post(server, head: str, body: bytes = b"", *, chunked: bool = False) -> tuple[int, dict]:
    """POST over a bare socket that sends ``body`` and then waits (never finishing a long body):
    the status and JSON of the response, which must come while the client still holds the rest."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"POST /v1/realtime/calls HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode())
        if body:
            writer.write(f"{len(body):x}\r\n".encode() + body + b"\r\n" if chunked else body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        headers = {}
        while (line := await asyncio.wait_for(reader.readline(), 30)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        payload = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
        return int(status_line.split()[1]), json.loads(payload)
    finally:
        writer.close()


def _urllib_post(url: str, body: bytes) -> urllib.error.HTTPError:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/sdp"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    return refused.value


async def test_offer_bodies_are_limited_while_reading(server):
    limit = MAX_OFFER_BYTES
    # a declared length over the limit: refused before any of the body is read
    status, body = await _raw_post(server, "Content-Type: application/sdp\r\nContent-Length: 209715200\r\n")
    assert status == 413 and body["error"]["code"] == "request_too_large", body
    assert "209715200" in body["error"]["message"] and str(limit) in body["error"]["message"]
    # no declared length (chunked): refused once the limit is passed, not at the end of the body
    part = b'--x\r\nContent-Disposition: form-data; name="sdp"\r\n\r\n'
    for ctype, start in (("application/sdp", b""), ("multipart/form-data; boundary=x", part)):
        status, body = await _raw_post(server, f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n",
                                       start + b"v" * (4 * limit), chunked=True)
        assert status == 413 and body["error"]["code"] == "request_too_large", (ctype, body)
    # a client that sends everything before it reads (httpx) gets the 413 too, not a reset
    good = await _offer_without()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        too_long = good + "a=x-padding:" + "p" * (limit + 1) + "\r\n"
        sdp_type = {"Content-Type": "application/sdp"}
        for response in (
            await http.post("/v1/realtime/calls", content=b"v" * (8 << 20), headers=sdp_type),
            await http.post("/v1/realtime/calls", files={"sdp": (None, b"v" * (8 << 20), "application/sdp")}),
            await http.post("/v1/realtime/calls", files={"sdp": (None, too_long, "application/sdp")}),
        ):
            assert response.status_code == 413, response.text
            assert response.json()["error"]["code"] == "request_too_large"
    # ... and one that asks to close the connection after the answer (urllib does)
    refused = await asyncio.to_thread(_urllib_post, server.url + "/v1/realtime/calls", b"v" * (8 << 20))
    assert refused.code == 413 and json.loads(refused.read())["error"]["code"] == "request_too_large"
    assert server.engine.active_sessions == 0 and server.app.state.calls == {}


async def test_hang_up(server):
    assert await _settled(server) == 0
    first = await rtc.place_call(server.url)
    second = await rtc.place_call(server.url, path="/v1/realtime")  # the beta flow's endpoint
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.delete(first.location)).status_code == 204
            assert first.call_id not in server.app.state.calls
            missing = await http.delete(first.location)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "call_id_not_found"
            assert (await http.post(second.location + "/hangup")).status_code == 200
        assert await _settled(server) == 0
    finally:
        await first.close()
        await second.close()


async def _until(connection, kind: str, seen: list, timeout: float = 30.0):
    """Events of an official-SDK connection until one of type ``kind``."""
    async def read():
        async for event in connection:
            seen.append(event)
            if event.type == kind:
                return event
        raise AssertionError(f"closed before {kind}")

    return await asyncio.wait_for(read(), timeout)


async def test_sideband_joins_the_call_and_steers_it(server):
    """OpenAI's sideband: the application server joins the browser's call by its id with the
    official SDK (``realtime.connect(call_id=...)``): it takes no slot, sees the call's events, and
    its session.update and response.create steer the call (the answer plays on the call's track)."""
    from openai import AsyncOpenAI

    assert await _settled(server) == 0
    call = await rtc.place_call(server.url, session={"type": "realtime", "max_output_tokens": 8,
                                                     "audio": {"input": {"turn_detection": None}}})
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
    seen: list = []
    try:
        async with client.realtime.connect(call_id=call.call_id) as side:
            created = await _until(side, "session.created", seen)
            assert created.session.id == call.log[0]["session"]["id"] and created.session.max_output_tokens == 8
            assert server.engine.active_sessions == 1  # the call's slot only
            await side.session.update(session={"type": "realtime", "instructions": "Answer in French."})
            updated = await _until(side, "session.updated", seen)
            on_call = await call.until("session.updated")
            assert updated.session.instructions == on_call["session"]["instructions"] == "Answer in French."
            frames_before = len(call.frames)
            await side.response.create()
            done = await _until(side, "response.done", seen)
            on_call = await call.until("response.done")
            assert done.response.id == on_call["response"]["id"] and done.response.status in ("completed",
                                                                                             "incomplete")
            await call.until("output_audio_buffer.stopped")
            assert any(f.peak > 64 for f in call.frames[frames_before:])  # the answer played on the call
            kinds = [e.type for e in seen]
            assert "output_audio_buffer.started" in kinds and "response.output_audio.delta" not in kinds
            async with httpx.AsyncClient(base_url=server.url) as http:
                assert (await http.delete(call.location)).status_code == 204
            with pytest.raises(AssertionError, match="closed before"):  # the call ended: so does the sideband
                await _until(side, "never", seen, timeout=10)
    finally:
        await call.close()
    assert await _settled(server) == 0


async def test_sideband_that_joins_before_the_peer_connects(server):
    """OpenAI's flow: the application server posts the browser's offer, hands back the answer and
    opens the sideband at once, before the browser's peer has connected. The sideband sees the
    call's own session.created (once), and what it sent meanwhile applies once the call runs."""
    import websockets

    assert await _settled(server) == 0
    pc, dc = await rtc.make_offer(mic=False)
    answer = await rtc.post_offer(server.url, pc.localDescription.sdp,
                                  session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    assert answer.status_code == 201
    call_id = answer.headers["location"].rsplit("/", 1)[-1]
    side = await websockets.connect(server.ws_url + f"?call_id={call_id}", subprotocols=["realtime"])
    received: list[dict] = []
    dc.on("message", lambda m: received.append(json.loads(m)))
    try:
        await side.send(json.dumps({"type": "session.update", "session": {"type": "realtime",
                                                                          "instructions": "Early words."}}))
        assert server.engine.active_sessions == 0  # the peer has not connected: no slot yet
        await pc.setRemoteDescription(rtc.RTCSessionDescription(answer.text, "answer"))
        seen = [json.loads(await asyncio.wait_for(side.recv(), 30)) for _ in range(2)]
        assert [e["type"] for e in seen] == ["session.created", "session.updated"]
        assert seen[1]["session"]["instructions"] == "Early words."
        for _ in range(200):
            if len(received) >= 2:
                break
            await asyncio.sleep(0.05)
        assert [e["event_id"] for e in received[:2]] == [e["event_id"] for e in seen]  # the same events
    finally:
        await side.close()
        await pc.close()
    assert await _settled(server) == 0


async def test_sideband_to_an_unknown_call_is_refused(server):
    import websockets

    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(server.ws_url + "?call_id=rtc_nope", subprotocols=["realtime"])
    assert refused.value.response.status_code == 404
    error = json.loads(refused.value.response.body)["error"]
    assert error["code"] == "call_id_not_found" and "rtc_nope" in error["message"]
    assert server.engine.active_sessions == 0


async def test_server_busy_is_a_clear_503(server):
    assert await _settled(server) == 0
    calls = [await rtc.place_call(server.url, mic=False) for _ in range(MAX_SESSIONS)]
    try:
        pc, _ = await rtc.make_offer()
        try:
            refused = await rtc.post_offer(server.url, pc.localDescription.sdp)
        finally:
            await pc.close()
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["code"] == "server_busy" and "server_busy" in error["message"]
        assert refused.headers["retry-after"] == "1"
    finally:
        for call in calls:
            await call.close()
    assert await _settled(server) == 0


async def test_api_key_is_required_when_set(server):
    config = server.app.state.config
    config.api_key = "s3cret"  # read per request; restored below
    pc, _ = await rtc.make_offer(mic=False)
    try:
        for headers in (None, {"Authorization": "Bearer wrong"}):
            refused = await rtc.post_offer(server.url, pc.localDescription.sdp, headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        call = await rtc.place_call(server.url, mic=False, headers={"Authorization": "Bearer s3cret"})
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.delete(call.location)).status_code == 401
            ok = await http.delete(call.location, headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 204
        await call.close()
    finally:
        config.api_key = None
        await pc.close()
    assert await _settled(server) == 0


async def _offer_without(**what: bool) -> str:
    pc, _ = await rtc.make_offer(**what)
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_bad_offers_are_refused_naming_the_problem(server):
    assert await _settled(server) == 0
    no_audio = await _offer_without(audio=False)
    no_channel = await _offer_without(channel=False)
    good = await _offer_without()
    cases = [
        (dict(content="hello"), 400, "must start with 'v=0'"),
        (dict(content=""), 400, "empty SDP offer"),
        (dict(content="v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"), 400, "no media sections"),
        (dict(content="v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF x\r\n"), 400, "invalid SDP offer"),
        (dict(content=good.replace("UDP/TLS/RTP/SAVPF", "udp/tls/rtp/savpf")), 400,
         "udp/tls/rtp/savpf"),
        (dict(content=good.replace("a=fingerprint:", "a=candidate:1 1 udp\r\na=fingerprint:", 1)), 400,
         "'a=candidate:1 1 udp'"),
        (dict(content=no_audio), 400, "no audio m-line"),
        (dict(content=no_channel), 400, "no data channel"),
        (dict(content=good, ctype="text/plain"), 415, "application/sdp, or multipart/form-data"),
        (dict(files={"session": (None, "{}")}), 400, "no 'sdp' part"),
        (dict(files={"sdp": (None, good), "session": (None, "{not json")}), 400, "'session' part is not valid JSON"),
        (dict(files={"sdp": (None, good), "session": (None, "[1]")}), 400, "must be a JSON object"),
        (dict(files={"sdp": (None, good), "session": (None, "[" * 1000 + "]" * 1000)}), 400, "nested too deeply"),
        (dict(files={"sdp": (None, good), "session": (None, '{"type": "realtime", "colour": 1}')}), 400,
         "invalid 'session' part"),
    ]
    async with httpx.AsyncClient(base_url=server.url) as http:
        for case, status, needle in cases:
            if "files" in case:
                response = await http.post("/v1/realtime/calls", files=case["files"])
            else:
                response = await http.post("/v1/realtime/calls", content=case["content"],
                                           headers={"Content-Type": case.get("ctype", "application/sdp")})
            assert response.status_code == status, (case, response.text)
            error = response.json()["error"]
            assert needle in error["message"], (needle, error)
        bad_field = await http.post("/v1/realtime/calls", files={
            "sdp": (None, good), "session": (None, '{"type": "realtime", "audio": {"output": {"speed": "x"}}}')})
        assert bad_field.status_code == 400 and bad_field.json()["error"]["param"].startswith("session.audio")
    assert server.engine.active_sessions == 0 and server.app.state.calls == {}


async def test_pathological_json_on_the_channel_gets_an_error_and_the_call_goes_on(server):
    assert await _settled(server) == 0
    call = await rtc.place_call(server.url, mic=False,
                                session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    try:
        for name, message, needle in MALFORMED_JSON:
            call.channel.send(message)
            error = await call.until("error")
            assert error["error"]["code"] == "invalid_json", (name, error)
            assert needle in error["error"]["message"], (name, error)
        call.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}})
        call.send({"type": "response.create"})
        done = await call.until("response.done")
        assert done["response"]["status"] in ("completed", "incomplete")
    finally:
        await call.close()


async def test_oversized_event_becomes_an_error_on_the_channel(server):
    assert await _settled(server) == 0
    call = await rtc.place_call(server.url, mic=False,
                                session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    try:
        # 8 s of user audio: its retrieval is ~512 KB of JSON, over the 256 KiB message limit
        pcm = np.random.default_rng(0).integers(-3000, 3000, 8 * 24_000, dtype=np.int16).tobytes()
        for i in range(0, len(pcm), 48_000):
            call.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + 48_000]).decode()})
        call.send({"type": "input_audio_buffer.commit"})
        committed = await call.until("input_audio_buffer.committed")
        call.send({"type": "conversation.item.retrieve", "item_id": committed["item_id"]})
        error = await call.until("error")
        assert error["error"]["code"] == "message_too_large"
        assert "conversation.item.retrieved" in error["error"]["message"]
        # the call goes on
        call.send({"type": "conversation.item.retrieve", "item_id": "item_nope"})
        assert (await call.until("error"))["error"]["code"] == "item_retrieve_invalid_item_id"
    finally:
        await call.close()


# ------------------------------------------------------------------------------------------------
# the agent track and ICE configuration on their own


async def test_agent_track_paces_plays_out_and_reports_drained():
    drained: list[str] = []
    track = AgentAudioTrack(drained.append, max_buffer_s=1.0)
    pcm = (np.arange(2400) % 100 * 50).astype(np.int16)  # 100 ms at 24 kHz
    track.push("resp_a", pcm)
    track.end_response("resp_a")
    frames = [await track.recv() for _ in range(8)]
    assert [f.pts for f in frames] == [i * FRAME_SAMPLES for i in range(8)]
    assert all(f.sample_rate == 48_000 and f.samples == FRAME_SAMPLES for f in frames)
    assert track.audio_samples_sent == 4800  # exactly 100 ms at 48 kHz
    assert drained == ["resp_a"]
    assert np.abs(frames[-1].to_ndarray()).max() == 0  # silence once the response played out
    # barge-in: a flushed response is never reported drained
    track.push("resp_b", pcm)
    await track.recv()
    track.flush()
    track.end_response("resp_b")
    await track.recv()
    assert drained == ["resp_a"] and track.buffered_s == 0
    # the buffer keeps the newest max_buffer_s
    for _ in range(15):
        track.push("resp_c", pcm)
    assert track.buffered_s == pytest.approx(1.0)
    track.stop()


async def test_the_agent_track_keeps_the_voice_s_level_through_the_opus_sender():
    """What the peer hears is as loud as what the model said: the frames go through aiortc's own
    Opus encoder (stereo), whose resampler would upmix mono frames at -3 dB (libswresample's
    centre-to-front mix), and back through its decoder."""
    from aiortc.codecs.opus import OpusDecoder, OpusEncoder
    from aiortc.jitterbuffer import JitterFrame

    track = AgentAudioTrack(lambda _: None, max_buffer_s=2.0)
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 440 * np.arange(24_000) / 24_000)).astype(np.int16)  # 1 s, 24 kHz
    track.push("resp_a", tone)
    encoder, decoder = OpusEncoder(), OpusDecoder()
    heard = []
    for _ in range(50):  # 1 s of 20 ms frames
        packets, timestamp = encoder.encode(await track.recv())
        for packet in packets:
            for frame in decoder.decode(JitterFrame(data=packet, timestamp=timestamp)):
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).astype(np.float64)
                heard.append(pcm)
    track.stop()
    pcm = np.concatenate(heard)[24_000:40_000]  # steady state, past the codec's start
    assert np.allclose(pcm[:, 0], pcm[:, 1])  # the same voice on both channels
    said = np.sqrt(np.mean(tone.astype(np.float64) ** 2))
    level_db = 20 * np.log10(np.sqrt(np.mean(pcm[:, 0] ** 2)) / said)
    assert abs(level_db) < 0.5, f"the peer hears the agent {level_db:+.1f} dB off what it said"


def test_agent_track_does_not_report_a_response_that_never_spoke():
    drained: list[str] = []
    track = AgentAudioTrack(drained.append)
    track.end_response("resp_never_spoke")
    assert drained == []
    asyncio.run(track.recv())
    assert drained == []
    track.stop()


def _stereo_frame(pts: int, left: np.ndarray, right: np.ndarray):
    from av import AudioFrame

    packed = np.stack([left, right], axis=1).reshape(1, -1)  # (960, 2) -> (1, 1920), interleaved s16
    frame = AudioFrame.from_ndarray(packed, format="s16", layout="stereo")
    frame.sample_rate, frame.pts = 48_000, pts
    return frame


async def test_microphone_reader_downmixes_resamples_and_bounds_the_backlog():
    from aiortc.rtcrtpreceiver import RemoteStreamTrack

    track = RemoteStreamTrack(kind="audio")
    t = np.arange(40 * FRAME_SAMPLES) / 48_000
    left = np.round(8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    for i in range(40):  # 800 ms decoded while nobody read (aiortc's decoder thread does this)
        cut = slice(i * FRAME_SAMPLES, (i + 1) * FRAME_SAMPLES)
        await track._queue.put(_stereo_frame(i * FRAME_SAMPLES, left[cut], -left[cut] // 2))
    pushed: list[np.ndarray] = []
    reader = MicrophoneReader(track, pushed.append, WebRTCOptions(media_timeout_s=0.2, max_input_backlog_frames=10))
    reason = await reader.run()
    assert reason == "no audio from the peer for 0.2 s"
    # the first frame, then the newest 10: the 29 stale frames in between were dropped
    assert (reader.frames, reader.frames_dropped) == (11, 29)
    wire = np.concatenate(pushed)
    assert wire.dtype == np.int16 and abs(len(wire) - 11 * 480) <= 480  # 24 kHz, minus the filter delay
    # (L + R) / 2 of a 440 Hz tone at 8000 and one at -4000: a 440 Hz tone at 2000
    assert np.abs(wire[480:]).max() == pytest.approx(2000, rel=0.05)
    # the end of the track ends the reader
    await track._queue.put(None)
    assert await reader.run() == "the peer's audio track ended"


async def test_microphone_input_is_resampled_with_the_official_filter():
    """48 kHz from the browser goes to the model: the official pipeline's filter, not soxr."""
    from aiortc.rtcrtpreceiver import RemoteStreamTrack

    from streaming.resample import SincResampler

    track = RemoteStreamTrack(kind="audio")
    t = np.arange(3 * FRAME_SAMPLES) / 48_000
    tone = np.round(6000 * np.sin(2 * np.pi * 300 * t) + 3000 * np.sin(2 * np.pi * 7000 * t)).astype(np.int16)
    for i in range(3):
        cut = slice(i * FRAME_SAMPLES, (i + 1) * FRAME_SAMPLES)
        await track._queue.put(_stereo_frame(i * FRAME_SAMPLES, tone[cut], tone[cut]))
    pushed: list[np.ndarray] = []
    reader = MicrophoneReader(track, pushed.append, WebRTCOptions(media_timeout_s=0.2))
    await reader.run()
    want = SincResampler(48_000, 24_000).process(tone)
    assert np.array_equal(np.concatenate(pushed), want)


def test_ice_server_urls():
    stun = parse_ice_server("stun:stun.example.org:3478")
    assert stun.urls == "stun:stun.example.org:3478" and stun.username is None
    turn = parse_ice_server("turn:alice:pa:ss@turn.example.org:3478?transport=tcp")
    assert (turn.urls, turn.username, turn.credential) == ("turn:turn.example.org:3478?transport=tcp", "alice", "pa:ss")
    for bad, needle in [("http://x", "expected stun:"), ("stuns:x", "stuns"), ("turn:x:3478", "needs credentials"),
                        ("stun:u:p@x", "no credentials"), ("stun:x:notaport", "malformed")]:
        with pytest.raises(ValueError, match=needle):
            parse_ice_server(bad)
    with pytest.raises(ValueError, match="single STUN"):
        ice_servers(["stun:a", "stun:b"])
    assert ice_servers([]) == []


def test_serve_accepts_ice_servers_and_refuses_bad_ones(capsys):
    from tests.streaming.live_server import serve_args

    assert serve_args("--ice-server", "stun:a:3478").ice_servers == ["stun:a:3478"]
    with pytest.raises(SystemExit):
        serve_args("--ice-server", "turn:nocreds")
    assert "TURN needs credentials" in capsys.readouterr().err
