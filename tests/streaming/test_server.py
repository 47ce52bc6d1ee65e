"""End to end: the real server on loopback, the real protocol, the tiny model, recorded speech."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
import websockets

from tests.streaming import realtime_client as rc
from tests.streaming.helpers import MALFORMED_JSON
from tests.streaming.live_server import assert_heard_in_context, start_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    live = start_server("--max-sessions", "8")
    yield live
    live.stop()


async def _settled(server) -> int:
    """Wait until sessions closed by earlier tests have given their slots back."""
    for _ in range(200):
        if server.engine.active_sessions == 0:
            break
        await asyncio.sleep(0.05)
    return server.engine.active_sessions


async def _manual_turn(ws, pcm: bytes, **response) -> list[dict]:
    await rc.append(ws, pcm)
    await rc.send(ws, {"type": "input_audio_buffer.commit"})
    await rc.send(ws, {"type": "response.create", **({"response": response} if response else {})})
    events: list[dict] = []
    await rc.until(ws, "response.done", events=events)
    return events


async def test_recorded_utterance_streamed_in_real_time(server):
    ws = await rc.connect(server.ws_url)
    try:
        await rc.append(ws, rc.wav_pcm16("speech_hello_padded.wav") + rc.silence(800), realtime=True)
        events: list[dict] = []
        done = await rc.until(ws, "response.done", events=events)
    finally:
        await ws.close()
    kinds = rc.types(events)
    for kind in ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "response.created", "response.output_audio.delta",
                 "response.output_audio_transcript.delta", "response.output_audio.done",
                 "response.output_audio_transcript.done"]:
        assert kind in kinds, kind
    order = [kinds.index(k) for k in ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                       "input_audio_buffer.committed", "response.created",
                                       "response.output_audio.delta", "response.output_audio.done"]]
    assert order == sorted(order)
    started = events[kinds.index("input_audio_buffer.speech_started")]
    stopped = events[kinds.index("input_audio_buffer.speech_stopped")]
    assert 0 <= started["audio_start_ms"] < stopped["audio_end_ms"] <= 3900 + 800

    response = done["response"]
    assert response["status"] in ("completed", "incomplete")
    timings = response["mimo"]["timings"]
    audio = rc.audio_of(events)
    # every speech patch the model produced comes out as exactly 160 ms of 24 kHz audio
    assert timings["speech_patches"] >= 1
    assert len(audio) == timings["speech_patches"] * 3840 == round(response["mimo"]["audio_ms"] * 24)
    assert np.abs(audio).max() > 0
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    transcript = events[kinds.index("response.output_audio_transcript.done")]["transcript"]
    assert transcript == deltas and len(transcript) > 0
    assert timings["server_first_audio_ms"] > 0
    for stage in ("encode_ms", "prefill_ms", "first_speech_patch_ms", "first_audio_ms"):
        assert timings[stage] >= 0, stage


async def test_second_turn_prefills_only_new_positions(server):
    ws = await rc.connect(server.ws_url)
    try:
        await rc.update(ws, audio={"input": {"turn_detection": None}})
        first = (await _manual_turn(ws, rc.wav_pcm16("speech_yes.wav")))[-1]["response"]
        second = (await _manual_turn(ws, rc.wav_pcm16("speech_stop.wav")))[-1]["response"]
    finally:
        await ws.close()
    u1, u2 = first["usage"], second["usage"]
    assert u1["input_token_details"]["cached_tokens"] == 0
    # the whole first turn stays cached except its last patch, which is fed with the second turn
    assert u2["input_token_details"]["cached_tokens"] == u1["input_tokens"] + u1["output_tokens"] - 1
    new_positions = u2["input_tokens"] - u2["input_token_details"]["cached_tokens"]
    assert second["mimo"]["timings"]["prefill_positions"] == new_positions


async def test_manual_commit_text_only_and_audio_only(server):
    ws = await rc.connect(server.ws_url)
    try:
        await rc.update(ws, audio={"input": {"turn_detection": None}}, output_modalities=["text"])
        events = await _manual_turn(ws, rc.wav_pcm16("speech_yes.wav"))
        kinds = rc.types(events)
        assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds
        assert "response.output_audio.delta" not in kinds
        text = events[kinds.index("response.output_text.done")]["text"]
        assert text == "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")

        events = await _manual_turn(ws, rc.wav_pcm16("speech_stop.wav"), output_modalities=["audio"])
        kinds = rc.types(events)
        assert "response.output_audio.delta" in kinds and "response.output_text.delta" not in kinds
    finally:
        await ws.close()


async def test_text_input_item(server):
    ws = await rc.connect(server.ws_url)
    try:
        await rc.send(ws, {"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}})
        added = await rc.until(ws, "conversation.item.added")
        assert added["item"]["role"] == "user"
        await rc.send(ws, {"type": "response.create"})
        events: list[dict] = []
        done = await rc.until(ws, "response.done", events=events)
        assert done["response"]["status"] in ("completed", "incomplete")
        assert len(rc.audio_of(events)) > 0
    finally:
        await ws.close()


async def test_previous_item_id_root_and_after_an_item_place_items_in_the_model_context(server):
    """LiveKit sends ``previous_item_id: "root"`` whenever the remote conversation is empty (a first
    ``generate_reply``, an initial chat context, its history replay); GA inserts such items first.
    The engine's context follows: the next response sees the items in conversation order."""
    ws = await rc.connect(server.ws_url)

    async def create(item_id: str, role: str, text: str, **where) -> dict:
        kind = "output_text" if role == "assistant" else "input_text"
        await rc.send(ws, {"type": "conversation.item.create", **where, "item": {
            "id": item_id, "type": "message", "role": role, "content": [{"type": kind, "text": text}]}})
        return await rc.until(ws, "conversation.item.done")

    try:
        await rc.update(ws, output_modalities=["text"], audio={"input": {"turn_detection": None}})
        first = await create("item_hist_0001", "user", "What is the capital of France?", previous_item_id="root")
        assert first["previous_item_id"] is None
        await create("item_hist_0003", "user", "And of Italy?")
        second = await create("item_hist_0002", "assistant", "Paris.", previous_item_id="item_hist_0001")
        assert second["previous_item_id"] == "item_hist_0001"
        system = await create("item_hist_0000", "system", "Answer in one word.", previous_item_id="root")
        assert system["previous_item_id"] is None
        await rc.send(ws, {"type": "conversation.item.create", "previous_item_id": "item_nope", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "lost"}]}})
        error = (await rc.until(ws, "error"))["error"]
        assert error["code"] == "item_create_invalid_previous_item_id" and "item_nope" in error["message"]
        await rc.send(ws, {"type": "response.create"})
        done = (await rc.until(ws, "response.done"))["response"]
        assert done["status"] in ("completed", "incomplete")
        (engine_session,) = [s for s in server.engine._sessions.values()
                             if any(it.item_id == "item_hist_0000" for it in s.items)]
        order = [it.item_id for it in engine_session.items]
        assert order == ["item_hist_0000", "item_hist_0001", "item_hist_0002", "item_hist_0003",
                         done["output"][0]["id"]]
    finally:
        await ws.close()


async def test_barge_in_cancels_and_rolls_back(server):
    ws = await rc.connect(server.ws_url)
    try:
        vad = {"type": "server_vad", "create_response": False, "interrupt_response": True}
        await rc.update(ws, max_output_tokens=200, mimo={"min_output_tokens": 200},
                        audio={"input": {"turn_detection": vad}})
        await rc.append(ws, rc.wav_pcm16("speech_hello_padded.wav") + rc.silence(800))
        await rc.until(ws, "input_audio_buffer.committed")
        await rc.send(ws, {"type": "response.create"})
        events: list[dict] = []
        first_audio = await rc.until(ws, "response.output_audio.delta", events=events)
        item_id, response_id = first_audio["item_id"], first_audio["response_id"]
        # the user talks over the agent while it plays
        await rc.append(ws, rc.wav_pcm16("speech_hello_padded.wav") + rc.silence(800), realtime=True)
        await rc.until(ws, "input_audio_buffer.speech_started", events=events)
        done = await rc.until(ws, "response.done", events=events)
        assert done["response"]["id"] == response_id
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "turn_detected"
        heard_ms = 480
        await rc.send(ws, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                           "audio_end_ms": heard_ms})
        truncated = await rc.until(ws, "conversation.item.truncated")
        assert truncated["item_id"] == item_id and truncated["audio_end_ms"] == heard_ms
        await asyncio.sleep(0.5)  # the engine applies the truncate on its thread
        assert_heard_in_context(server, item_id, heard_ms)
    finally:
        await ws.close()


async def test_eight_sessions_at_once_and_the_ninth_is_refused(server):
    assert await _settled(server) == 0
    pcm = rc.wav_pcm16("speech_yes.wav")
    sockets = [await rc.connect(server.ws_url) for _ in range(8)]
    try:
        # a ninth client while eight are connected gets a clear error, not a hang
        ninth = await websockets.connect(server.ws_url, subprotocols=["realtime"])
        error = json.loads(await asyncio.wait_for(ninth.recv(), 10))
        assert error["type"] == "error" and error["error"]["code"] == "server_busy"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ninth.recv(), 10)
        assert closed.value.rcvd.code == 1013

        async def turn(ws):
            await rc.update(ws, audio={"input": {"turn_detection": None}})
            return (await _manual_turn(ws, pcm))[-1]["response"]["status"]

        statuses = await asyncio.gather(*(turn(ws) for ws in sockets))
        assert all(s in ("completed", "incomplete") for s in statuses)
    finally:
        for ws in sockets:
            await ws.close()
    for _ in range(100):  # slots come back once the sockets are gone
        if server.engine.active_sessions == 0:
            break
        await asyncio.sleep(0.05)
    assert server.engine.active_sessions == 0


BAD_INPUTS = [
    ("{not json", "invalid_json"),
    (json.dumps({"type": "no.such.event"}), "unknown_event_type"),
    (json.dumps({"type": "input_audio_buffer.append"}), "missing_required_parameter"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 17}), "invalid_type"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "***"}), "invalid_base64"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
     "invalid_audio_length"),
    (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
    (json.dumps({"type": "conversation.item.truncate", "item_id": "item_nope", "content_index": 0,
                 "audio_end_ms": 10}), "item_truncate_invalid_item_id"),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
    (json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": 16000}}}}}), "invalid_value"),
]


async def test_bad_input_gets_an_error_and_the_session_goes_on(server):
    ws = await rc.connect(server.ws_url)
    try:
        await rc.update(ws, audio={"input": {"turn_detection": None}})
        for message, code in BAD_INPUTS:
            await ws.send(message)
            error = await rc.until(ws, "error", timeout=10)
            assert error["error"]["code"] == code, (message, error)
            assert error["error"]["message"]
        # an oversized message: refused by the session, connection kept
        huge = json.dumps({"type": "input_audio_buffer.append",
                           "audio": "A" * (server.app.state.config.limits.max_message_bytes + 8)})
        await ws.send(huge)
        error = await rc.until(ws, "error", timeout=10)
        assert error["error"]["code"] == "message_too_large"
        # ... and the session still works
        events = await _manual_turn(ws, rc.wav_pcm16("speech_yes.wav"))
        assert events[-1]["response"]["status"] in ("completed", "incomplete")
    finally:
        await ws.close()


async def test_pathological_json_gets_an_error_and_the_session_goes_on(server):
    ws = await rc.connect(server.ws_url)
    try:
        await rc.update(ws, audio={"input": {"turn_detection": None}})
        for name, message, needle in MALFORMED_JSON:
            await ws.send(message)
            error = await rc.until(ws, "error", timeout=10)
            assert error["error"]["code"] == "invalid_json", (name, error)
            assert needle in error["error"]["message"], (name, error)
        events = await _manual_turn(ws, rc.wav_pcm16("speech_yes.wav"))
        assert events[-1]["response"]["status"] in ("completed", "incomplete")
        assert not [e for e in events if e["type"] == "error"], events
    finally:
        await ws.close()


async def test_client_that_disconnects_mid_response_frees_its_slot(server):
    before = await _settled(server)
    ws = await rc.connect(server.ws_url)
    await rc.update(ws, max_output_tokens=200, mimo={"min_output_tokens": 200})
    await rc.append(ws, rc.wav_pcm16("speech_hello_padded.wav") + rc.silence(800))
    await rc.until(ws, "response.output_audio.delta")
    assert server.engine.active_sessions == before + 1
    await ws.close()
    for _ in range(100):
        if server.engine.active_sessions == before:
            break
        await asyncio.sleep(0.05)
    assert server.engine.active_sessions == before


async def test_health_models_metrics(server):
    async with httpx.AsyncClient(base_url=server.url) as http:
        health = (await http.get("/healthz")).json()
        assert health["status"] == "ok" and health["model"] == "mimo-audio-tiny" and health["max_sessions"] == 8
        models = (await http.get("/v1/models")).json()
        assert models["data"][0]["id"] == "mimo-audio-tiny"
        text = (await http.get("/metrics")).text
        assert "mimo_sessions_active" in text and "mimo_engine_step_seconds" in text
        page = await http.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()


async def test_health_reports_the_memory_each_session_is_admitted_with(server):
    """The codec decoder's KV cache per stream is bounded, reported at start (and at the real size)
    and counted with the LM's KV slot in what ``--max-sessions`` admits."""
    from agent.codec.streaming import decode_cache_bytes
    from streaming.server import describe_memory

    async with httpx.AsyncClient(base_url=server.url) as http:
        memory = (await http.get("/healthz")).json()["memory"]
    codec = server.runtime.codec
    assert memory["codec_kv_bytes_per_session"] == decode_cache_bytes(codec.config, codec.decoder.dtype) > 0
    assert memory["codec_kv_bytes_per_session_real_size"] == 491_520_000
    slot = memory["lm_kv_bytes_per_session"]
    assert memory["total_bytes"] == (8 * (slot + memory["codec_kv_bytes_per_session"])
                                     + memory["extra_slots"] * slot + memory["activation_bytes"])
    assert "codec decoder KV 5.9 MiB per stream; 469 MiB at the real size" in describe_memory(memory)


async def test_api_key_is_required_when_set():
    live = start_server("--api-key", "s3cret", "--max-sessions", "2")
    try:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(live.ws_url, subprotocols=["realtime"])
        assert refused.value.response.status_code == 401
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(live.ws_url, additional_headers={"Authorization": "Bearer wrong"})
        ws = await rc.connect(live.ws_url, additional_headers={"Authorization": "Bearer s3cret"})
        await ws.close()
        ws = await rc.connect(live.ws_url, subprotocols=["realtime", "openai-insecure-api-key.s3cret"])
        assert ws.subprotocol == "realtime"
        await ws.close()
        async with httpx.AsyncClient(base_url=live.url) as http:
            assert (await http.get("/v1/models")).status_code == 401
            ok = await http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200
    finally:
        live.stop()


async def test_official_openai_sdk_talks_to_the_server(server):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
    async with client.realtime.connect(model="mimo-audio-tiny") as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"],
                                           "audio": {"input": {"turn_detection": None}}})
        pcm = rc.wav_pcm16("speech_yes.wav")
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        audio = bytearray()
        transcript = ""
        async for event in conn:
            if event.type == "response.output_audio.delta":
                audio += base64.b64decode(event.delta)
            elif event.type == "response.output_audio_transcript.delta":
                transcript += event.delta
            elif event.type == "error":
                pytest.fail(f"server error: {event.error}")
            elif event.type == "response.done":
                assert event.response.status in ("completed", "incomplete")
                break
        assert len(audio) > 0 and len(audio) % 2 == 0


async def test_voice_prompt_conditions_the_conversation(server):
    voice = base64.b64encode(rc.wav_pcm16("speech_yes.wav")).decode()
    ws = await rc.connect(server.ws_url)
    try:
        updated = await rc.update(ws, audio={"input": {"turn_detection": None}}, mimo={"voice_prompt": voice})
        descriptor = updated["session"]["mimo"]["voice_prompt"]
        assert descriptor.startswith("voice:") and descriptor.split(":")[1].endswith("ms")
        with_voice = (await _manual_turn(ws, rc.wav_pcm16("speech_stop.wav")))[-1]["response"]["usage"]
        # echoing the descriptor back (clients that round-trip the session) keeps the prompt
        again = await rc.update(ws, mimo={"voice_prompt": descriptor})
        assert again["session"]["mimo"]["voice_prompt"] == descriptor
        session = next(s for s in server.engine._sessions.values() if s.voice_codes is not None)
        voice_patches = len(server.engine.renderer.render([], voice_codes=session.voice_codes))
        for bad, fragment in [("not base64!", "Invalid voice prompt"),
                              (base64.b64encode(bytes(480)).decode(), "ms of audio"),
                              ("voice:10ms:abc", "Unknown voice prompt")]:
            session_patch = {"type": "realtime", "mimo": {"voice_prompt": bad}}
            await rc.send(ws, {"type": "session.update", "session": session_patch})
            error = await rc.until(ws, "error")
            assert error["error"]["param"] == "session.mimo.voice_prompt" and fragment in error["error"]["message"]
        cleared = await rc.update(ws, mimo={"voice_prompt": ""})
        assert cleared["session"]["mimo"]["voice_prompt"] is None
    finally:
        await ws.close()
    ws = await rc.connect(server.ws_url)
    try:
        await rc.update(ws, audio={"input": {"turn_detection": None}})
        without = (await _manual_turn(ws, rc.wav_pcm16("speech_stop.wav")))[-1]["response"]["usage"]
    finally:
        await ws.close()
    assert voice_patches > 10
    assert with_voice["input_tokens"] - without["input_tokens"] == voice_patches


async def test_input_audio_transcription_when_asked(server):
    ws = await rc.connect(server.ws_url)
    try:
        await rc.update(ws, audio={"input": {"turn_detection": None, "transcription": {"model": "mimo-asr"}}})
        events = await _manual_turn(ws, rc.wav_pcm16("speech_yes.wav"))
        committed = next(e for e in events if e["type"] == "input_audio_buffer.committed")
        if not any(e["type"] == "conversation.item.input_audio_transcription.completed" for e in events):
            events.append(await rc.until(ws, "conversation.item.input_audio_transcription.completed", events=events))
        done = next(e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed")
        assert done["item_id"] == committed["item_id"]
        deltas = "".join(e["delta"] for e in events
                         if e["type"] == "conversation.item.input_audio_transcription.delta")
        assert done["transcript"] and deltas.strip() == done["transcript"]
        # the item now carries its transcript
        await rc.send(ws, {"type": "conversation.item.retrieve", "item_id": committed["item_id"]})
        item = (await rc.until(ws, "conversation.item.retrieved"))["item"]
        assert item["content"][0]["transcript"] == done["transcript"]
    finally:
        await ws.close()
