"""The Python client SDK against the real server (tiny model, loopback)."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from streaming.audio import read_wav
from streaming.client import RealtimeClientError, connect
from tests.streaming.live_server import start_server
from tests.streaming.realtime_client import DATA

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server():
    live = start_server("--max-sessions", "4", "--api-key", "k3y")
    yield live
    live.stop()


def speech(name: str = "speech_yes.wav") -> np.ndarray:
    pcm, rate = read_wav(DATA / name)
    assert rate == 24000
    return pcm


async def test_sdk_turn_with_resampled_input_and_collected_response(server):
    pcm = speech()
    # the SDK accepts any rate: send it at 16 kHz, float32
    t = np.arange(int(len(pcm) * 16000 / 24000)) * (24000 / 16000)
    at16k = np.interp(t, np.arange(len(pcm)), pcm.astype(np.float32) / 32768).astype(np.float32)
    async with await connect(server.ws_url, api_key="k3y", model="mimo",
                             audio={"input": {"turn_detection": None}}) as client:
        deltas: list = []
        client.on("response.output_audio.delta", deltas.append)
        await client.send_audio(at16k, sample_rate=16000)
        await client.commit()
        await client.create_response()
        result = await client.collect_response(timeout=60)
    assert result.status in ("completed", "incomplete")
    assert len(result.audio) == round(result.timings["audio_samples"]) > 0
    assert len(deltas) > 0
    assert result.transcript
    assert result.timings["server_first_audio_ms"] > 0


async def test_sdk_interrupt_cancels_and_truncates(server):
    async with await connect(server.ws_url, api_key="k3y", auth="subprotocol",
                             audio={"input": {"turn_detection": None}}, max_output_tokens=200,
                             mimo={"min_output_tokens": 200}) as client:
        await client.send_audio(speech())
        await client.commit()
        first_audio = client.wait_for("response.output_audio.delta")
        await client.create_response()
        await asyncio.wait_for(first_audio, 30)
        await asyncio.sleep(0.4)
        truncated = client.wait_for("conversation.item.truncated")
        await client.interrupt()
        result = await client.collect_response(timeout=30)
        assert result.status == "cancelled"
        event = await asyncio.wait_for(truncated, 10)
        assert 0 < event.audio_end_ms <= len(result.audio) * 1000 / 24000 + 1


async def test_sdk_reports_refusals(server):
    for key in ("wrong", None):  # a wrong key and no key: a 401 saying so, not "connection failed"
        with pytest.raises(RealtimeClientError) as refused:
            await connect(server.ws_url, api_key=key)
        assert refused.value.error["status"] == 401 and refused.value.error["code"] == "invalid_api_key"
        assert str(refused.value).startswith(f"{server.ws_url} refused the connection (HTTP 401 invalid_api_key): "
                                             "Missing or invalid API key")
    async with await connect(server.ws_url, api_key="k3y") as client:
        # invalid settings come back refused, with the server's own message
        with pytest.raises(RealtimeClientError, match="supports only rate 24000"):
            await client.update_session(audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}}})
        # what only the server can judge comes back as an error event, and the session goes on
        error = client.wait_for("error")
        await client.commit()
        assert (await asyncio.wait_for(error, 10)).error.code == "input_audio_buffer_commit_empty"
        assert (await client.update_session(instructions="Be brief.")).instructions == "Be brief."
    with pytest.raises(RealtimeClientError):
        await client.send_text("after close")


async def test_sdk_says_when_nothing_answers():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RealtimeClientError) as down:
        await connect(f"ws://127.0.0.1:{port}/v1/realtime")
    assert down.value.error["code"] == "server_unreachable"
    assert f"cannot reach the server at ws://127.0.0.1:{port}/v1/realtime: " in str(down.value)


async def test_transcripts_are_readable_text(server):
    """The tiny model's random weights write random ids (special tokens, control and non-UTF-8
    bytes); both transcripts the SDK hands over, the agent's and the user's (the model's ASR), are
    readable text."""
    from tests.agent.lm.test_tokenizer import _UNREADABLE

    async with await connect(server.ws_url, api_key="k3y",
                             audio={"input": {"turn_detection": None, "transcription": {"model": "mimo-asr"}}}
                             ) as client:
        transcribed = client.wait_for("conversation.item.input_audio_transcription.completed")
        await client.send_audio(speech())
        await client.commit()
        texts = [(await asyncio.wait_for(transcribed, 60)).transcript]
        for _ in range(2):
            await client.create_response()
            texts.append((await client.collect_response(timeout=60)).transcript)
    assert sum(map(len, texts)) > 3  # the random weights write some readable characters too
    for text in texts:
        assert not _UNREADABLE.search(text), repr(text)
