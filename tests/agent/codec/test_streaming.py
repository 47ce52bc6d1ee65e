"""Streaming decode: exactness where it is possible, measured tolerance where it is not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from agent.codec import load_wav
from agent.codec.mel import log_mel_distance, snr_db
from agent.codec.streaming import DecodeSchedule, crossfade, emit, norm_statistics, stream_decode
from agent.codec.streaming import _Segment as Segment

from .conftest import DATA

#: Distance of the default schedule (either design) to the offline decode, tiny preset, the tests'
#: speech (BENCHMARKS.md, "Audio tokenizer"). Measured: cached log-mel L1 0.0057, SNR 35.7 dB;
#: window 0.0056, 35.5 dB. The bounds leave a margin for other BLAS builds.
DEFAULT_MAX_LOG_MEL_L1 = 0.01
DEFAULT_MIN_SNR_DB = 30.0


@pytest.fixture(scope="module")
def codes(tiny):
    return tiny.encode(load_wav(DATA / "speech_en.wav"))


@pytest.fixture(scope="module")
def offline(tiny, codes):
    return tiny.decode(codes)


@pytest.mark.parametrize("feed", [1, 2, 3, 4, 7])
def test_infinite_schedule_equals_offline_decode(tiny, codes, offline, feed):
    out, sizes = stream_decode(tiny, codes, DecodeSchedule.infinite(), feed)
    assert sum(sizes[:-1]) == 0  # everything is held back to the end
    np.testing.assert_array_equal(out, offline)


def test_infinite_schedule_equals_offline_across_60s_segments(tiny):
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, n, (1507,), generator=g) for n in tiny.config.codebook_size[:8]], 1)
    out, sizes = stream_decode(tiny, codes, DecodeSchedule.infinite(), 500)
    # the first 1500-token segment completes while feeding and comes out then
    assert sizes[:4] == [0, 0, 1500 * 960, 0]
    np.testing.assert_allclose(out, tiny.decode(codes), rtol=0, atol=2e-6)


@pytest.mark.parametrize("mode", ["cached", "window"])
def test_default_schedules_stay_within_the_measured_tolerance(tiny, codes, offline, mode):
    out, _ = stream_decode(tiny, codes, DecodeSchedule(mode=mode))
    assert out.shape == offline.shape
    fe = tiny.front_end
    l1 = log_mel_distance(fe(torch.from_numpy(offline)), fe(torch.from_numpy(out)))
    snr = snr_db(torch.from_numpy(offline), torch.from_numpy(out))
    assert l1 <= DEFAULT_MAX_LOG_MEL_L1, l1
    assert snr >= DEFAULT_MIN_SNR_DB, snr
    assert l1 > 0  # not exact: if it ever is, the test of the tolerance is vacuous


def test_default_schedule_chunk_sizes(tiny, codes):
    """First audio after one patch (4 tokens), then one patch of audio per patch, 960 T in all."""
    schedule = DecodeSchedule()
    assert schedule.first_audio_tokens() == 4
    _, sizes = stream_decode(tiny, codes, schedule, feed_tokens=4)
    first = (4 - schedule.holdback_tokens) * 960 - schedule.crossfade_samples
    assert sizes[0] == first
    assert set(sizes[1:-1]) == {4 * 960}
    assert sum(sizes) == 960 * codes.shape[0]


@pytest.mark.parametrize("mode", ["cached", "window"])
def test_streaming_is_causal(tiny, codes, mode):
    """Audio already emitted never depends on codes that arrive later."""
    schedule = DecodeSchedule(mode=mode)
    stream_a, stream_b = tiny.new_decode_stream(schedule), tiny.new_decode_stream(schedule)
    other = torch.flip(codes, dims=[0])
    emitted_a, emitted_b = [], []
    for i in range(0, 24, 4):
        emitted_a.append(tiny.decode_streams([(stream_a, codes[i : i + 4])])[0])
        emitted_b.append(tiny.decode_streams([(stream_b, codes[i : i + 4])])[0])
    a, b = np.concatenate(emitted_a), np.concatenate(emitted_b)
    np.testing.assert_array_equal(a, b)
    # diverging futures: only the held-back audio may differ
    tail_a = tiny.decode_streams([(stream_a, codes[24:40])])[0]
    tail_b = tiny.decode_streams([(stream_b, other[:16])])[0]
    assert tail_a.shape == tail_b.shape and not np.allclose(tail_a, tail_b)


def test_batched_streams_equal_separate_streams(tiny, codes):
    schedules = [DecodeSchedule(), DecodeSchedule(mode="window"), DecodeSchedule(refresh_from=4)]
    schedules.append(DecodeSchedule(holdback_tokens=0))
    starts = [0, 3, 10, 17]  # streams join at different times and get different amounts per call
    alone = [stream_decode(tiny, codes[s:], sch)[0] for s, sch in zip(starts, schedules, strict=True)]
    streams = [tiny.new_decode_stream(s) for s in schedules]
    got = [[] for _ in streams]
    pos = list(starts)
    while any(p < codes.shape[0] for p in pos):
        items = [(streams[i], codes[pos[i] : pos[i] + 4]) for i in range(4) if pos[i] < codes.shape[0]]
        idx = [i for i in range(4) if pos[i] < codes.shape[0]]
        for i, audio in zip(idx, tiny.decode_streams(items), strict=True):
            got[i].append(audio)
            pos[i] += 4
    for i, stream in enumerate(streams):
        got[i].append(tiny.finish_stream(stream))
        np.testing.assert_allclose(np.concatenate(got[i]), alone[i], rtol=0, atol=1e-5)


def test_emit_reproduces_a_consistent_signal_for_any_chunking():
    """When every pass synthesises the same signal, the emitted audio is that signal exactly."""
    signal = np.random.default_rng(0).standard_normal(960 * 30).astype(np.float32)
    for crossfade_samples in (0, 100, 960):
        for holdback in (0, 1, 3):
            seg, pieces, received = Segment(codes=torch.zeros(0, 8)), [], 0
            for step in (4, 1, 5, 4, 4, 2, 10):
                received += step
                seg.received = received
                start = max(0, (seg.covered - seg.tail.shape[0]) // 960 - 2) * 960
                end = max(0, received - holdback) * 960
                pieces.append(emit(seg, signal[start : received * 960], start, end, False, crossfade_samples))
            pieces.append(emit(seg, signal[0 : received * 960], 0, received * 960, True, crossfade_samples))
            np.testing.assert_allclose(np.concatenate(pieces), signal, rtol=0, atol=1e-6)


def test_crossfade_moves_from_old_to_new():
    old, new = np.ones(8, np.float32), np.zeros(8, np.float32)
    mixed = crossfade(old, new)
    assert mixed[0] > 0.9 and mixed[-1] < 0.1 and np.all(np.diff(mixed) < 0)


def test_stream_misuse_is_refused(tiny, codes):
    stream = tiny.new_decode_stream()
    tiny.decode_streams([(stream, codes[:4])])
    with pytest.raises(ValueError, match="decodes 8 codebooks; these codes have 4"):
        tiny.decode_streams([(stream, codes[4:8, :4])])
    with pytest.raises(ValueError, match="appears twice"):
        tiny.decode_streams([(stream, codes[4:8]), (stream, codes[8:12])])
    with pytest.raises(ValueError, match=r"codebook 2 span 1000\.\.1000, outside 0\.\.127"):
        tiny.decode_streams([(stream, torch.full((4, 8), 1000))])
    tiny.finish_stream(stream)
    with pytest.raises(RuntimeError, match="finished"):
        tiny.decode_streams([(stream, codes[4:8])])
    with pytest.raises(RuntimeError, match="already finished"):
        tiny.finish_stream(stream)
    assert tiny.finish_stream(tiny.new_decode_stream()).shape == (0,)  # a stream that got nothing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "fast"}, "mode 'fast'"),
        ({"norm": "batch"}, "norm 'batch'"),
        ({"chunk_patches": 0}, "chunk_patches must be at least 1"),
        ({"holdback_tokens": -1}, "holdback_tokens must not be negative"),
    ],
)
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeSchedule(**kwargs)


def test_crossfade_longer_than_a_token_is_refused(tiny):
    with pytest.raises(ValueError, match="exceeds one token"):
        tiny.new_decode_stream(DecodeSchedule(crossfade_samples=961))


def test_schedule_latencies():
    assert DecodeSchedule().first_audio_tokens() == 4
    assert DecodeSchedule(holdback_tokens=4, chunk_patches=2).first_audio_tokens() == 12
    assert DecodeSchedule.official().first_audio_tokens() == 44
    assert DecodeSchedule.infinite().first_audio_tokens() is None


@pytest.mark.parametrize(("feed", "refresh"), [(1, None), (3, None), (4, None), (4, 4), (3, 8)])
def test_cached_design_is_exact_given_the_offline_statistics_and_enough_lookahead(
    tiny, codes, offline, feed, refresh
):
    """The cached path (KV cache, chunked up-sampling convolutions, windowed vocoder, seams) adds
    no error of its own: with the GroupNorm statistics of the whole sequence, a hold-back of the
    vocoder's look-ahead and a left context of its look-back, it reproduces the offline decode."""
    voc = tiny.decoder.vocoder
    lookahead = -(-voc.lookahead_frames // 4)  # tokens: 4 vocoder frames each
    lookback = -(-voc.lookback_frames // 4)
    schedule = DecodeSchedule(mode="cached", norm="prior", prior=norm_statistics(tiny, [codes]),
                              prior_tokens=10**9, holdback_tokens=lookahead, left_context_tokens=lookback + 1,
                              refresh_from=refresh)
    out, sizes = stream_decode(tiny, codes, schedule, feed)
    assert sum(sizes[:-1]) > 0.5 * out.size  # most of it was streamed, not flushed at the end
    np.testing.assert_allclose(out, offline, rtol=0, atol=1e-5)
    # with a short hold-back it is no longer exact (the last frames of the look-ahead weigh very little:
    # one token less still gives 1e-7)
    short = dataclasses.replace(schedule, holdback_tokens=2)
    assert np.abs(stream_decode(tiny, codes, short, feed)[0] - offline).max() > 1e-4


def test_running_statistics_differ_from_offline(tiny, codes):
    stats = norm_statistics(tiny, [codes])
    assert stats.var1 > 0 and stats.var2 > 0
    with pytest.raises(ValueError, match="prior"):
        DecodeSchedule(norm="prior")
    with pytest.raises(ValueError, match="prior"):
        DecodeSchedule(prior=stats)


def _feed_two_streams(tiny, codes, segment_tokens):
    """Two cached-mode streams, one joining later, fed a patch at a time in shared batched calls,
    across several segments of ``segment_tokens``: (audio of each, KV storages seen per segment)."""
    streams = [tiny.new_decode_stream(DecodeSchedule(refresh_from=4, refresh_until=16)) for _ in range(2)]
    for s in streams:
        s.segment_tokens = segment_tokens
    got, stores = [[], []], [{}, {}]
    pos = [0, 0]
    for step in range(codes.shape[0] // 4 + 3):
        live = [i for i in range(2) if pos[i] < codes.shape[0] and (i == 0 or step >= 3)]
        for i, audio in zip(live, tiny.decode_streams([(streams[i], codes[pos[i] : pos[i] + 4]) for i in live]),
                            strict=True):
            got[i].append(audio)
            pos[i] += 4
            seg = streams[i].segment
            if seg.kv_store is not None:  # (the segment is kept alive, so its id stays its own)
                stores[i].setdefault(id(seg), (seg, set()))[1].add(seg.kv_store.data_ptr())
    for i, s in enumerate(streams):
        got[i].append(tiny.finish_stream(s))
    return [np.concatenate(g) for g in got], stores


def test_decoder_kv_cache_is_preallocated_bounded_and_exact(tiny, codes, monkeypatch):
    """The cached decoder's KV cache is one preallocated block per stream (a segment: all it can
    attend to), appended in place, handed from segment to segment, never grown: the audio equals
    that of the unbounded (growing) cache."""
    from agent.codec import streaming
    from agent.codec.transformer import LayerKV

    segment = 28  # tokens: several segments (and KV storages) in one stream
    long_codes = torch.cat([codes, codes, codes])  # 150 tokens
    bounded, stores = _feed_two_streams(tiny, long_codes, segment)
    for per_stream in stores:
        assert len(per_stream) >= 5  # several segments ...
        assert len(set().union(*(ptrs for _, ptrs in per_stream.values()))) == 1  # ... one storage, never regrown
    block = streaming.decode_cache_bytes(tiny.config, tiny.decoder.dtype, segment)
    assert block == tiny.config.decoder_layers * 2 * segment * 2 * tiny.config.d_model * 4

    def growing(tok, stream, seg):  # the cache before: grown by concatenation on every chunk
        if seg.kv is None:
            heads = tok.config.decoder_attention_heads
            empty = torch.zeros(1, heads, 0, tok.config.d_model // heads, dtype=tok.decoder.dtype)
            seg.kv = [LayerKV(empty, empty) for _ in range(tok.config.decoder_layers)]
        return seg.kv

    def at_once():  # several segments complete in one call: each gets storage while it runs
        stream = tiny.new_decode_stream()
        stream.segment_tokens = segment
        return np.concatenate([*tiny.decode_streams([(stream, long_codes[:100])]), tiny.finish_stream(stream)])

    bounded.append(at_once())
    monkeypatch.setattr(streaming, "segment_kv", growing)
    unbounded, _ = _feed_two_streams(tiny, long_codes, segment)
    unbounded.append(at_once())
    for a, b in zip(bounded, unbounded, strict=True):
        np.testing.assert_array_equal(a, b)


def test_decoder_kv_cache_size_at_the_real_size():
    from agent.codec.config import preset
    from agent.codec.streaming import decode_cache_bytes

    # 32 layers x (keys + values) x 3000 frames (one 60 s segment at 50 Hz) x 1280 x bf16
    assert decode_cache_bytes(preset("mimo-audio-tokenizer"), torch.bfloat16) == 491_520_000  # 469 MiB
