"""Streaming input on the tiny preset: a user turn encoded and prefilled while it is spoken gives the
same context and the same greedy answer as the whole-turn path; the commit prefills only from the
first patch that the exact encode changed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.conversation import common_prefix
from agent.engine import AddUserAudio, AddUserText, AudioDelta, StreamUserAudio, TextDelta
from streaming.audio import pcm16_to_float32, read_wav
from tests.agent.test_engine import Client, make_engine

pytestmark = pytest.mark.timeout(180)

DATA = Path(__file__).resolve().parents[1] / "data"
PART = 2400  # 100 ms, as a client appends


@pytest.fixture(scope="module")
def runtime():
    from agent.runtime import load_runtime

    return load_runtime(preset="tiny", device="cpu")


def recording(name: str) -> np.ndarray:
    return pcm16_to_float32(read_wav(DATA / name)[0])


def same_items_and_cache(sa, sb) -> None:
    """Two sessions hold the same items (codes and patches) and the same cached positions."""
    assert [it.item_id for it in sa.items] == [it.item_id for it in sb.items]
    for a, b in zip(sa.items, sb.items, strict=True):
        assert (a.codes is None) == (b.codes is None) and (a.codes is None or torch.equal(a.codes, b.codes))
        assert (a.patches is None) == (b.patches is None)
        assert a.patches is None or (torch.equal(a.patches.text_ids, b.patches.text_ids)
                                     and torch.equal(a.patches.codes, b.patches.codes))
    assert len(sa.cached) == len(sb.cached) == common_prefix(sa.cached, sb.cached)


def wait_for(check, what: str, timeout: float = 60.0) -> None:
    """Poll the engine's state (a deadline only against a hang, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def stream(c: Client, item_id: str, pcm: np.ndarray) -> None:
    """Send the turn in 100 ms parts, each encoded and prefilled before the next (so every part is a
    streaming encode of a longer prefix, whatever the machine's speed)."""
    for i in range(0, len(pcm), PART):
        c.submit(StreamUserAudio(item_id, pcm[i:i + PART]))

        def settled(end: int = min(len(pcm), i + PART)) -> bool:
            pr = c.state.provisional
            return (pr is not None and pr.samples == end and pr.samples - pr.encoded_samples
                    < c.engine._patch_samples and pr.synced)
        wait_for(settled, f"the streamed turn's part at {i}")


def answer(events: list) -> tuple[str, np.ndarray]:
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    audio = [e.pcm for e in events if isinstance(e, AudioDelta)]
    return text, np.concatenate(audio) if audio else np.zeros(0, np.float32)


def turn(c: Client, rid: str, item_id: str, pcm: np.ndarray, streamed: bool) -> tuple[list, object, int]:
    """One spoken turn and its greedy answer; returns its events, its ResponseDone and how many patches
    streaming had prefilled for the turn."""
    prefilled = 0
    if streamed:
        stream(c, item_id, pcm)
        prefilled = len(c.state.provisional.codes) // c.engine.lm.config.group_size
    c.submit(AddUserAudio(item_id, pcm))
    events, done = c.respond(rid, interleave=(2, 3), max_output_patches=15, min_patches=15)
    return events, done, prefilled


def test_streamed_turns_give_the_whole_turn_context_and_answer(runtime):
    engine = make_engine(runtime, max_sessions=2, stream_lag_patches=2)
    try:
        whole, streamed = Client(engine), Client(engine)
        turns = [("u1", recording("speech_hello_padded.wav")), ("u2", recording("speech_yes.wav"))]
        for c in (whole, streamed):
            c.submit(AddUserText("u0", "Answer briefly."))
        for k, (item_id, pcm) in enumerate(turns):
            rid = f"r{k}"
            w_events, w_done, _ = turn(whole, rid, item_id, pcm, streamed=False)
            s_events, s_done, prefilled = turn(streamed, rid, item_id, pcm, streamed=True)
            # the same greedy answer (its text, and its patches below: tokens and codes) and the same
            # context, position by position (the audio's samples depend on how the codec passes were
            # grouped, which is timing, not context: only its length is compared)
            w_text, w_audio = answer(w_events)
            s_text, s_audio = answer(s_events)
            assert s_text == w_text and s_done.transcript == w_done.transcript
            assert len(s_audio) == len(w_audio) > 0
            ws, ss = whole.state, streamed.state
            same_items_and_cache(ss, ws)
            n = len(ws.cached)
            assert engine.cache.length(ss.slot) == engine.cache.length(ws.slot) == n
            for kv in (engine.cache.k, engine.cache.v):
                torch.testing.assert_close(kv[:, ss.slot, :, :n], kv[:, ws.slot, :, :n])
            # streaming had prefilled the turn's patches; the commit kept those the exact encode agrees
            # with and prefilled the rest (here the random weights change most codes: at least the
            # turn's header survives, never more than what was prefilled)
            assert prefilled >= len(pcm) // engine._patch_samples - engine.config.stream_lag_patches - 1
            start = w_done.usage["input_token_details"]["cached_tokens"]
            cached = s_done.usage["input_token_details"]["cached_tokens"]
            assert start < cached <= start + s_done.usage["input_tokens"] - start
            assert s_done.usage["input_tokens"] == w_done.usage["input_tokens"]
    finally:
        engine.stop()


def test_bench_stream_prints_survival_by_lag(capsys):
    from streaming.cli import main

    assert main(["bench-stream", "--repeats", "1", "--lags", "off", "2", "--audio", str(DATA / "speech_yes.wav")]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["off", "2"] and all(r[1] == "speech_yes.wav" for r in rows)
    off, lag2 = rows
    assert off[3] == "0" and int(lag2[3]) > 0  # patches prefilled while speaking
    assert int(lag2[4]) <= int(lag2[3])  # survivors are among them
