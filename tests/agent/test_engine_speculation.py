"""Speculative answers on the tiny preset: an answer started at a candidate end of turn and held; its
release at the commit gives what answering the turn up to that point gives, an abandoned one leaves
no event and no trace in the conversation or the slot, and the waste is bounded."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from agent.conversation import common_prefix
from agent.engine import (
    Abandon,
    AddUserAudio,
    AddUserText,
    AudioDelta,
    ItemAdded,
    Respond,
    ResponseDone,
    ResponseParams,
    ResponseStarted,
    Speculate,
    StreamUserAudio,
    TextDelta,
)
from tests.agent.test_engine import GREEDY_BOTH, Client, make_engine
from tests.agent.test_engine_streaming import recording, same_items_and_cache, wait_for

pytestmark = pytest.mark.timeout(180)

PARAMS = ResponseParams(sampling=GREEDY_BOTH, interleave=(2, 3), max_output_patches=15, min_patches=15)
HELLO = recording("speech_hello_padded.wav")  # speech 0.6 .. 2.87 s, then 1 s of silence
CANDIDATE = int(3.07 * 24000)  # 200 ms into the silence


@pytest.fixture(scope="module")
def runtime():
    from agent.runtime import load_runtime

    return load_runtime(preset="tiny", device="cpu")


def quiet(c: Client) -> list:
    """What the session received so far (without waiting)."""
    seen = []
    while True:
        try:
            seen.append(c.events.get_nowait())
        except queue.Empty:
            return seen


def speculate(c: Client, item_id: str, pcm: np.ndarray, samples: int, patches: int) -> None:
    """Stream the turn, speculate at ``samples``, and wait until the held answer has ``patches``."""
    for i in range(0, len(pcm), 2400):
        c.submit(StreamUserAudio(item_id, pcm[i:i + 2400]))
    c.submit(Speculate(item_id, samples, PARAMS))

    def generated() -> bool:
        state = c.engine._sessions.get(c.handle.sid)
        spec = state.speculation if state is not None else None
        return spec is not None and len(spec.answer.patches) >= patches
    wait_for(generated, "the held answer")


def shape(events: list) -> list[str]:
    """The kinds of events in order, a run of deltas of one kind counted once."""
    kinds = []
    for e in events:
        kind = type(e).__name__
        if not kinds or kinds[-1] != kind or kind not in ("TextDelta", "AudioDelta"):
            kinds.append(kind)
    return kinds


def same_context(engine, a: Client, b: Client) -> None:
    sa, sb = a.state, b.state
    same_items_and_cache(sa, sb)
    rendering = engine.renderer.render(sa.items, instructions=sa.instructions, voice_codes=sa.voice_codes)
    assert common_prefix(sa.cached, rendering.prompt) == len(sa.cached) == engine.cache.length(sa.slot)


@pytest.mark.parametrize("lag", [None, 2], ids=["whole", "streamed"])
def test_a_released_speculation_is_the_answer_to_the_turn_up_to_its_candidate_end(runtime, lag):
    """(With streaming input too: the speculation's exact encode keeps what streaming prefilled up to
    the first patch that differs.)"""
    engine = make_engine(runtime, max_sessions=2, speculate_max_patches=6, speculate_hold_s=10.0,
                         stream_lag_patches=lag)
    try:
        spec_c, ref = Client(engine), Client(engine)
        for c in (spec_c, ref):
            c.submit(AddUserText("u0", "Answer briefly."))
        speculate(spec_c, "u1", HELLO, CANDIDATE, patches=6)
        wait_for(lambda: engine._paused(spec_c.state), "the held answer to reach its cap")
        assert len(spec_c.state.speculation.answer.patches) == 6  # held at the cap
        assert [type(e) for e in quiet(spec_c)] == [ItemAdded]  # u0's; nothing of the speculation
        # the commit (the whole turn, silence window included) and the response the session asks for
        spec_c.submit(AddUserAudio("u1", HELLO))
        s_events, s_done = spec_c.respond("r1", **vars(PARAMS))
        # the reference answers the turn as it was at the candidate end, without speculation
        quiet(ref)
        ref.submit(AddUserAudio("u1", HELLO[:CANDIDATE]))
        r_events, r_done = ref.respond("r1", **vars(PARAMS))
        assert shape(s_events) == shape(r_events) and shape(s_events)[:2] == ["ItemAdded", "ResponseStarted"]
        assert all(e.response_id == "r1" and e.item_id == "a_r1" for e in s_events
                   if isinstance(e, ResponseStarted | TextDelta | AudioDelta | ResponseDone))
        assert s_done.transcript == r_done.transcript and s_done.status == r_done.status == "incomplete"
        assert s_done.usage == r_done.usage
        assert s_done.timings["speculated_patches"] == 6 and "speculated_patches" not in r_done.timings
        audio = [sum(len(e.pcm) for e in events if isinstance(e, AudioDelta)) for events in (s_events, r_events)]
        assert audio[0] == audio[1] > 0
        same_context(engine, spec_c, ref)
        assert engine.speculations["started"] == engine.speculations["confirmed"] == 1
        assert engine.speculations["abandoned"] == engine.speculations["wasted_patches"] == 0
    finally:
        engine.stop()


def test_an_abandoned_speculation_sends_nothing_and_leaves_no_trace(runtime):
    engine = make_engine(runtime, max_sessions=2)
    try:
        spec_c, ref = Client(engine), Client(engine)
        for c in (spec_c, ref):
            c.submit(AddUserText("u0", "Hello"))
            c.respond("r0", **vars(PARAMS))
        quiet(spec_c)
        items, cached = [it.item_id for it in spec_c.state.items], len(spec_c.state.cached)
        speculate(spec_c, "u1", HELLO[:CANDIDATE], CANDIDATE, patches=3)
        spec_c.submit(Abandon("u1"))  # the user spoke again
        wait_for(lambda: engine.speculations["abandoned"] == 1, "the abandon")  # counted once it is done
        assert quiet(spec_c) == []
        s = spec_c.state
        assert [it.item_id for it in s.items] == items and s.response is None
        rendering = engine.renderer.render(s.items, instructions=s.instructions, voice_codes=s.voice_codes)
        # the slot holds a prefix of the conversation without the turn (the closing of the last answer
        # may have been prefilled with the speculation: it is the conversation's)
        assert common_prefix(s.cached, rendering.prompt) == len(s.cached) == engine.cache.length(s.slot)
        assert cached <= len(s.cached) <= len(rendering)
        assert engine.speculations["abandoned"] == 1 and engine.speculations["wasted_patches"] >= 3
        # the turn goes on and ends later: its answer is the whole-turn answer, as if nothing happened
        for i in range(CANDIDATE, len(HELLO), 2400):
            spec_c.submit(StreamUserAudio("u1", HELLO[i:i + 2400]))
        spec_c.submit(AddUserAudio("u1", HELLO))
        s_events, s_done = spec_c.respond("r1", **vars(PARAMS))
        ref.submit(AddUserAudio("u1", HELLO))
        r_events, r_done = ref.respond("r1", **vars(PARAMS))
        assert shape(s_events) == shape(r_events) and s_done.transcript == r_done.transcript
        assert "speculated_patches" not in s_done.timings
        same_context(engine, spec_c, ref)
    finally:
        engine.stop()


def test_other_jobs_abandon_a_speculation_and_its_attempts_are_capped(runtime):
    engine = make_engine(runtime, speculate_attempts=2)
    try:
        c = Client(engine)
        speculate(c, "u1", HELLO[:CANDIDATE], CANDIDATE, patches=1)
        c.submit(AddUserText("t", "a text item arrives meanwhile"))  # the conversation changes under it
        _, added = c.until(ItemAdded)
        assert added.item_id == "t" and c.state.speculation is None
        assert [it.item_id for it in c.state.items] == ["t"]
        speculate(c, "u1", HELLO[:CANDIDATE], CANDIDATE, patches=1)  # the second attempt on this turn
        c.submit(Respond("rx", "ax", PARAMS))  # a response before the turn's commit: not the speculated one
        _, done = c.until(ResponseDone)
        assert done.response_id == "rx" and "speculated_patches" not in done.timings
        c.submit(Speculate("u1", CANDIDATE, PARAMS))  # a third attempt: refused
        c.submit(AddUserText("t2", "sync"))
        c.until(ItemAdded)
        assert c.state.speculation is None
        assert engine.speculations == {"started": 2, "confirmed": 0, "abandoned": 2, "refused": 1, "skipped": 0,
                                       "wasted_patches": engine.speculations["wasted_patches"]}
    finally:
        engine.stop()


def test_a_committed_turn_whose_response_differs_is_encoded_whole(runtime):
    """The commit came, but the response asked for is not the one speculated (other settings): the
    speculation goes and the turn is the whole committed audio, as without speculation."""
    engine = make_engine(runtime, max_sessions=2)
    try:
        spec_c, ref = Client(engine), Client(engine)
        speculate(spec_c, "u1", HELLO, CANDIDATE, patches=2)
        spec_c.submit(AddUserAudio("u1", HELLO))
        other = dict(vars(PARAMS), max_output_patches=14, min_patches=14)
        s_events, s_done = spec_c.respond("r1", **other)
        ref.submit(AddUserAudio("u1", HELLO))
        r_events, r_done = ref.respond("r1", **other)
        assert shape(s_events) == shape(r_events) and s_done.transcript == r_done.transcript
        assert "speculated_patches" not in s_done.timings
        same_context(engine, spec_c, ref)
        assert engine.speculations["abandoned"] == 1 and engine.speculations["confirmed"] == 0
    finally:
        engine.stop()


def test_no_speculation_without_a_spare_decode_row(runtime):
    from tests.agent.test_engine_isolation import finishes_with_its_audio, start_long

    engine = make_engine(runtime, max_batch=1)
    try:
        busy, c = Client(engine, seed=1), Client(engine)
        start_long(busy)  # takes the only row of the decode step
        for i in range(0, CANDIDATE, 2400):
            c.submit(StreamUserAudio("u1", HELLO[i:i + 2400]))
        c.submit(Speculate("u1", CANDIDATE, PARAMS))
        c.submit(AddUserText("t", "sync"))
        c.until(ItemAdded)
        assert engine.speculations["refused"] == 1 and engine.speculations["started"] == 0
        finishes_with_its_audio(busy)
    finally:
        engine.stop()



def held(c: Client):
    state = c.engine._sessions.get(c.handle.sid)
    return state.speculation if state is not None else None


def some_ticks(engine) -> None:
    ticks = engine.ticks
    wait_for(lambda: engine.ticks > ticks + 20, "some ticks")


def answers_the_whole_turn(c: Client, ref: Client) -> None:
    """Commit and answer the turn: the whole-turn answer, as without speculation (exactness)."""
    for x in (c, ref):
        x.submit(AddUserAudio("u1", HELLO))
    s_events, s_done = c.respond("r1", **vars(PARAMS))
    r_events, r_done = ref.respond("r1", **vars(PARAMS))
    assert shape(s_events) == shape(r_events) and s_done.transcript == r_done.transcript
    assert [s_done.usage[k] == r_done.usage[k] for k in ("input_tokens", "output_tokens")] == [True, True]
    assert "speculated_patches" not in s_done.timings
    same_context(c.engine, c, ref)


def test_a_speculation_starts_only_just_before_the_turn_may_end(runtime):
    """``end_in_s``: the turn cannot end before the rest of its silence window. Nothing is done for
    the held answer until shortly before (a pause the user ends sooner costs no encode, no prefill,
    no patch); a commit that comes first is answered as without speculation."""
    engine = make_engine(runtime, max_sessions=2)
    try:
        c, ref = Client(engine), Client(engine)
        for i in range(0, len(HELLO), 2400):
            c.submit(StreamUserAudio("u1", HELLO[i:i + 2400]))
        c.submit(Speculate("u1", CANDIDATE, PARAMS, end_in_s=3600.0))
        some_ticks(engine)
        assert held(c) is None and c.state.response is None and engine.speculations["started"] == 0
        assert len(c.state.cached) == 0  # nothing prefilled
        c.submit(Abandon("u1"))  # the user spoke again
        c.submit(Speculate("u1", CANDIDATE, PARAMS, end_in_s=3600.0))  # the next pause
        answers_the_whole_turn(c, ref)
        assert engine.speculations["skipped"] == 2 and engine.speculations["started"] == 0
        assert engine.speculations["wasted_patches"] == 0
    finally:
        engine.stop()


def test_a_turn_that_may_end_early_is_prefilled_at_once_and_its_patches_wait(runtime):
    """``ends_early`` (semantic_vad: a confident score ends the turn before its window): the held
    answer's prefill runs at once, its patches wait; the release is the answer to the turn up to the
    candidate end, generated from there."""
    engine = make_engine(runtime, max_sessions=2)
    try:
        c, ref = Client(engine), Client(engine)
        for i in range(0, len(HELLO), 2400):
            c.submit(StreamUserAudio("u1", HELLO[i:i + 2400]))
        c.submit(Speculate("u1", CANDIDATE, PARAMS, end_in_s=3600.0, ends_early=True))
        # (read on the engine's thread's back: the speculation is set a moment before its response)
        wait_for(lambda: held(c) is not None and getattr(c.state.response, "phase", None) == "generate",
                 "the prefill")
        some_ticks(engine)
        assert len(held(c).answer.patches) == 0 and engine._paused(c.state)
        c.submit(AddUserAudio("u1", HELLO))
        s_events, s_done = c.respond("r1", **vars(PARAMS))
        ref.submit(AddUserAudio("u1", HELLO[:CANDIDATE]))
        r_events, r_done = ref.respond("r1", **vars(PARAMS))
        assert shape(s_events) == shape(r_events) and s_done.transcript == r_done.transcript
        assert s_done.timings["speculated_patches"] == 0 and engine.speculations["confirmed"] == 1
    finally:
        engine.stop()


def test_a_held_answer_starts_ahead_of_the_earliest_end_by_the_time_it_takes(runtime):
    """With the turn's earliest end closer than a held answer takes (``speculate_lead_s`` before one
    was timed), it starts at once."""
    engine = make_engine(runtime, speculate_max_patches=6, speculate_hold_s=10.0, speculate_lead_s=0.5)
    try:
        c = Client(engine)
        for i in range(0, CANDIDATE, 2400):
            c.submit(StreamUserAudio("u1", HELLO[i:i + 2400]))
        c.submit(Speculate("u1", CANDIDATE, PARAMS, end_in_s=0.4))
        wait_for(lambda: held(c) is not None and len(held(c).answer.patches) >= 1, "the held answer")
        wait_for(lambda: engine._first_audio_s is not None, "its timing")  # what the next one's start allows for
        assert engine._lead_time_s() >= 0.5
    finally:
        engine.stop()


def test_a_release_before_the_hold_makes_the_next_speculations_start_earlier(runtime):
    """The lead adapts to the machine: a held answer released before its first audio, or a turn committed
    before its speculation was due, started too late."""
    engine = make_engine(runtime, speculate_hold_s=10.0, speculate_lead_s=0.05)
    try:
        c = Client(engine)
        speculate_at(c, "u1", end_in_s=0.0)
        wait_for(lambda: held(c) is not None and len(held(c).answer.patches) >= 1, "the held answer")
        c.submit(AddUserAudio("u1", HELLO[:CANDIDATE]))
        c.respond("r1", **vars(PARAMS))
        first = engine._first_audio_s
        assert first is not None and first > 0  # its time so far
        speculate_at(c, "u2", end_in_s=3600.0)  # not due for an hour
        c.submit(AddUserAudio("u2", HELLO[:CANDIDATE]))  # but it ended now
        c.respond("r2", **vars(PARAMS))
        assert engine.speculations["skipped"] == 1 and engine._lead_time_s() >= 1.5 * first
    finally:
        engine.stop()


def speculate_at(c: Client, item_id: str, end_in_s: float) -> None:
    for i in range(0, CANDIDATE, 2400):
        c.submit(StreamUserAudio(item_id, HELLO[i:i + 2400]))
    c.submit(Speculate(item_id, CANDIDATE, PARAMS, end_in_s=end_in_s))


def test_abandoned_prefills_count_against_the_waste_budget(runtime):
    """semantic_vad's held answers are prefilled at each pause: each abandoned one costs its encode and
    prefill (``speculate_prime_patches``) even without a patch; beyond the budget, no early prefill."""
    engine = make_engine(runtime, speculate_waste_ratio=0.5, speculate_max_patches=8, speculate_prime_patches=2.0)
    try:
        c = Client(engine)  # no answer yet: the budget is 0.5 x 8 patches = 4, two abandoned prefills
        for i in range(0, len(HELLO), 2400):
            c.submit(StreamUserAudio("u1", HELLO[i:i + 2400]))
        for attempt in (1, 2, 3):
            c.submit(Speculate("u1", CANDIDATE, PARAMS, end_in_s=3600.0, ends_early=True))
            some_ticks(engine)
            if attempt < 3:
                assert held(c) is not None and len(held(c).answer.patches) == 0  # prefilled, waiting
                c.submit(Abandon("u1"))
        assert held(c) is None and engine.speculations["started"] == 2  # the third waits, unprefilled
        assert engine.speculations["abandoned"] == 2 and engine.speculations["wasted_patches"] == 0
    finally:
        engine.stop()


def test_a_turn_over_its_waste_budget_is_not_speculated_again(runtime):
    """Held answers abandoned on one turn may waste ``speculate_waste_ratio`` x the session's last
    answer (in patches); beyond it the turn is speculated only at the last moment (a held answer's
    time to its first audio before its earliest end; semantic_vad's not prefilled early either), or
    not at all without one,
    and a new turn has the whole budget."""
    engine = make_engine(runtime, max_sessions=2, speculate_max_patches=6, speculate_hold_s=10.0,
                         speculate_waste_ratio=0.5, speculate_prime_patches=0.0)
    try:
        c, ref = Client(engine), Client(engine)
        for x in (c, ref):
            x.submit(AddUserText("u0", "Answer briefly."))
            x.respond("r0", **dict(vars(PARAMS), max_output_patches=8, min_patches=8))  # budget: 4 patches
        quiet(c), quiet(ref)
        speculate(c, "u1", HELLO, CANDIDATE, patches=6)
        c.submit(Abandon("u1"))
        wait_for(lambda: engine.speculations["abandoned"] == 1, "the abandon")
        assert engine.speculations["wasted_patches"] == 6
        c.submit(Speculate("u1", CANDIDATE, PARAMS))  # over the budget, and no time to wait: refused
        c.submit(Speculate("u1", CANDIDATE, PARAMS, end_in_s=3600.0, ends_early=True))  # waits
        some_ticks(engine)
        assert held(c) is None and c.state.response is None
        answers_the_whole_turn(c, ref)
        assert engine.speculations["refused"] == 1 and engine.speculations["started"] == 1
        assert engine.speculations["skipped"] == 1
        for i in range(0, CANDIDATE, 2400):  # the next turn
            c.submit(StreamUserAudio("u2", HELLO[i:i + 2400]))
        c.submit(Speculate("u2", CANDIDATE, PARAMS))
        wait_for(lambda: held(c) is not None and len(held(c).answer.patches) >= 1, "a held answer")
    finally:
        engine.stop()
