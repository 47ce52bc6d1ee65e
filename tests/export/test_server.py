"""``mimo-agent serve --backend onnx`` answers a spoken turn over a real socket."""

from __future__ import annotations

import numpy as np
import pytest

from export.codec import OnnxCodec
from export.manifest import ExportMismatch
from export.runtime import OnnxBackboneStep, OnnxPatchDecoder, OnnxPatchEncoder
from tests.streaming import realtime_client as rc
from tests.streaming.live_server import start_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(export_dir):
    live = start_server("--backend", "onnx", "--export-dir", str(export_dir), "--max-sessions", "2")
    yield live
    live.stop()


async def test_a_turn_on_the_onnx_backend(server):
    assert isinstance(server.engine.decode_patch, OnnxPatchDecoder)
    assert isinstance(server.engine.embed_patches, OnnxPatchEncoder)
    assert isinstance(server.engine.decode_step, OnnxBackboneStep)
    assert isinstance(server.engine.codec, OnnxCodec)
    ws = await rc.connect(server.ws_url)
    try:
        await rc.update(ws, audio={"input": {"turn_detection": None}})
        await rc.append(ws, rc.wav_pcm16("speech_yes.wav"))
        await rc.send(ws, {"type": "input_audio_buffer.commit"})
        await rc.send(ws, {"type": "response.create"})
        events: list[dict] = []
        done = await rc.until(ws, "response.done", events=events, timeout=120)
    finally:
        await ws.close()
    response = done["response"]
    assert response["status"] in ("completed", "incomplete"), response
    timings = response["mimo"]["timings"]
    audio = rc.audio_of(events)
    assert timings["speech_patches"] >= 1
    assert len(audio) == timings["speech_patches"] * 3840  # 160 ms of 24 kHz audio per speech patch
    assert np.abs(audio).max() > 0
    assert "response.output_audio.done" in rc.types(events)


def test_a_stale_export_stops_the_server(export_copy):
    manifest = export_copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 1', '"version": 99'))
    with pytest.raises(ExportMismatch, match="manifest version 99"):
        start_server("--backend", "onnx", "--export-dir", str(export_copy))
