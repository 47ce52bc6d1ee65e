"""Incremental encoding: exact with unbounded context, approximate (and bounded) otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.codec import load_wav
from agent.codec.incremental import IncrementalEncodeConfig, IncrementalEncoder, incremental_encode

from .conftest import DATA


@pytest.fixture(scope="module")
def speech():
    return load_wav(DATA / "speech_en.wav")


def test_unbounded_context_and_lookahead_equal_the_exact_encode(tiny, speech):
    exact = tiny.encode(speech)
    config = IncrementalEncodeConfig(left_context_tokens=None, lookahead_tokens=10**6)
    assert torch.equal(incremental_encode(tiny, speech, config), exact)


@pytest.mark.parametrize("feed", [960, 1000, 3840, 7777])
def test_bounded_context_gives_the_exact_shape_and_mostly_the_same_codes(tiny, speech, feed):
    exact = tiny.encode(speech)
    codes = incremental_encode(tiny, speech, IncrementalEncodeConfig(), feed_samples=feed)
    assert codes.shape == exact.shape
    same = (codes == exact).float().mean(0)
    assert same[0] > 0.5  # the first codebook mostly agrees even with random weights
    assert same.mean() < 1.0  # and it is an approximation: if it ever is exact, this test is vacuous


def test_codes_come_out_per_chunk_as_audio_arrives(tiny, speech):
    config = IncrementalEncodeConfig(chunk_tokens=4, left_context_tokens=25, lookahead_tokens=2)
    enc = IncrementalEncoder(tiny, config)
    assert enc.push(speech[:960 * 5]).shape == (0, 8)  # 5 tokens: 4 + 2 of look-ahead not there yet
    assert enc.push(speech[960 * 5 : 960 * 6]).shape == (4, 8)
    assert enc.push(speech[960 * 6 : 960 * 15]).shape == (8, 8)  # 15 - 2 = 13 ready: 12, in chunks of 4
    rest = enc.finish()
    assert (12 + rest.shape[0]) % 4 == 0
    # audio older than the left context (and half a window) is dropped
    assert enc._audio.shape[0] <= (25 + 4) * 960 + 480 + speech.shape[0] - 15 * 960


def test_finish_pads_by_repeating_the_last_frame_and_empty_turns(tiny, speech):
    enc = IncrementalEncoder(tiny)
    codes = torch.cat([enc.push(speech[:4321]), enc.finish()])
    raw = tiny.encode(speech[:4321], pad_to_group=False)
    assert codes.shape[0] == 8 and raw.shape[0] == 5
    assert (codes[5:] == codes[4]).all()
    assert IncrementalEncoder(tiny).finish().shape == (0, 8)
    with pytest.raises(RuntimeError, match="finished"):
        enc.push(np.zeros(10, np.float32))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="chunk_tokens"):
        IncrementalEncodeConfig(chunk_tokens=0)
    with pytest.raises(ValueError, match="must not be negative"):
        IncrementalEncodeConfig(lookahead_tokens=-1)
