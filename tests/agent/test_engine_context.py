"""A consistent KV cache under every conversation edit (the engine on the tiny preset): a
regenerated answer, edits behind a running response, and context trimming with the response's real
budget and hysteresis."""

from __future__ import annotations

import itertools

import pytest

from agent.conversation import common_prefix
from agent.engine import (
    AddUserText,
    AudioDelta,
    DeleteItem,
    ItemsDropped,
    ItemTruncated,
    Respond,
    ResponseDone,
    ResponseParams,
    Truncate,
)
from tests.agent.test_engine import Client, make_engine
from tests.agent.test_engine_isolation import LONG, finishes_with_its_audio, start_long

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def runtime():
    from agent.runtime import load_runtime

    return load_runtime(preset="tiny", device="cpu")


def consistent(engine, c: Client) -> None:
    """The slot holds a prefix of the conversation as it now reads."""
    s = c.state
    assert engine.cache.length(s.slot) == len(s.cached)
    rendering = engine.renderer.render(s.items, instructions=s.instructions, voice_codes=s.voice_codes)
    assert common_prefix(s.cached, rendering.prompt) == len(s.cached)


def test_regenerate_recomputes_the_last_position_and_spares_the_others(runtime):
    """Deleting an answer and asking again: the whole prompt is cached, so the last position is
    prefilled again for its hidden state (vLLM's rule) and the greedy answer comes out the same."""
    engine = make_engine(runtime)
    try:
        a, b = Client(engine), Client(engine, seed=1)
        a.submit(AddUserText("u1", "What time is it?"))
        _, first = a.respond("r1", audio=False)
        first_patches = a.state.items[-1].patches
        start_long(b)  # another session is mid-answer
        a.submit(DeleteItem("a_r1"))
        _, again = a.respond("r2", audio=False)
        assert again.status in ("completed", "incomplete")
        assert again.timings["prefill_positions"] == 1
        assert again.usage["input_token_details"]["cached_tokens"] == first.usage["input_tokens"] - 1
        assert again.transcript == first.transcript
        assert a.state.items[-1].patches.text_ids.tolist() == first_patches.text_ids.tolist()
        finishes_with_its_audio(b)
        consistent(engine, a)
    finally:
        engine.stop()


def _lengths_seen(engine) -> dict[int, list[int]]:
    """Record each slot's cache length at every decode step."""
    seen: dict[int, list[int]] = {}
    real = engine.decode_step

    def decode_step(cache, slots, emb):
        for slot in list(slots):
            seen.setdefault(int(slot), []).append(cache.length(int(slot)))
        return real(cache, slots, emb)

    engine.decode_step = decode_step
    return seen


def _two_turns(c: Client) -> None:
    c.submit(AddUserText("u1", "Tell me a story"))
    c.respond("r1", interleave=(1, 4), max_output_patches=20, min_patches=20)
    c.submit(AddUserText("u2", "And another one"))
    c.submit(Respond("r2", "a_r2", ResponseParams(**LONG)))


def test_edits_behind_a_running_response_leave_its_positions_alone(runtime):
    """Truncating and deleting earlier items while a response runs: the response keeps generating
    on the context it started with (the rollback waits for the next response)."""
    reference = make_engine(runtime)
    try:
        ref = Client(reference)
        _two_turns(ref)
        ref.until(ResponseDone)
        expected = ref.state.items[-1].patches
    finally:
        reference.stop()

    engine = make_engine(runtime)
    try:
        seen = _lengths_seen(engine)
        c = Client(engine)
        _two_turns(c)
        events, _ = c.until(AudioDelta)
        c.submit(Truncate("a_r1", audio_end_ms=0))
        c.submit(DeleteItem("u1"))
        more, done = c.until(ResponseDone)
        events += more
        order = [type(e) for e in events]
        assert order.index(ItemTruncated) < order.index(ResponseDone)  # the edits came while it ran
        assert done.status in ("completed", "incomplete")
        # every step of r2 wrote the next position: nothing rolled back underneath it
        lengths = seen[c.handle.slot][-(done.usage["output_tokens"] - 1):]
        assert lengths == list(range(lengths[0], lengths[0] + len(lengths)))
        patches = c.state.items[-1].patches
        assert patches.text_ids.tolist() == expected.text_ids.tolist()
        assert patches.codes.tolist() == expected.codes.tolist()
        # the next response rolls back to the edited conversation
        c.submit(AddUserText("u3", "Thanks"))
        _, after = c.respond("r3", audio=False)
        assert after.status in ("completed", "incomplete")
        assert after.usage["input_token_details"]["cached_tokens"] < 20  # u1 went: little is left in common
        consistent(engine, c)
    finally:
        engine.stop()


def test_an_answer_gets_the_budget_it_asked_for_in_a_full_context(runtime):
    """300 patches asked in a context that has room for fewer: old turns make room for all 300."""
    engine = make_engine(runtime, max_positions=1024)
    try:
        c = Client(engine)
        for turn in range(4):
            c.submit(AddUserText(f"u{turn}", f"turn {turn}: " + "tell me more about the sea and the ships " * 4))
            c.respond(f"r{turn}", audio=False, max_output_patches=40, min_patches=40)
        c.submit(AddUserText("u4", "Now a long answer please"))
        events, done = c.respond("r4", audio=False, max_output_patches=300, min_patches=300)
        assert [e for e in events if isinstance(e, ItemsDropped)]
        assert done.usage["output_tokens"] == 300 and done.reason == "max_output_tokens"
        consistent(engine, c)
    finally:
        engine.stop()


def test_a_full_context_is_trimmed_rarely_and_turns_prefill_only_what_is_new(runtime):
    """Hysteresis: a trim frees room for several turns, so a long conversation does not re-prefill
    its whole context at every turn."""
    engine = make_engine(runtime, max_positions=512)
    try:
        c = Client(engine)
        trims, prefilled = [], []
        for turn in range(16):
            c.submit(AddUserText(f"u{turn}", f"turn {turn:02d}: what about the weather tomorrow?"))
            events, done = c.respond(f"r{turn}", audio=False, max_output_patches=24, min_patches=24)
            assert done.status in ("completed", "incomplete") and done.usage["output_tokens"] == 24
            trims.append(any(isinstance(e, ItemsDropped) for e in events))
            prefilled.append(done.timings["prefill_positions"])
        assert sum(trims) >= 2
        assert not any(a and b for a, b in itertools.pairwise(trims))  # never two trims in a row
        new_turn = prefilled[1]  # a turn that trims nothing prefills the new turn alone
        assert all(p == new_turn for p, trimmed in zip(prefilled[1:], trims[1:], strict=True) if not trimmed)
        assert sum(prefilled) < 16 * new_turn + sum(trims) * 400
        consistent(engine, c)
    finally:
        engine.stop()
