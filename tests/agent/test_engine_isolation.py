"""Fault isolation in the engine: an exception while serving one session fails that session alone
(an error naming it, its slot reset) and every other session's response completes with its audio.
Faults are injected into the real engine on the tiny preset at each stage: job handling, prefill,
the batched decode step, the patch decoder, the codec pass, the audio encoder, the transcriber."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.engine import (
    AddUserAudio,
    AddUserText,
    AudioDelta,
    Configure,
    EngineError,
    ItemAdded,
    Respond,
    ResponseDone,
    ResponseParams,
    Truncate,
)
from agent.transcriber import TranscriptionDone, TranscriptionFailed
from tests.agent.test_engine import GREEDY_BOTH, Client, make_engine, speech

pytestmark = pytest.mark.timeout(120)

LONG = dict(interleave=(1, 3), max_output_patches=40, min_patches=40, sampling=GREEDY_BOTH)


class Injected(RuntimeError):
    """The fault the tests inject."""


@pytest.fixture(scope="module")
def runtime():
    from agent.runtime import load_runtime

    return load_runtime(preset="tiny", device="cpu")


def start_long(c: Client, rid: str = "rb") -> None:
    """A 40-patch audio answer, running until its first audio arrives."""
    c.submit(AddUserText("ub", "Tell me a long story about the sea"))
    c.submit(Respond(rid, "a_" + rid, ResponseParams(**LONG)))
    c.until(AudioDelta)


def finishes_with_its_audio(c: Client) -> ResponseDone:
    """The rest of a response: completed or out of budget (never failed), every speech patch heard."""
    events, done = c.until(ResponseDone)
    assert done.status in ("completed", "incomplete"), done
    assert not [e for e in events if isinstance(e, EngineError)]
    assert done.timings["speech_patches"] > 0
    assert done.timings["audio_samples"] == done.timings["speech_patches"] * 3840
    return done


def fails_alone(engine, c: Client, rid: str, stage: str) -> EngineError:
    """The victim's response fails with an error naming its session and the stage; its slot is empty."""
    _, err = c.until(EngineError)
    assert err.response_id == rid and err.code == "session_failed"
    assert f"session {c.handle.sid}" in err.message and stage in err.message and "Injected" in err.message
    _, done = c.until(ResponseDone)
    assert done.response_id == rid and done.status == "failed"
    assert engine.cache.length(c.state.slot) == 0 and len(c.state.cached) == 0
    return err


def recovers(c: Client) -> None:
    """The failed session goes on: its next response prefills the whole conversation again."""
    c.submit(AddUserText("again", "Still there?"))
    _, done = c.respond("r_again", audio=False)
    assert done.status in ("completed", "incomplete")
    assert done.usage["input_token_details"]["cached_tokens"] == 0


def test_a_fault_in_prefill_fails_that_session_alone(runtime, monkeypatch):
    engine = make_engine(runtime)
    try:
        a, b = Client(engine), Client(engine, seed=1)
        start_long(b)
        real = engine.lm.prefill
        victim = a.handle.slot

        def prefill(cache, slot, emb):
            if slot == victim:
                raise Injected("prefill of the victim")
            return real(cache, slot, emb)

        monkeypatch.setattr(engine.lm, "prefill", prefill)
        a.submit(AddUserText("ua", "Hello"))
        a.submit(Respond("ra", "a_ra", ResponseParams(sampling=GREEDY_BOTH)))
        fails_alone(engine, a, "ra", "prefill")
        finishes_with_its_audio(b)
        monkeypatch.setattr(engine.lm, "prefill", real)
        recovers(a)
    finally:
        engine.stop()


def _two_generating(engine) -> tuple[Client, Client]:
    """Two sessions generating audio answers in the same decode steps (no yielding)."""
    a, b = Client(engine), Client(engine, seed=1)
    for c, rid in ((a, "ra"), (b, "rb")):
        c.submit(AddUserText("u", f"Tell me about {rid}"))
        c.submit(Respond(rid, "a_" + rid, ResponseParams(**LONG)))
    return a, b


def test_a_fault_in_the_batched_decode_step_fails_that_row_alone(runtime):
    reference = make_engine(runtime, yield_lead_s=0.0)
    try:
        _, alone = _two_generating(reference)
        expected = finishes_with_its_audio(alone)
        expected_patches = alone.state.items[-1].patches
    finally:
        reference.stop()

    engine = make_engine(runtime, yield_lead_s=0.0)
    try:
        real = engine.decode_step
        raised: list[list[int]] = []
        victim: list[int] = []

        def decode_step(cache, slots, emb):
            if victim and victim[0] in list(slots):
                raised.append(list(slots))
                raise Injected("decode step of the victim")
            return real(cache, slots, emb)

        engine.decode_step = decode_step
        a, b = Client(engine), Client(engine, seed=1)
        victim.append(a.handle.slot)
        for c, rid in ((a, "ra"), (b, "rb")):
            c.submit(AddUserText("u", f"Tell me about {rid}"))
            c.submit(Respond(rid, "a_" + rid, ResponseParams(**LONG)))
        fails_alone(engine, a, "ra", "decode step")
        done = finishes_with_its_audio(b)
        assert sorted(raised[0]) == sorted([a.handle.slot, b.handle.slot])  # the batch raised; the rows retried
        # the innocent row lost nothing: its answer is the one it gives alone
        assert done.transcript == expected.transcript
        patches = b.state.items[-1].patches
        assert patches.text_ids.tolist() == expected_patches.text_ids.tolist()
        assert patches.codes.tolist() == expected_patches.codes.tolist()
        engine.decode_step = real
        recovers(a)
    finally:
        engine.stop()


def test_a_fault_in_the_patch_decoder_fails_that_row_alone(runtime):
    engine = make_engine(runtime, yield_lead_s=0.0)
    try:
        real = engine.decode_patch
        clients: list[Client] = []

        def decode_patch(h, params, generators):
            victim = clients[0].state.speech_generator if clients else None
            if any(g is victim for g in generators or ()):
                raise Injected("patch decoder of the victim")
            return real(h, params, generators)

        engine.decode_patch = decode_patch
        a, b = Client(engine), Client(engine, seed=1)
        clients.append(a)
        for c, rid in ((a, "ra"), (b, "rb")):
            c.submit(AddUserText("u", f"Tell me about {rid}"))
            c.submit(Respond(rid, "a_" + rid, ResponseParams(**LONG)))
        fails_alone(engine, a, "ra", "decode step")
        finishes_with_its_audio(b)
    finally:
        engine.stop()


class FaultyCodec:
    """The real codec, except that a codec pass holding the victim's stream raises."""

    def __init__(self, codec, victim) -> None:
        self._codec = codec
        self._victim = victim
        self.raised: list[int] = []

    def __getattr__(self, name):
        return getattr(self._codec, name)

    def decode_streams(self, items):
        victim = self._victim()
        if victim is not None and any(stream is victim for stream, _ in items):
            self.raised.append(len(items))
            raise Injected("codec pass of the victim")
        return self._codec.decode_streams(items)


def test_a_fault_in_the_codec_pass_fails_that_stream_alone(runtime):
    engine = make_engine(runtime, yield_lead_s=0.0, codec_defer_margin_s=0.0)
    try:
        clients: list[Client] = []

        def victim():
            r = clients[0].state.response if clients else None
            return r.stream if r is not None else None

        codec = FaultyCodec(engine.codec, victim)
        engine.codec = codec
        a, b = Client(engine), Client(engine, seed=1)
        clients.append(a)
        start_long(b)
        a.submit(AddUserText("ua", "Hello"))
        a.submit(Respond("ra", "a_ra", ResponseParams(**LONG)))
        fails_alone(engine, a, "ra", "codec pass")
        finishes_with_its_audio(b)
        assert codec.raised
    finally:
        engine.stop()


def test_a_job_that_raises_fails_its_session_alone(runtime, monkeypatch):
    engine = make_engine(runtime)
    try:
        a, b = Client(engine), Client(engine, seed=1)
        a.submit(AddUserText("ua", "Hello"))
        a.respond("r1", audio=False)
        start_long(b)
        real = engine._truncate

        def truncate(s, job):
            if s.sid == a.handle.sid:
                raise Injected("truncate of the victim")
            return real(s, job)

        monkeypatch.setattr(engine, "_truncate", truncate)
        a.submit(Truncate("a_r1", 0))
        _, err = a.until(EngineError)
        assert err.code == "session_failed" and "Truncate" in err.message and f"session {a.handle.sid}" in err.message
        finishes_with_its_audio(b)
        assert engine.cache.length(a.state.slot) == 0
        recovers(a)
    finally:
        engine.stop()


def _pause_engine(engine) -> threading.Event:
    """Hold the engine thread in an event callback until the returned event is set, so that the
    jobs submitted meanwhile are handled in one tick."""
    gate, held = threading.Event(), threading.Event()

    def on_event(event) -> None:
        if isinstance(event, ItemAdded):
            held.set()
            gate.wait(30)

    engine.open_session(on_event).submit(AddUserText("pause", "wait"))
    assert held.wait(30)
    return gate


def test_bad_audio_in_a_batched_encode_fails_that_item_alone(runtime):
    engine = make_engine(runtime)
    try:
        a, b = Client(engine), Client(engine, seed=1)
        gate = _pause_engine(engine)
        a.submit(AddUserAudio("bad", np.full(9600, np.nan, dtype=np.float32)))
        b.submit(AddUserAudio("good", speech(0.6)))
        gate.set()  # both turns are encoded in one batch
        _, err = a.until(EngineError)
        assert err.code == "invalid_audio" and err.item_id == "bad"
        _, added = b.until(ItemAdded)
        assert added.item_id == "good" and added.patches > 2
    finally:
        engine.stop()


def test_a_fault_in_the_transcriber_fails_that_transcript_alone(runtime, monkeypatch):
    engine = make_engine(runtime)
    try:
        a, b = Client(engine), Client(engine, seed=1)
        real = engine.transcriber.builder.asr
        calls: list[int] = []

        def asr(codes):
            calls.append(len(codes))
            if len(calls) == 1:
                raise Injected("transcription of the victim")
            return real(codes)

        monkeypatch.setattr(engine.transcriber, "builder", _Proxy(engine.transcriber.builder, asr=asr))
        a.submit(AddUserAudio("ua", speech(0.8), transcribe=True))
        a.until(ItemAdded)
        b.submit(AddUserAudio("ub", speech(0.8, seed=1), transcribe=True))
        _, failed = a.until(TranscriptionFailed)
        assert failed.item_id == "ua" and "Injected" in failed.message
        _, done = b.until(TranscriptionDone)
        assert done.item_id == "ub"
        a.submit(AddUserText("ua2", "and text"))
        _, response = a.respond("r1", audio=False)
        assert response.status in ("completed", "incomplete")
    finally:
        engine.stop()


class _Proxy:
    def __init__(self, target, **overrides) -> None:
        self._target = target
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._target, name)


def test_a_response_that_cannot_start_fails_alone(runtime):
    engine = make_engine(runtime)
    try:
        a = Client(engine)
        calls: list[int] = []

        def new_decode_stream(*args):
            calls.append(1)
            if len(calls) == 1:
                raise Injected("no stream for the victim")
            return runtime.codec.new_decode_stream(*args)

        engine.codec = _Proxy(runtime.codec, new_decode_stream=new_decode_stream)
        a.submit(AddUserText("ua", "Hello"))
        a.submit(Respond("ra", "a_ra", ResponseParams(sampling=GREEDY_BOTH)))
        _, err = a.until(EngineError)
        assert err.response_id == "ra" and err.code == "session_failed" and "starting the response" in err.message
        assert [it.item_id for it in a.state.items] == ["ua"]  # the answer that never started is gone
        _, done = a.respond("rb", max_output_patches=8)
        assert done.status in ("completed", "incomplete") and done.timings["speech_patches"] >= 0
    finally:
        engine.stop()


def test_a_bad_voice_prompt_is_refused_and_the_running_answer_goes_on(runtime):
    engine = make_engine(runtime)
    try:
        c = Client(engine)
        start_long(c)
        c.submit(Configure(voice_pcm=np.full(4800, np.nan, dtype=np.float32)))
        _, err = c.until(EngineError)
        assert err.code == "invalid_audio" and "voice prompt" in err.message
        finishes_with_its_audio(c)
    finally:
        engine.stop()
