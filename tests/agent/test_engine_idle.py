"""The engine loop does not busy-poll: while every response is far enough ahead of its listener
(flow control), it sleeps on the job queue until the first may step again."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.engine import AddUserAudio, AudioDelta, Engine, EngineConfig, Respond, ResponseDone, ResponseParams
from agent.runtime import load_runtime


@pytest.fixture(scope="module")
def runtime():
    return load_runtime(preset="tiny", device="cpu")


def _respond(engine: Engine, patches: int) -> tuple[ResponseDone, float]:
    done = threading.Event()
    events: list = []

    def on_event(ev) -> None:
        events.append(ev)
        if isinstance(ev, ResponseDone):
            done.set()

    handle = engine.open_session(on_event)
    pcm = (0.1 * np.sin(np.arange(12_000) * 0.05)).astype(np.float32)
    handle.submit(AddUserAudio("u1", pcm))
    handle.submit(Respond("r1", "a1", ResponseParams(max_output_patches=patches, min_patches=patches,
                                                     interleave=(1, 3))))
    assert done.wait(60), "the response did not finish"
    handle.close()
    audio_s = sum(len(e.pcm) for e in events if isinstance(e, AudioDelta)) / 24_000
    return next(e for e in events if isinstance(e, ResponseDone)), audio_s


def test_flow_controlled_response_does_not_spin(runtime) -> None:
    engine = Engine(runtime.lm, runtime.tokenizer, runtime.codec, EngineConfig(max_sessions=1, max_audio_lead_s=0.2))
    engine.start()
    try:
        done, audio_s = _respond(engine, 16)  # 12 speech patches: about 1.9 s of audio, paced at real time
    finally:
        engine.stop()
    assert done.status == "completed" or done.reason == "max_output_tokens"
    assert audio_s > 1.0
    # generation is paced (it cannot run more than 0.2 s ahead of real time), and the loop ticks only
    # when it has work: about once per patch and codec chunk, not thousands of polls while it waits
    assert done.timings["total_ms"] > (audio_s - 0.2 - 0.2) * 1000
    assert engine.ticks < 200, f"{engine.ticks} ticks for a 16-patch response: the engine loop busy-polls"

