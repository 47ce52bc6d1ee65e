"""Generation controls and the streaming session API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.lm.generation import (
    ControlState,
    GenerationControls,
    Mode,
    PatchKind,
    mask_text_logits,
    parse_interleave,
    task_stop_ids,
)
from agent.lm.prompts import Prompt, PromptBuilder
from agent.lm.sampling import ChannelSampling, SamplingParams
from agent.lm.session import LMSession, Patch, ResponseCollector

from .conftest import mixed_prompt

NEG = float("-inf")
EOT, EMPTY, STOP = 7, 3, 9


def _state(**kw) -> ControlState:
    return ControlState(GenerationControls(**kw), eot_id=EOT)


def test_interleave_schedule_and_eot() -> None:
    state = _state(mode=Mode.INTERLEAVE, text_patches=2, speech_patches=3)
    kinds = []
    for _ in range(10):
        kinds.append(state.kind())
        state.advance(1)
    T, S = PatchKind.TEXT, PatchKind.SPEECH
    assert kinds == [T, T, S, S, S, T, T, S, S, S]
    state = _state(mode=Mode.INTERLEAVE, text_patches=5, speech_patches=5)
    state.advance(1)
    state.advance(EOT)  # text complete after 2 text patches: speech only from now on
    assert [state.kind() for _ in range(1)] == [S]
    for _ in range(12):
        state.advance(EMPTY)
        assert state.kind() is S
    assert parse_interleave("5:5") == (5, 5)
    with pytest.raises(ValueError, match="N:M"):
        parse_interleave("5-5")
    with pytest.raises(ValueError, match="N >= 1"):
        parse_interleave("0:3")


def test_stop_budget_and_min_length() -> None:
    state = _state(stop_ids=(STOP,), max_patches=3)
    assert not state.advance(1) and not state.advance(2)
    assert state.advance(4) and state.stop_reason == "max_patches"
    with pytest.raises(RuntimeError, match="already finished"):
        state.advance(1)
    state = _state(stop_ids=(STOP,), min_patches=2)
    assert state.stops_banned()
    state.advance(1)
    state.advance(1)
    assert not state.stops_banned()
    assert state.advance(STOP) and state.stop_reason == "stop_token"


def test_mask_text_logits_per_row() -> None:
    V = 12
    states = [
        _state(),  # free
        _state(mode=Mode.TEXT, stop_ids=(STOP,)),
        _state(mode=Mode.AUDIO, stop_ids=(STOP, 10)),
        _state(stop_ids=(STOP,), min_patches=1),  # free, but stops banned for now
    ]
    logits = torch.zeros(4, V)
    out = mask_text_logits(logits, states, EMPTY)
    allowed = (out > NEG).tolist()
    assert allowed[0] == [True] * V
    assert allowed[1] == [i != EMPTY for i in range(V)]
    assert allowed[2] == [i in (EMPTY, STOP, 10) for i in range(V)]
    assert allowed[3] == [i != STOP for i in range(V)]
    assert torch.equal(mask_text_logits(logits[:1], states[:1], EMPTY), logits[:1])  # free: untouched
    with pytest.raises(ValueError, match="2 control states for 4 rows"):
        mask_text_logits(logits, states[:2], EMPTY)


def test_task_stops(tiny) -> None:
    _, _, tok = tiny
    s = tok.specials
    assert task_stop_ids("spoken_dialogue", s) == tuple(sorted({s.eos, s.eostm, s.im_end}))
    assert task_stop_ids("asr", s) == tuple(sorted({s.eos, s.im_end}))
    with pytest.raises(ValueError, match="unknown task"):
        task_stop_ids("sing", s)


# ------------------------------------------------------------------------------ the session
def _session(tiny, seed: int = 0) -> LMSession:
    lm, _, tok = tiny
    return LMSession.create(lm, tok, max_positions=256, seed=seed)


def _prompt(tiny, seed: int = 0):
    _, config, tok = tiny
    return mixed_prompt(PromptBuilder(tok, config), seed=seed, speech_patches=3)


def test_modes_shape_the_stream(tiny) -> None:
    for controls, want in [
        (GenerationControls.interleave("2:3", max_patches=10), [False, False, True, True, True] * 2),
        (GenerationControls(mode="audio", max_patches=4), [True] * 4),
        (GenerationControls(mode="text", max_patches=4), [False] * 4),
    ]:
        session = _session(tiny)
        session.feed(_prompt(tiny))
        patches = list(session.generate(controls, ChannelSampling(SamplingParams(), SamplingParams())))
        assert [p.is_speech for p in patches] == want, controls.mode
        assert all(p.codes.shape == (4, 8) for p in patches)
        assert [p.index for p in patches] == list(range(len(want)))


def test_stop_token_ends_the_response_after_min_length(tiny) -> None:
    session = _session(tiny)
    session.feed(_prompt(tiny))
    first = next(iter(session.generate(GenerationControls(mode="text", max_patches=5))))
    for min_patches, want_len in [(0, 1), (3, None)]:
        session = _session(tiny)
        session.feed(_prompt(tiny))
        controls = GenerationControls(
            mode="text", stop_ids=(first.text_id,), max_patches=5, min_patches=min_patches
        )
        patches = list(session.generate(controls))
        if want_len == 1:
            assert len(patches) == 1 and patches[0].stop
        else:  # banned before min_patches
            assert len(patches) > 3 and all(p.text_id != first.text_id for p in patches[:3])


def test_sampling_is_seeded_per_session(tiny) -> None:
    sampling = ChannelSampling(SamplingParams(temperature=1.0), SamplingParams(temperature=1.0))
    controls = GenerationControls.interleave("1:2", max_patches=6)

    def run(seed):
        session = _session(tiny, seed=seed)
        session.feed(_prompt(tiny))
        return [(p.text_id, p.codes.tolist()) for p in session.generate(controls, sampling)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_cancel_between_patches(tiny) -> None:
    session = _session(tiny)
    session.feed(_prompt(tiny))
    got = []
    for patch in session.generate(GenerationControls(max_patches=50)):
        got.append(patch)
        if len(got) == 2:
            session.cancel()
    assert len(got) == 2
    # the cancelled response's last patch is kept (not fed) and the next turn continues after it
    length = session.length
    session.feed(_prompt(tiny, seed=1))
    assert session.length == length + len(_prompt(tiny, seed=1))
    assert len(list(session.generate(GenerationControls(max_patches=2)))) == 2


def test_second_turn_continues_the_cached_history(tiny, monkeypatch) -> None:
    """Turn 2 prefills only its new positions and generates what a fresh run over the whole
    conversation generates."""
    lm = tiny[0]
    controls = GenerationControls.interleave("2:2", max_patches=5)
    first, second = _prompt(tiny, 0), _prompt(tiny, 1)
    session = _session(tiny)
    session.feed(first)
    turn1 = list(session.generate(controls))
    prefilled = []
    real_prefill = lm.prefill

    def counting_prefill(cache, slot, emb):
        prefilled.append(emb.shape[1])
        return real_prefill(cache, slot, emb)

    monkeypatch.setattr(lm, "prefill", counting_prefill)
    session.feed(second)
    turn2 = list(session.generate(controls))
    assert prefilled == [1 + len(second)]  # the pending last patch of turn 1 plus the new prompt
    monkeypatch.undo()

    fresh = _session(tiny)
    conversation = first
    for p in turn1:
        conversation = conversation + Prompt(torch.tensor([p.text_id]), p.codes.unsqueeze(0))
    fresh.feed(conversation + second)
    again = list(fresh.generate(controls))
    assert [(p.text_id, p.codes.tolist()) for p in again] == [(p.text_id, p.codes.tolist()) for p in turn2]


def test_rollback_then_regenerate(tiny) -> None:
    controls = GenerationControls.interleave("2:2", max_patches=4)
    session = _session(tiny)
    session.feed(_prompt(tiny))
    before = session.length
    original = [(p.text_id, p.codes.tolist()) for p in session.generate(controls)]
    session.feed(_prompt(tiny, 5))
    list(session.generate(controls))
    session.rollback(before - 1)  # drop the last prompt patch too, then give it back
    session.feed(_prompt(tiny)[-1:])
    assert [(p.text_id, p.codes.tolist()) for p in session.generate(controls)] == original
    with pytest.raises(ValueError, match="cannot roll back"):
        session.rollback(10_000)
    with pytest.raises(ValueError, match="feed a prompt first"):
        _session(tiny).generate(controls).__next__()


def test_response_collector_parses_like_the_official_output(tiny) -> None:
    _, config, tok = tiny
    s = tok.specials
    empty = torch.tensor(config.speech_empty_ids).expand(4, -1)

    def patch(i, text_id, codes=None, stop=False):
        is_speech = codes is not None
        return Patch(i, text_id, empty if codes is None else codes, is_speech, stop)

    speech = [torch.full((4, 8), v) for v in (1, 2, 3)]
    hi = tok.encode("hé")  # 'é' spans two byte tokens
    stream = [
        patch(0, hi[0]),
        patch(1, s.empty, speech[0]),  # before <|sostm|>: not part of the audio
        patch(2, s.sostm),
        patch(3, hi[1]),
        patch(4, s.empty, speech[1]),
        patch(5, hi[2]),
        patch(6, s.eot),
        patch(7, s.empty, speech[2]),
        patch(8, s.eostm, stop=True),
    ]
    collector = ResponseCollector(tok)
    deltas = [collector.add(p) for p in stream] + [collector.finish()]
    assert "".join(deltas) == collector.text == "hé"  # special tokens are not text
    assert deltas[5] == "é" and deltas[3] == ""  # the character comes out whole
    assert np.array_equal(collector.codes(), torch.cat(speech[1:]).numpy())
    assert collector.patches == 9 and collector.speech_patches == 3
    assert ResponseCollector(tok).codes().shape == (0, 8)
