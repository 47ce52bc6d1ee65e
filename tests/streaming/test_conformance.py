"""Strict GA conformance: a live server driven through every server event it can emit (speech and
text turns, cancel, truncate, delete, retrieve, errors, input transcription, server VAD, the idle
timeout, session.update, a failed response, and the WebRTC-only output buffer events), each event
validated as received against the official ``openai`` SDK's GA types (``openai.types.realtime``) in
strict mode, with every field of the SDK's event model present in the raw JSON: a default in a
model can hide a field the server left out, and clients such as Pipecat parse without defaults."""

from __future__ import annotations

import asyncio
import json
import typing
from typing import Any

import pytest
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from pydantic import BaseModel

from streaming import protocol as p
from tests.streaming import realtime_client as rc
from tests.streaming import rtc_client as rtc
from tests.streaming.live_server import start_server

pytestmark = pytest.mark.timeout(180)


def _sdk_event_models() -> dict[str, type[BaseModel]]:
    union = RealtimeServerEvent
    if typing.get_origin(union) is typing.Annotated:
        union = typing.get_args(union)[0]
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in typing.get_args(union)}


SDK_EVENTS = _sdk_event_models()
#: SDK fields this server has nothing to put in (transcription log-probabilities and languages)
NOT_PRODUCED = {"logprobs", "languages"}
#: server event types that exist in the protocol module but that this server never sends
NEVER_SENT = {
    "conversation.item.created": "beta-era twin of conversation.item.added; SessionOptions.emit_item_created "
                                 "is off in the server",
}


def conforms(raw: str | dict[str, Any]) -> dict[str, Any]:
    """Validate one server event as received; returns it parsed."""
    text = raw if isinstance(raw, str) else json.dumps({k: v for k, v in raw.items() if not k.startswith("_")})
    event = json.loads(text)
    model = SDK_EVENTS.get(event["type"])
    assert model is not None, f"{event['type']} is not a GA server event"
    model.model_validate_json(text, strict=True)
    missing = [name for name in model.model_fields if name not in event and name not in NOT_PRODUCED]
    assert not missing, f"{event['type']} lacks {missing} on the wire: {text[:300]}"
    return event


class Recorder:
    """A WebSocket client that checks every event it receives."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.seen: dict[str, dict] = {}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for text in self.ws:
            event = conforms(text)
            self.seen.setdefault(event["type"], event)
            self.queue.put_nowait(event)

    async def send(self, event: dict) -> None:
        await rc.send(self.ws, event)

    async def until(self, kind: str, timeout: float = 30.0) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            get = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({get, self.task}, timeout=max(0.01, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if self.task in done:  # the reader failed (a non-conforming event) or the socket closed
                get.cancel()
                self.task.result()
                raise AssertionError("the connection closed")
            if not done:
                get.cancel()
                raise TimeoutError(f"no {kind}")
            event = get.result()
            if event["type"] == kind:
                return event


@pytest.fixture(scope="module")
def server():
    live = start_server("--max-sessions", "3")
    yield live
    live.stop()


async def _response(r: Recorder, **response: Any) -> dict:
    await r.send({"type": "response.create", "response": response})
    return (await r.until("response.done"))["response"]


async def _websocket_events(server, monkeypatch) -> dict[str, dict]:
    import websockets

    ws = await websockets.connect(server.ws_url + "?model=mimo", subprotocols=["realtime"], max_size=2**24)
    r = Recorder(ws)
    try:
        await r.until("session.created")
        await r.send({"type": "session.update", "session": {
            "type": "realtime", "max_output_tokens": 8,
            "audio": {"input": {"turn_detection": None, "transcription": {"model": "mimo-asr"}},
                      "output": {"voice": {"id": "voice_custom"}}}}})
        updated = await r.until("session.updated")
        assert updated["session"]["audio"]["output"]["voice"] == {"id": "voice_custom"}

        # a committed spoken turn, transcribed, and an audio response
        await rc.append(ws, rc.wav_pcm16("speech_yes.wav"))
        await r.send({"type": "input_audio_buffer.commit"})
        user_item = (await r.until("input_audio_buffer.committed"))["item_id"]
        done = await _response(r)
        assert done["status"] in ("completed", "incomplete") and done["usage"]["total_tokens"] > 0
        assistant_item = done["output"][0]["id"]
        completed = r.seen.get("conversation.item.input_audio_transcription.completed") or await r.until(
            "conversation.item.input_audio_transcription.completed")
        assert completed["content_index"] == 0 and completed["usage"]["type"] == "duration"
        assert completed["usage"]["seconds"] > 0

        # a transcription pass that fails (a fault injected into the engine's ASR prompt)
        def broken_asr(codes):
            raise RuntimeError("injected transcription fault")

        monkeypatch.setattr(server.engine.transcriber.builder, "asr", broken_asr)
        await rc.append(ws, rc.wav_pcm16("speech_stop.wav"))
        await r.send({"type": "input_audio_buffer.commit"})
        failed = await r.until("conversation.item.input_audio_transcription.failed")
        assert "injected" in failed["error"]["message"]
        monkeypatch.undo()

        # truncate, retrieve, a text turn, cancel, delete
        await r.send({"type": "conversation.item.truncate", "item_id": assistant_item, "content_index": 0,
                      "audio_end_ms": 100})
        await r.until("conversation.item.truncated")
        await r.send({"type": "conversation.item.retrieve", "item_id": user_item})
        assert (await r.until("conversation.item.retrieved"))["item"]["content"][0]["audio"]
        await r.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}})
        assert (await _response(r, output_modalities=["text"]))["status"] in ("completed", "incomplete")
        await r.send({"type": "response.create", "response": {"max_output_tokens": 200}})
        await r.until("response.output_audio.delta")
        await r.send({"type": "response.cancel"})
        cancelled = (await r.until("response.done"))["response"]
        assert cancelled["status"] == "cancelled" and isinstance(cancelled["usage"], dict)
        await r.send({"type": "conversation.item.delete", "item_id": assistant_item})
        await r.until("conversation.item.deleted")

        # a response the engine cannot produce (the turn exceeds the context): failed, usage all the same
        await r.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 4000}]}})
        long_item = (await r.until("conversation.item.done"))["item"]["id"]
        failed = await _response(r)
        assert failed["status"] == "failed" and failed["usage"]["total_tokens"] == 0
        await r.until("error")
        await r.send({"type": "conversation.item.delete", "item_id": long_item})
        await r.until("conversation.item.deleted")

        # errors, buffer clear
        await r.send({"type": "no.such.event"})
        await r.until("error")
        await r.send({"type": "input_audio_buffer.clear"})
        await r.until("input_audio_buffer.cleared")

        # server VAD: a spoken turn answered on its own, then the idle timeout prompts a response
        await r.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "transcription": None, "turn_detection": {"type": "server_vad", "idle_timeout_ms": 200}}}}})
        await r.until("session.updated")
        await rc.append(ws, rc.wav_pcm16("speech_hello_padded.wav") + rc.silence(800))
        await r.until("input_audio_buffer.speech_stopped")
        await r.until("response.done")
        await r.until("input_audio_buffer.timeout_triggered")
        await r.until("response.done")
        await r.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": None}}}})
        await r.until("session.updated")
    finally:
        await ws.close()
        await asyncio.gather(r.task, return_exceptions=True)
    r.task.result()  # every event received conformed
    return r.seen


async def _webrtc_events(server) -> dict[str, dict]:
    call = await rtc.place_call(server.url, session={"type": "realtime", "max_output_tokens": 6,
                                                     "audio": {"input": {"turn_detection": None}}})
    try:
        call.send({"type": "response.create"})
        await call.until("output_audio_buffer.stopped")
        call.send({"type": "response.create", "response": {"max_output_tokens": 200}})
        await call.until("output_audio_buffer.started")
        call.send({"type": "response.cancel"})
        call.send({"type": "output_audio_buffer.clear"})
        cleared = await call.until("output_audio_buffer.cleared")
        await call.until("response.done")
        assert cleared["response_id"].startswith("resp_")
    finally:
        await call.close()
    seen: dict[str, dict] = {}
    for event in call.log:
        seen.setdefault(event["type"], conforms(event))
    return seen


async def test_every_server_event_conforms_to_the_sdk_ga_types(server, monkeypatch):
    seen = await _websocket_events(server, monkeypatch)
    rate = seen["rate_limits.updated"]["rate_limits"]
    assert rate and {limit["name"] for limit in rate} <= {"requests", "tokens"}
    seen.update(await _webrtc_events(server))
    expected = set(p.SERVER_EVENTS) - set(NEVER_SENT)
    assert expected - set(seen) == set(), "not exercised"
    assert set(seen) <= set(SDK_EVENTS)


def test_conformance_check_catches_a_field_left_to_its_default():
    """The check itself: a transcription delta without ``content_index`` validates against the SDK
    model (the field is optional there) but is refused here."""
    event = {"type": "conversation.item.input_audio_transcription.delta", "event_id": "event_1",
             "item_id": "item_1", "delta": "hi"}
    SDK_EVENTS[event["type"]].model_validate(event, strict=True)
    with pytest.raises(AssertionError, match="content_index"):
        conforms(event)
