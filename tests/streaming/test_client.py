"""Client SDK: message building and parsing, and a loopback run against the real session.

The loopback server below is the real :class:`RealtimeSession` behind a real WebSocket; only the
engine is played by the test (a parrot that speaks the user's last turn back)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json

import numpy as np
import pytest
from websockets.asyncio.server import serve

from streaming import actions as act
from streaming import audio as A
from streaming import protocol as p
from streaming.client import (
    RealtimeClient,
    RealtimeClientError,
    _ResponseAccumulator,
    audio_append_events,
    auth_options,
    connect,
    realtime_url,
)
from streaming.session import RealtimeSession
from tests.streaming.helpers import DATA, FIXTURES, load_json

HELLO, _ = A.read_wav(DATA / "speech_hello_padded.wav")
YES, _ = A.read_wav(DATA / "speech_yes.wav")


# ----------------------------------------------------------------------------------------------
# pure parts


def test_realtime_url_and_auth():
    assert realtime_url("http://h:8000/v1/realtime", "m") == "ws://h:8000/v1/realtime?model=m"
    assert realtime_url("wss://h/v1/realtime?model=x", "m") == "wss://h/v1/realtime?model=x"
    assert realtime_url("ws://h/v1/realtime") == "ws://h/v1/realtime"
    assert realtime_url("http://h:8000") == realtime_url("http://h:8000/") == "ws://h:8000/v1/realtime"
    assert realtime_url("https://h/v1/", "m") == "wss://h/v1/realtime?model=m"
    assert auth_options("sk-1", "header") == {
        "additional_headers": {"Authorization": "Bearer sk-1"},
        "subprotocols": ["realtime"],
    }
    assert auth_options("sk-1", "subprotocol")["subprotocols"] == ["realtime", "openai-insecure-api-key.sk-1"]
    assert auth_options(None, "header") == {"additional_headers": {}, "subprotocols": ["realtime"]}


def test_audio_append_events():
    events = audio_append_events(YES, "audio/pcm", chunk_ms=100)
    assert len(events) == int(np.ceil(len(YES) / 2400))
    assert all(e.type == "input_audio_buffer.append" for e in events)
    pcm = np.concatenate([A.pcm16_from_bytes(base64.b64decode(e.audio)) for e in events])
    assert np.array_equal(pcm, YES)
    ulaw = b"".join(base64.b64decode(e.audio) for e in audio_append_events(YES, "audio/pcmu"))
    assert abs(len(ulaw) - len(YES) / 3) <= 1


def test_accumulator_reads_a_response_from_fixtures():
    server = {f.name.removesuffix(".json"): load_json(f) for f in (FIXTURES / "server").glob("*.json")}
    sequence = [
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_audio_transcript.delta",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.done",
    ]
    acc = _ResponseAccumulator("resp_0000000000000000001", "audio/pcm", now=1.0)
    finished = [acc.feed(server[name], now=2.0 + i) for i, name in enumerate(sequence)]
    assert finished == [False] * 9 + [True]
    r = acc.result
    assert r.item_id == "item_asst_0000000000001" and r.status == "completed"
    assert r.transcript == "Paris is the capital of France."
    assert r.audio.tolist() == [0, 1000, 2000, 1000, 0, -1000, -2000, -1000]
    assert r.timings["first_audio_ms"] == 85.0 and r.usage.total_tokens == 412
    assert (r.created_at, r.first_audio_at, r.done_at) == (1.0, 6.0, 11.0)


# ----------------------------------------------------------------------------------------------
# loopback: the real session over a real socket


class ParrotServer:
    """A WebSocket server running RealtimeSession; its 'engine' says the user's last turn back."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.subprotocols: list[str | None] = []
        self.actions: list[act.Action] = []

    async def handler(self, ws) -> None:
        self.headers.append(dict(ws.request.headers))
        self.subprotocols.append(ws.subprotocol)
        session = RealtimeSession()
        session.start(model="parrot")
        last_user_audio = np.zeros(0, np.int16)
        generating: dict[str, asyncio.Task] = {}
        cancelled: set[str] = set()

        async def flush() -> None:
            nonlocal last_user_audio
            for event in session.take_events():
                await ws.send(event.to_json())
            for action in session.take_actions():
                self.actions.append(action)
                if isinstance(action, act.AppendUserAudio):
                    last_user_audio = action.pcm
                elif isinstance(action, act.CreateResponse):
                    generating[action.response_id] = asyncio.create_task(speak(action, last_user_audio))
                elif isinstance(action, act.CancelResponse):
                    cancelled.add(action.response_id)

        async def speak(create: act.CreateResponse, pcm: np.ndarray) -> None:
            rid = create.response_id
            session.response_started(rid)
            session.response_text(rid, "You said: ")
            for i in range(0, len(pcm) if create.params.audio else 0, 2400):
                if rid in cancelled:
                    break
                session.response_audio(rid, pcm[i : i + 2400])
                await flush()
                await asyncio.sleep(0.005)
            session.response_text(rid, "that.")
            session.response_done(rid, usage={"total_tokens": 1}, timings={"engine_ms": 1.0})
            await flush()

        await flush()
        try:
            async for message in ws:
                session.receive(message)
                await flush()
        finally:
            for task in generating.values():
                task.cancel()


@pytest.fixture
async def parrot():
    server = ParrotServer()

    def choose(connection, offered):
        return "realtime" if "realtime" in offered else None

    async with serve(server.handler, "127.0.0.1", 0, select_subprotocol=choose, max_size=2**24) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        server.url = f"ws://127.0.0.1:{port}/v1/realtime"
        yield server


async def test_connect_update_and_a_server_vad_turn(parrot):
    client = await connect(parrot.url, api_key="sk-test", model="parrot", instructions="Be a parrot.")
    async with client:
        assert parrot.headers[0]["authorization"] == "Bearer sk-test" and parrot.subprotocols[0] == "realtime"
        assert client.session.instructions == "Be a parrot." and client.session.model == "parrot"
        seen: list[str] = []
        client.on("input_audio_buffer.speech_started", lambda e: seen.append(e.type))

        async def on_done(event):
            seen.append(event.response.status)

        client.on("response.done", on_done)
        pcm16k = A.resample(HELLO, 24000, 16000)
        await client.send_audio(pcm16k, sample_rate=16000, chunk_ms=40)
        await client.flush_audio()
        result = await client.collect_response(timeout=20)
        assert result.status == "completed" and seen == ["input_audio_buffer.speech_started", "completed"]
        assert result.transcript == "You said: that."
        assert result.timings == {"engine_ms": 1.0}
        assert result.created_at <= result.first_audio_at <= result.done_at
        user_audio = next(a for a in parrot.actions if isinstance(a, act.AppendUserAudio))
        assert np.array_equal(result.audio, user_audio.pcm)  # the parrot's audio came back intact
        assert 2.5 < result.audio_ms / 1000 < 3.5  # the speech plus padding and silence window


async def test_subprotocol_auth_events_iterator_and_manual_turn(parrot):
    client = await connect(
        parrot.url, api_key="sk-browser", auth="subprotocol", audio={"input": {"turn_detection": None}}
    )
    async with client:
        assert "authorization" not in parrot.headers[0]
        assert client.session.audio.input.turn_detection is None
        await client.send_audio(YES)
        await client.commit()
        await client.create_response(output_modalities=["audio"], metadata={"n": "1"})
        kinds = []
        async for event in client.events():
            kinds.append(event.type)
            if event.type == "response.done":
                break
        assert kinds[:2] == ["session.created", "session.updated"]
        assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
        assert kinds[-1] == "response.done"
        result = await client.collect_response(timeout=5)
        assert np.array_equal(result.audio, YES)


async def test_other_rates_reach_the_server_through_the_official_filter(parrot):
    """16 kHz input is resampled by the SDK with the official pipeline's filter (torchaudio's
    windowed sinc, tests/agent/test_resample.py), not soxr: the server gets exactly that."""
    from streaming.resample import SincResampler

    async with await connect(parrot.url, audio={"input": {"turn_detection": None}}) as client:
        pcm16k = A.resample(YES, 24000, 16000)
        await client.send_audio(pcm16k[:5000], sample_rate=16000)
        await client.send_audio(pcm16k[5000:], sample_rate=16000)
        await client.commit()
        await client.create_response()
        await client.collect_response(timeout=10)
    sinc = SincResampler(16000, 24000)
    want = np.concatenate([sinc.process(pcm16k), sinc.flush()])
    user_audio = next(a for a in parrot.actions if isinstance(a, act.AppendUserAudio))
    assert np.array_equal(user_audio.pcm, want)
    soxr = A.StreamResampler(16000, 24000)
    assert not np.array_equal(np.concatenate([soxr.process(pcm16k), soxr.flush()])[: len(want)], want)


async def test_interrupt_cancels_and_truncates(parrot):
    async with await connect(parrot.url, audio={"input": {"turn_detection": None}}) as client:
        await client.send_audio(HELLO)
        await client.commit()
        first_audio = client.wait_for("response.output_audio.delta")
        truncated = client.wait_for("conversation.item.truncated")
        await client.create_response()
        await asyncio.wait_for(first_audio, 10)
        await client.interrupt()
        result = await client.collect_response(timeout=10)
        assert result.status == "cancelled" and result.status_details.reason == "client_cancelled"
        event = await asyncio.wait_for(truncated, 10)
        assert event.item_id == result.item_id and 0 <= event.audio_end_ms <= result.audio_ms
        assert any(isinstance(a, act.TruncateItem) for a in parrot.actions)


async def test_errors_surface_and_closing_ends_the_iterator(parrot):
    client = await connect(parrot.url)
    # nothing is judged locally: the server's own refusal comes back, naming the problem
    with pytest.raises(RealtimeClientError, match="rate") as refused:
        await client.update_session(audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}}})
    assert refused.value.error["code"] == "invalid_value"
    unknown = client.wait_for("error")
    await client.send({"type": "no.such.event"})
    assert (await asyncio.wait_for(unknown, 5)).error.code == "unknown_event_type"
    error = client.wait_for("error")
    await client.cancel()  # nothing in progress: the server answers with an error, the session lives
    assert (await asyncio.wait_for(error, 5)).error.code == "response_cancel_not_active"
    await client.close()
    assert client.closed
    assert [e async for e in client.events()][-1].type == "error"
    with pytest.raises(RealtimeClientError):
        await client.send_text("hello")
    with contextlib.suppress(Exception):
        await client.close()


async def test_client_works_over_any_connection():
    # the SDK needs only send/recv/close: here, a server-side session wired back to back in memory
    session = RealtimeSession()

    class InMemory:
        def __init__(self) -> None:
            self.inbox: asyncio.Queue[str] = asyncio.Queue()

        async def send(self, message: str) -> None:
            session.receive(message)
            self._drain()

        async def recv(self) -> str:
            return await self.inbox.get()

        async def close(self) -> None:
            pass

        def _drain(self) -> None:
            for event in session.take_events():
                self.inbox.put_nowait(event.to_json())

    connection = InMemory()
    session.start()
    connection._drain()
    client = RealtimeClient(connection)
    config = await client.start()
    assert config.id == session.id
    await client.send_text("hi")
    added = await asyncio.wait_for(client.wait_for("conversation.item.done"), 5)
    assert json.loads(added.to_json())["item"]["content"] == [{"type": "input_text", "text": "hi"}]
    await client.close()


async def test_the_official_openai_sdk_speaks_to_the_session(parrot):
    openai = pytest.importorskip("openai", reason="the official SDK is a dev dependency (openai[realtime])")
    client = openai.AsyncOpenAI(
        api_key="sk-official", base_url=parrot.url.replace("ws://", "http://").removesuffix("/realtime")
    )
    async with client.realtime.connect(model="parrot") as conn:
        await conn.session.update(
            session={
                "type": "realtime",
                "instructions": "Repeat.",
                "output_modalities": ["audio"],
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 400},
                    },
                    "output": {"voice": "marin"},
                },
            }
        )
        for i in range(0, len(HELLO), 2400):
            await conn.input_audio_buffer.append(audio=A.b64encode_audio(HELLO[i : i + 2400]))
        kinds, audio = [], []
        async for event in conn:
            kinds.append(event.type)
            assert event.type != "error", event
            if event.type == "response.output_audio.delta":
                audio.append(A.pcm16_from_bytes(base64.b64decode(event.delta)))
            if event.type == "response.done":
                assert event.response.status == "completed"
                assert event.response.output[0].content[0].transcript == "You said: that."
                break
        assert kinds[:3] == ["session.created", "session.updated", "input_audio_buffer.speech_started"]
        assert type(event).__name__ == "ResponseDoneEvent"  # parsed into the SDK's own GA types
        assert len(np.concatenate(audio)) > 24000
        assert parrot.headers[0]["authorization"] == "Bearer sk-official"


# ----------------------------------------------------------------------------------------------
# what the SDK leaves to the server, and what it tolerates from one


async def test_connect_is_an_async_context_manager_like_the_official_sdks(parrot):
    async with connect(parrot.url, api_key="sk-ctx", instructions="Hi.") as client:
        assert client.session.instructions == "Hi." and not client.closed
    assert client.closed


async def test_ga_events_this_server_refuses_are_sent_and_answered_by_the_server(parrot):
    async with connect(parrot.url) as client:
        # tools, a function_call_output item and a voice object are valid GA: the SDK sends them
        # and the answer is the server's (here: a refusal naming the parameter)
        with pytest.raises(RealtimeClientError) as tools:
            await client.update_session(tools=[{"type": "function", "name": "f", "parameters": {}}])
        assert (tools.value.error["code"], tools.value.error["param"]) == ("unsupported_feature", "session.tools")
        output = {"type": "function_call_output", "call_id": "call_1", "output": "{}"}
        with pytest.raises(RealtimeClientError) as item:
            await client.request({"type": "conversation.item.create", "item": output}, "conversation.item.added")
        assert item.value.error["code"] == "unsupported_feature" and "function_call_output" in str(item.value)
        try:
            session = await client.update_session(audio={"output": {"voice": {"id": "marin"}}})
        except RealtimeClientError as refused:  # the server's call, not the SDK's
            assert refused.error["event_id"] and refused.error["param"].startswith("session.audio.output.voice")
        else:
            assert session is not None
        assert not client.closed


async def test_update_session_takes_only_its_own_error_for_an_answer(parrot):
    async with connect(parrot.url, audio={"input": {"turn_detection": None}}) as client:
        errors = []
        client.on("error", errors.append)
        await client.commit()  # nothing buffered: an error, about the commit, arrives first
        session = await client.update_session(instructions="Still fine.")
        assert session.instructions == "Still fine."
        assert [e.error.code for e in errors] == ["input_audio_buffer_commit_empty"]


def openai_function_call_turn(call_id: str = "call_abc") -> list[dict]:
    """What OpenAI's GA server sends for a turn in which the model calls a function and then
    speaks (shapes of the official SDK's types, checked in the test)."""
    fc = {"id": "item_fc1", "object": "realtime.item", "type": "function_call", "status": "completed",
          "name": "get_weather", "call_id": call_id, "arguments": '{"city":"Paris"}'}
    msg = {"id": "item_msg1", "object": "realtime.item", "type": "message", "status": "completed",
           "role": "assistant", "content": [{"type": "output_audio", "transcript": "Sunny."}]}
    usage = {"total_tokens": 30, "input_tokens": 20, "output_tokens": 10,
             "input_token_details": {"text_tokens": 20, "audio_tokens": 0, "cached_tokens": 0},
             "output_token_details": {"text_tokens": 5, "audio_tokens": 5}}

    def response(rid: str, status: str, output: list) -> dict:
        return {"id": rid, "object": "realtime.response", "status": status, "output": output,
                "conversation_id": "conv_1", "output_modalities": ["audio"], "max_output_tokens": "inf",
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"}},
                "usage": usage if status != "in_progress" else None, "metadata": None,
                "status_details": None}

    audio = A.b64encode_audio(np.full(2400, 1000, np.int16))
    return [
        {"type": "response.created", "event_id": "e1", "response": response("resp_1", "in_progress", [])},
        {"type": "response.output_item.added", "event_id": "e2", "response_id": "resp_1", "output_index": 0,
         "item": {**fc, "status": "in_progress", "arguments": ""}},
        {"type": "response.function_call_arguments.delta", "event_id": "e3", "response_id": "resp_1",
         "item_id": "item_fc1", "output_index": 0, "call_id": call_id, "delta": '{"city":"Paris"}'},
        {"type": "response.function_call_arguments.done", "event_id": "e4", "response_id": "resp_1",
         "item_id": "item_fc1", "output_index": 0, "call_id": call_id, "name": "get_weather",
         "arguments": '{"city":"Paris"}'},
        {"type": "response.output_item.done", "event_id": "e5", "response_id": "resp_1", "output_index": 0,
         "item": fc},
        {"type": "response.done", "event_id": "e6", "response": response("resp_1", "completed", [fc])},
        {"type": "response.created", "event_id": "e7", "response": response("resp_2", "in_progress", [])},
        {"type": "response.output_item.added", "event_id": "e8", "response_id": "resp_2", "output_index": 0,
         "item": {**msg, "status": "in_progress", "content": []}},
        {"type": "response.output_audio.delta", "event_id": "e9", "response_id": "resp_2",
         "item_id": "item_msg1", "output_index": 0, "content_index": 0, "delta": audio},
        {"type": "response.output_audio_transcript.done", "event_id": "e10", "response_id": "resp_2",
         "item_id": "item_msg1", "output_index": 0, "content_index": 0, "transcript": "Sunny."},
        {"type": "response.done", "event_id": "e11", "response": response("resp_2", "completed", [msg])},
        {"type": "some.future_event", "event_id": "e12", "anything": [1, 2]},
    ]


async def test_function_calls_and_unknown_events_from_openai_do_not_end_the_session():
    openai_types = pytest.importorskip("openai.types.realtime", reason="the official SDK is a dev dependency")
    from pydantic import TypeAdapter

    script = openai_function_call_turn()
    official = TypeAdapter(openai_types.RealtimeServerEvent)
    for event in script[:-1]:  # the fixture is what OpenAI sends: its own SDK's types accept it
        official.validate_python(event)
    session = RealtimeSession()
    session.start()
    created = json.loads(session.take_events()[0].to_json())
    created["session"]["tools"] = [{"type": "function", "name": "get_weather", "parameters": {}}]

    async def openai_like(ws) -> None:
        await ws.send(json.dumps(created))
        async for message in ws:
            if json.loads(message)["type"] == "response.create":
                for event in script:
                    await ws.send(json.dumps(event))

    async with serve(openai_like, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/v1/realtime") as client:
            assert client.session is None and client.session_wire["tools"][0]["name"] == "get_weather"
            unknown = client.wait_for("some.future_event")
            await client.create_response()
            first, second = await client.collect_response(timeout=5), await client.collect_response(timeout=5)
            assert (first.status, first.usage.total_tokens, len(first.audio)) == ("completed", 30, 0)
            assert (second.item_id, second.transcript, len(second.audio)) == ("item_msg1", "Sunny.", 2400)
            event = await asyncio.wait_for(unknown, 5)
            assert isinstance(event, p.UnknownServerEvent) and event.anything == [1, 2]
            assert not client.closed
            await client.send_text("still connected")
