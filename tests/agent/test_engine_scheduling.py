"""Engine scheduling: the loop does not busy-poll while every response is far enough ahead of its
listener (flow control), and a response waiting for its first audio goes before sessions that are
comfortably ahead."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from agent.engine import (
    AddUserAudio,
    AudioDelta,
    Engine,
    EngineConfig,
    Respond,
    ResponseDone,
    ResponseParams,
    ResponseStarted,
)
from agent.lm.sampling import TASK_SAMPLING
from agent.runtime import load_runtime


@pytest.fixture(scope="module")
def runtime():
    return load_runtime(preset="tiny", device="cpu")


def _speech() -> np.ndarray:
    return (0.1 * np.sin(np.arange(12_000) * 0.05)).astype(np.float32)


def _respond(engine: Engine, patches: int) -> tuple[ResponseDone, float]:
    done = threading.Event()
    events: list = []

    def on_event(ev) -> None:
        events.append(ev)
        if isinstance(ev, ResponseDone):
            done.set()

    handle = engine.open_session(on_event)
    handle.submit(AddUserAudio("u1", _speech()))
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
    assert done.timings["total_ms"] > 0.6 * audio_s * 1000  # unpaced, it would take a few hundred ms
    assert engine.ticks < 200, f"{engine.ticks} ticks for a 16-patch response: the engine loop busy-polls"



def test_a_new_turn_goes_before_sessions_far_ahead(runtime) -> None:
    config = EngineConfig(max_sessions=2, max_audio_lead_s=30.0, urgent_lead_s=0.2, yield_lead_s=0.5)
    engine = Engine(runtime.lm, runtime.tokenizer, runtime.codec, config)
    log: list[tuple[str, object]] = []  # (session, event), in the engine's order
    lock = threading.Lock()
    ahead = threading.Event()
    done_b = threading.Event()
    samples = [0]

    def on_a(ev) -> None:
        with lock:
            log.append(("a", ev))
        if isinstance(ev, AudioDelta):
            samples[0] += len(ev.pcm)
            if samples[0] >= 3 * 24_000:  # 3 s generated in far less wall time: well ahead
                ahead.set()

    def on_b(ev) -> None:
        with lock:
            log.append(("b", ev))
        if isinstance(ev, ResponseDone):
            done_b.set()

    engine.start()
    try:
        a, b = engine.open_session(on_a), engine.open_session(on_b)
        long = ResponseParams(max_output_patches=400, min_patches=400, interleave=(1, 3))
        a.submit(AddUserAudio("ua", _speech()))
        a.submit(Respond("ra", "xa", long))
        assert ahead.wait(60), "session a did not get ahead of real time"
        b.submit(AddUserAudio("ub", _speech()))
        b.submit(Respond("rb", "xb", ResponseParams(max_output_patches=8, min_patches=8, interleave=(1, 3))))
        assert done_b.wait(60)
        resumed = samples[0]
        deadline = time.monotonic() + 30
        while samples[0] == resumed and time.monotonic() < deadline:  # a's next codec pass
            time.sleep(0.01)
    finally:
        engine.stop()
    with lock:
        events = list(log)
    start = next(i for i, (who, ev) in enumerate(events) if who == "b" and isinstance(ev, ResponseStarted))
    first = next(i for i, (who, ev) in enumerate(events) if who == "b" and isinstance(ev, AudioDelta))
    between = [ev for who, ev in events[start:first] if who == "a" and isinstance(ev, AudioDelta)]
    assert between == [], f"session a, seconds ahead, made {len(between)} audio chunks while b waited for its first"
    after = [ev for who, ev in events[first:] if who == "a" and isinstance(ev, AudioDelta)]
    assert after, "session a must resume once b has spoken"


@pytest.mark.parametrize("defer", [0.0, 0.2])
def test_sessions_far_ahead_decode_patches_in_bigger_codec_passes(runtime, defer) -> None:
    config = EngineConfig(max_sessions=1, max_audio_lead_s=30.0, codec_defer_margin_s=defer, codec_max_patches=4)
    engine = Engine(runtime.lm, runtime.tokenizer, runtime.codec, config)
    engine.start()
    chunks: list[int] = []
    done = threading.Event()
    result: list[ResponseDone] = []

    def on_event(ev) -> None:
        if isinstance(ev, AudioDelta):
            chunks.append(len(ev.pcm))
        elif isinstance(ev, ResponseDone):
            result.append(ev)
            done.set()

    try:
        handle = engine.open_session(on_event)
        handle.submit(AddUserAudio("u", _speech()))
        handle.submit(Respond("r", "a", ResponseParams(max_output_patches=40, min_patches=40, interleave=(1, 3))))
        assert done.wait(60)
    finally:
        engine.stop()
    patch = 4 * 960  # samples per speech patch
    assert sum(chunks) == result[0].timings["speech_patches"] * patch  # nothing lost or doubled
    if defer:  # generation runs far ahead of real time: passes of up to 4 patches
        assert max(chunks) >= 3 * patch and max(chunks) <= 5 * patch, chunks
        assert chunks[0] < patch  # the first chunk still leaves after one patch
    else:
        assert max(chunks) <= patch + 960, chunks  # one patch per pass (the last one flushes the holdback)


def test_the_graph_path_generates_what_the_eager_path_does(runtime) -> None:
    """``graphs=True`` on a CPU runs the CUDA-graph path's padded static-shape functions eagerly."""
    outputs = []
    for graphs in (False, True):
        # one codec pass per patch: how deferred patches group into passes depends on timing
        config = EngineConfig(max_sessions=3, codec_defer_margin_s=0.0)
        engine = Engine(runtime.lm, runtime.tokenizer, runtime.codec, config, graphs=graphs)
        assert (engine.graphs is not None) == graphs
        assert engine.cache.num_slots == 3 + graphs  # the graphs' scratch slot
        engine.start()
        try:
            events: list = []
            done = threading.Event()

            def on_event(ev, events=events, done=done) -> None:
                events.append(ev)
                if isinstance(ev, ResponseDone):
                    done.set()

            handle = engine.open_session(on_event, seed=5)
            handle.submit(AddUserAudio("u", _speech()))
            sampling = TASK_SAMPLING["spoken_dialogue"]  # seeded sampling on both channels
            handle.submit(Respond("r", "a", ResponseParams(max_output_patches=20, min_patches=20, interleave=(2, 3),
                                                           sampling=sampling)))
            assert done.wait(60)
        finally:
            engine.stop()
        audio = np.concatenate([e.pcm for e in events if isinstance(e, AudioDelta)])
        outputs.append((next(e for e in events if isinstance(e, ResponseDone)).transcript, audio))
    (text_eager, audio_eager), (text_graph, audio_graph) = outputs
    assert text_graph == text_eager
    np.testing.assert_allclose(audio_graph, audio_eager, atol=1e-5)


def test_codec_passes_of_sessions_in_lockstep_are_spread_over_ticks(runtime) -> None:
    """Six sessions stepping in one batch fill their codec passes on the same tick; once all are
    well ahead of their listeners the engine decodes at most ceil(6 / 4) + 1 = 3 of them per tick."""
    config = EngineConfig(max_sessions=6, max_audio_lead_s=30.0, codec_max_patches=4, codec_defer_margin_s=0.2)
    batches: list[tuple[float, int]] = []
    engine = Engine(runtime.lm, runtime.tokenizer, runtime.codec, config,
                    metrics=lambda name, s, labels: batches.append((time.perf_counter(), labels["batch"]))
                    if name == "codec_decode" else None)
    lock = threading.Lock()
    audio = [0] * 6
    ahead_at: list[float] = []  # when every session had 1.5 s of audio out (generation runs ~10x real time)
    done = threading.Semaphore(0)

    def on_event(i: int, ev) -> None:
        if isinstance(ev, AudioDelta):
            with lock:
                audio[i] += len(ev.pcm)
                if not ahead_at and min(audio) >= 1.5 * 24_000:
                    ahead_at.append(time.perf_counter())
        elif isinstance(ev, ResponseDone):
            done.release()

    engine.start()
    try:
        handles = [engine.open_session(lambda ev, i=i: on_event(i, ev)) for i in range(6)]
        for h in handles:
            h.submit(AddUserAudio("u", _speech()))
        for h in handles:
            h.submit(Respond("r", "a", ResponseParams(max_output_patches=80, min_patches=80, interleave=(1, 3))))
        for _ in handles:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    assert ahead_at
    late = [n for t, n in batches if t > ahead_at[0]]
    assert late and max(late) <= 3, batches
