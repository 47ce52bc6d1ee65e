"""The Python client SDK against the real server (tiny model, loopback)."""

from __future__ import annotations

import asyncio

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
    with pytest.raises(Exception) as refused:
        await connect(server.ws_url, api_key="wrong")
    assert "401" in str(refused.value)
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
