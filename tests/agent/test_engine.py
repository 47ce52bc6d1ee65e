"""The batched engine on the tiny preset: scheduling, KV reuse across turns, rollback, batching,
context limits, admission. The engine runs on its own thread, as in the server."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
import torch

from agent.conversation import common_prefix, truncate_patches
from agent.engine import (
    AT_START,
    AddSystemText,
    AddUserAudio,
    AddUserText,
    AudioDelta,
    Cancel,
    Configure,
    DeleteItem,
    Engine,
    EngineConfig,
    ItemAdded,
    ItemsDropped,
    ItemTruncated,
    Respond,
    ResponseDone,
    ResponseParams,
    ServerBusy,
    TextDelta,
    Truncate,
)
from agent.lm.sampling import GREEDY, ChannelSampling, SamplingParams
from agent.runtime import load_runtime

pytestmark = pytest.mark.timeout(120)

GREEDY_BOTH = ChannelSampling(GREEDY, GREEDY)


@pytest.fixture(scope="module")
def runtime():
    return load_runtime(preset="tiny", device="cpu")


def make_engine(runtime, **config) -> Engine:
    config.setdefault("max_sessions", 4)
    config.setdefault("max_positions", 1024)
    return Engine(runtime.lm, runtime.tokenizer, runtime.codec, EngineConfig(**config)).start()


class Client:
    """One engine session and the events it received."""

    def __init__(self, engine: Engine, seed: int = 0) -> None:
        self.events: queue.Queue = queue.Queue()
        self.handle = engine.open_session(self.events.put, seed=seed)
        self.engine = engine

    def submit(self, job) -> None:
        self.handle.submit(job)

    def until(self, kind, timeout: float = 60.0) -> tuple[list, object]:
        seen = []
        while True:
            event = self.events.get(timeout=timeout)
            seen.append(event)
            if isinstance(event, kind):
                return seen, event

    def respond(self, rid: str, **params) -> tuple[list, ResponseDone]:
        params.setdefault("sampling", GREEDY_BOTH)
        params.setdefault("max_output_patches", 12)
        self.submit(Respond(rid, "a_" + rid, ResponseParams(**params)))
        return self.until(ResponseDone)

    @property
    def state(self):
        return self.engine._sessions[self.handle.sid]


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced test signal (harmonics plus noise): the codec only needs real-valued audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24000)) / 24000
    wav = 0.3 * np.sin(2 * np.pi * 140 * t) + 0.1 * np.sin(2 * np.pi * 420 * t) + 0.02 * rng.standard_normal(t.size)
    return wav.astype(np.float32)


def test_text_turns_reuse_the_cache_and_prefill_only_new_positions(runtime):
    engine = make_engine(runtime)
    try:
        c = Client(engine)
        c.submit(AddUserText("u1", "Hello there"))
        _, first = c.respond("r1", audio=False)
        assert first.usage["input_token_details"]["cached_tokens"] == 0
        c.submit(AddUserText("u2", "And again"))
        _, second = c.respond("r2", audio=False)
        cached = second.usage["input_token_details"]["cached_tokens"]
        assert cached == first.usage["total_tokens"] - 1  # the last patch is fed with the next turn
        assert second.timings["prefill_positions"] == second.usage["input_tokens"] - cached
        # the cache holds the rendered conversation up to the last response's unfed last patch
        s = c.state
        rendering = engine.renderer.render(s.items, instructions=s.instructions)
        start, _ = rendering.spans["a_r2"]
        header = len(engine.renderer.assistant_open(False))
        assert engine.cache.length(s.slot) == len(s.cached) == start + header + len(s.items[-1].patches) - 1
        assert common_prefix(s.cached, rendering.prompt) == len(s.cached)
    finally:
        engine.stop()


def test_audio_turn_streams_text_and_audio_of_the_right_length(runtime):
    engine = make_engine(runtime)
    try:
        c = Client(engine)
        c.submit(AddUserAudio("u1", speech(1.3)))
        _, added = c.until(ItemAdded)
        assert added.item_id == "u1" and added.patches > 2 and added.encode_ms > 0
        events, done = c.respond("r1", interleave=(2, 3), max_output_patches=15, min_patches=15)
        audio = np.concatenate([e.pcm for e in events if isinstance(e, AudioDelta)])
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        assert done.status == "incomplete" and done.reason == "max_output_tokens"
        assert done.timings["speech_patches"] == 9 and done.timings["text_patches"] == 6
        assert len(audio) == 9 * 3840 == done.timings["audio_samples"]
        assert text == done.transcript
        order = [done.timings[k] for k in ("prefill_done_ms", "first_patch_ms", "first_speech_patch_ms",
                                           "first_audio_ms", "total_ms")]
        assert order == sorted(order)
    finally:
        engine.stop()


def test_batched_sessions_equal_sessions_alone(runtime):
    """Rows of one batched step produce what each session produces alone (seeded sampling)."""

    def run(max_batch: int) -> list[torch.Tensor]:
        engine = make_engine(runtime, max_batch=max_batch)
        try:
            clients = [Client(engine, seed=10 + i) for i in range(3)]
            sampling = ChannelSampling(SamplingParams(0.9, top_p=0.9), SamplingParams(0.9, top_k=5))
            for i, c in enumerate(clients):
                c.submit(AddUserText("u", f"turn number {i}, with some more words" * (i + 1)))
                c.submit(Respond("r", "a", ResponseParams(sampling=sampling, interleave=(1, 2),
                                                         max_output_patches=9 + i)))
            for c in clients:
                c.until(ResponseDone)
            return [c.state.items[-1].patches for c in clients]
        finally:
            engine.stop()

    batched, alone = run(64), run(1)
    for a, b in zip(batched, alone, strict=True):
        assert torch.equal(a.text_ids, b.text_ids) and torch.equal(a.codes, b.codes)


def test_truncate_rolls_the_cache_back_to_what_was_heard(runtime):
    engine = make_engine(runtime)
    try:
        c = Client(engine)
        c.submit(AddUserText("u1", "Tell me a story"))
        _, done = c.respond("r1", interleave=(1, 4), max_output_patches=20, min_patches=20)
        item = c.state.items[-1]
        full = item.patches
        c.submit(Truncate("a_r1", audio_end_ms=500))
        _, truncated = c.until(ItemTruncated)
        kept = truncate_patches(full, engine.specials.empty, 500)
        assert torch.equal(item.patches.text_ids, kept.text_ids)
        assert int((kept.text_ids == engine.specials.empty).sum()) == 4  # 500 ms: 4 patches partly heard
        s = c.state
        _start, end = engine.renderer.render(s.items, instructions=s.instructions).spans["a_r1"]
        assert engine.cache.length(s.slot) <= end
        # the next turn prefills from the end of what was heard
        c.submit(AddUserText("u2", "Go on"))
        _, after = c.respond("r2", audio=False)
        assert truncated.audio_end_ms == 500 and truncated.transcript == engine.renderer.assistant_text(item)
        assert after.usage["input_token_details"]["cached_tokens"] <= end
        assert after.status in ("completed", "incomplete") and done.status == "incomplete"
    finally:
        engine.stop()


def test_rollback_then_regenerate_equals_a_fresh_run(runtime):
    """A response generated after deleting an answer equals the same response in a fresh session."""
    engine = make_engine(runtime)
    try:
        a = Client(engine, seed=3)
        a.submit(AddUserText("u1", "What time is it?"))
        a.respond("r1", audio=False)
        a.submit(DeleteItem("a_r1"))
        a.submit(AddUserText("u2", "Never mind, say hi"))
        _, again = a.respond("r2", audio=False)
        assert again.usage["input_token_details"]["cached_tokens"] > 0  # u1 stays cached

        b = Client(engine, seed=3)
        b.submit(AddUserText("u1", "What time is it?"))
        b.submit(AddUserText("u2", "Never mind, say hi"))
        _, fresh = b.respond("r2", audio=False)
        assert again.transcript == fresh.transcript
        assert torch.equal(a.state.items[-1].patches.text_ids, b.state.items[-1].patches.text_ids)
    finally:
        engine.stop()


def test_inserted_items_take_their_place_in_the_context(runtime):
    """Items added at the start (``previous_item_id: "root"``) or after an item render in that order:
    the same response as a session that received them in order. User audio takes its place when
    its job arrives, not when it is encoded, so a text item sent after it follows it."""
    engine = make_engine(runtime)
    try:
        a = Client(engine, seed=5)
        a.submit(AddUserText("u2", "What did I say?"))
        a.submit(AddUserText("u1", "Listen:", after=AT_START))  # an item of two parts: the second
        a.submit(AddUserAudio("u1", speech(0.7), after="u1"))  # follows the first
        a.submit(AddSystemText("s1", "Be brief.", after="u1"))
        a.submit(AddUserText("u3", "Answer now."))  # appended after u2
        _, inserted = a.respond("r", audio=False)
        order = ["u1", "u1", "s1", "u2", "u3", "a_r"]
        assert [it.item_id for it in a.state.items] == order
        assert a.state.items[0].text == "Listen:" and a.state.items[1].codes is not None

        b = Client(engine, seed=5)
        b.submit(AddUserText("u1", "Listen:"))
        b.submit(AddUserAudio("u1", speech(0.7)))
        b.submit(AddSystemText("s1", "Be brief."))
        b.submit(AddUserText("u2", "What did I say?"))
        b.submit(AddUserText("u3", "Answer now."))
        _, in_order = b.respond("r", audio=False)
        assert [it.item_id for it in b.state.items] == order
        assert inserted.transcript == in_order.transcript
        assert torch.equal(a.state.items[-1].patches.text_ids, b.state.items[-1].patches.text_ids)
    finally:
        engine.stop()


def test_insert_before_cached_items_rolls_the_cache_back(runtime):
    """An item inserted at the start of a conversation the cache already holds: the next response
    re-prefills from the insertion and equals a fresh session's."""
    engine = make_engine(runtime)
    try:
        a = Client(engine, seed=7)
        a.submit(AddUserText("u1", "Tell me about rivers"))
        _, first = a.respond("r1", audio=False)
        a.submit(AddUserText("u0", "I like maps.", after=AT_START))
        a.submit(DeleteItem("a_r1"))
        _, again = a.respond("r2", audio=False)
        s = a.state
        rendering = engine.renderer.render(s.items, instructions=s.instructions)
        assert first.usage["total_tokens"] > rendering.spans["u0"][1]  # the cache held more than that
        assert again.usage["input_token_details"]["cached_tokens"] < rendering.spans["u0"][1]
        assert common_prefix(s.cached, rendering.prompt) == len(s.cached)

        b = Client(engine, seed=7)
        b.submit(AddUserText("u0", "I like maps."))
        b.submit(AddUserText("u1", "Tell me about rivers"))
        _, fresh = b.respond("r2", audio=False)
        assert again.transcript == fresh.transcript
        assert torch.equal(a.state.items[-1].patches.text_ids, b.state.items[-1].patches.text_ids)
    finally:
        engine.stop()


def test_cancel_stops_between_patches(runtime):
    engine = make_engine(runtime, max_audio_lead_s=0.5)
    try:
        c = Client(engine)
        c.submit(AddUserText("u1", "Speak for a long time"))
        c.submit(Respond("r1", "a1", ResponseParams(interleave=(1, 8), max_output_patches=400, min_patches=400)))
        c.until(AudioDelta)
        c.submit(Cancel("r1", "client_cancelled"))
        _, done = c.until(ResponseDone)
        assert done.status == "cancelled" and done.reason == "client_cancelled"
        assert done.usage["output_tokens"] < 400
    finally:
        engine.stop()


def test_flow_control_keeps_generation_near_real_time(runtime):
    engine = make_engine(runtime, max_audio_lead_s=0.4)
    try:
        c = Client(engine)
        c.submit(AddUserText("u1", "Talk"))
        c.submit(Respond("r1", "a1", ResponseParams(interleave=(1, 8), max_output_patches=400, min_patches=400)))
        c.until(AudioDelta)
        threading.Event().wait(0.5)
        r = c.state.response
        assert r is not None and r.phase == "generate"
        # ahead of the wall clock by at most the lead plus one codec chunk
        lead = engine._lead_s(r, time.perf_counter())
        assert lead <= 0.4 + 0.2
        c.submit(Cancel("r1"))
        c.until(ResponseDone)
    finally:
        engine.stop()


def test_oldest_turns_are_dropped_at_the_context_limit(runtime):
    engine = make_engine(runtime, max_positions=160)
    try:
        c = Client(engine)
        dropped = []
        for turn in range(6):
            c.submit(AddUserText(f"u{turn}", f"a fairly long user message number {turn}"))
            events, done = c.respond(f"r{turn}", audio=False, max_output_patches=10)
            dropped += [i for e in events if isinstance(e, ItemsDropped) for i in e.item_ids]
            assert done.status in ("completed", "incomplete")
        assert dropped[:2] == ["u0", "a_r0"]
        assert engine.cache.length(c.state.slot) <= 160
    finally:
        engine.stop()


def test_out_of_band_response_leaves_history_untouched(runtime):
    engine = make_engine(runtime)
    try:
        c = Client(engine)
        c.submit(AddSystemText("s1", "Be brief."))
        c.submit(AddUserText("u1", "Hi"))
        c.respond("r1", audio=False)
        before = [it.item_id for it in c.state.items]
        c.respond("oob", audio=False, in_conversation=False)
        assert [it.item_id for it in c.state.items] == before
        s = c.state
        assert common_prefix(s.cached, engine.renderer.render(s.items, instructions=s.instructions).prompt) \
            == len(s.cached)
    finally:
        engine.stop()


def test_instructions_change_re_renders_the_first_turn(runtime):
    engine = make_engine(runtime)
    try:
        c = Client(engine)
        c.submit(Configure(instructions="You are terse."))
        c.submit(AddUserText("u1", "Hi"))
        _, _first = c.respond("r1", audio=False)
        c.submit(Configure(instructions="You are verbose."))
        c.submit(AddUserText("u2", "Again"))
        _, second = c.respond("r2", audio=False)
        # the instructions sit in the first user turn: everything from there is prefilled again
        same = len(engine.builder.text("<|im_start|>user\n")) + len("You are ")  # byte tokenizer: 1 patch/byte
        assert second.usage["input_token_details"]["cached_tokens"] == same
    finally:
        engine.stop()


def test_server_busy_when_every_slot_is_taken_and_slots_come_back(runtime):
    engine = make_engine(runtime, max_sessions=2)
    try:
        a, b = Client(engine), Client(engine)
        with pytest.raises(ServerBusy):
            Client(engine)
        a.handle.close()
        for _ in range(200):
            if engine.active_sessions == 1:
                break
            threading.Event().wait(0.01)
        c = Client(engine)
        assert c.handle.slot == a.handle.slot
        b.handle.close()
        c.handle.close()
    finally:
        engine.stop()


def test_invalid_audio_fails_the_item_not_the_engine(runtime):
    engine = make_engine(runtime)
    try:
        c = Client(engine)
        c.submit(AddUserAudio("bad", np.full(4800, np.nan, dtype=np.float32)))
        from agent.engine import EngineError

        _, err = c.until(EngineError)
        assert err.code == "invalid_audio" and err.item_id == "bad"
        c.submit(AddUserText("u1", "still here"))
        _, done = c.respond("r1", audio=False)
        assert done.status in ("completed", "incomplete")
    finally:
        engine.stop()


def test_a_turn_larger_than_the_context_fails_its_response_clearly(runtime):
    from agent.engine import EngineError

    engine = make_engine(runtime, max_positions=64)
    try:
        c = Client(engine)
        c.submit(AddUserText("u1", "x" * 100))
        c.submit(Respond("r1", "a1", ResponseParams(audio=False)))
        _, err = c.until(EngineError)
        assert err.code == "context_length_exceeded" and err.response_id == "r1"
        assert "64" in err.message
        c.submit(DeleteItem("u1"))
        c.submit(AddUserText("u2", "short"))
        _, done = c.respond("r2", audio=False, max_output_patches=4)
        assert done.status in ("completed", "incomplete")
    finally:
        engine.stop()


def test_user_audio_is_transcribed_when_asked(runtime):
    from agent.engine import TranscriptionDelta, TranscriptionDone

    engine = make_engine(runtime)
    try:
        c = Client(engine)
        c.submit(AddUserAudio("u1", speech(1.3), transcribe=True))
        events, done = c.until(TranscriptionDone)
        assert done.item_id == "u1"
        deltas = "".join(e.text for e in events if isinstance(e, TranscriptionDelta))
        assert deltas.strip() == done.transcript and done.transcript
        added = [e for e in events if isinstance(e, ItemAdded)]
        assert len(added) == 1 and added[0].patches == len(engine.renderer.render(c.state.items[:1]).prompt)
        # the pass used its own cache: the session's slot holds nothing yet
        assert engine.cache.length(c.state.slot) == 0
        # the conversation goes on as before
        c.submit(AddUserAudio("u2", speech(0.5)))
        _, response = c.respond("r1", audio=False)
        assert response.status in ("completed", "incomplete")
    finally:
        engine.stop()
