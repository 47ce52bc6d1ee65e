"""The ONNX Runtime backend against the PyTorch path: same codes, same audio, same chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.codec.audio import load_wav
from agent.codec.streaming import DecodeSchedule, NormStatistics, norm_statistics
from agent.lm.sampling import SamplingBatch, SamplingParams
from export.codec import OnnxCodec
from export.runtime import OnnxBackboneStep, OnnxPatchDecoder, onnx_backend
from tests.streaming.realtime_client import DATA

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def backend(runtime, export_dir):
    return onnx_backend(runtime, export_dir, providers="cpu")


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


SETTINGS = {
    "greedy": [SamplingParams(greedy=True)],
    "official speech": [SamplingParams(0.9, top_p=0.95)],
    "mixed rows": [SamplingParams(0.9, top_p=0.95), SamplingParams(greedy=True), SamplingParams(0.7, top_k=20),
                   SamplingParams(1.2)],
    "temperature only": [SamplingParams(0.8)],
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_decode_patch_gives_the_same_codes(runtime, backend, setting, batch):
    decode_patch = backend.decode_patch
    assert isinstance(decode_patch, OnnxPatchDecoder)
    rows = (SETTINGS[setting] * batch)[:batch]
    g = torch.Generator().manual_seed(batch)
    for patch in range(3):
        h = torch.randn(batch, runtime.lm.config.hidden_size, generator=g) * (1 + patch)
        seeds = [100 * patch + b for b in range(batch)]
        params = SamplingBatch.from_params(rows)
        want = runtime.lm.decode_patch(h, params, _gens(seeds))
        got = decode_patch(h, params, _gens(seeds))
        assert got.dtype == torch.int64 and got.shape == (batch, 4, 8)
        assert torch.equal(got, want), (setting, batch, patch)


def test_decode_patch_default_arguments_are_greedy(runtime, backend):
    decode_patch = backend.decode_patch
    h = torch.randn(2, runtime.lm.config.hidden_size)
    assert torch.equal(decode_patch(h), runtime.lm.decode_patch(h))


def test_seeded_sampling_does_not_depend_on_the_batch(runtime, backend):
    """A row's codes come from its own generator, alone or batched (as in PyTorch)."""
    decode_patch = backend.decode_patch
    h = torch.randn(4, runtime.lm.config.hidden_size, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(0.9, top_p=0.95)] * 4
    batched = decode_patch(h, params, _gens([5, 6, 7, 8]))
    alone = decode_patch(h[2:3], params[:1], _gens([7]))
    assert torch.equal(batched[2:3], alone)


def test_patch_encoder_gives_the_same_embeddings(runtime, backend):
    """Text and speech patches mixed, as ``embed_patches`` sees them in a prompt."""
    embed = backend.embed_patches
    cfg = runtime.lm.config
    g = torch.Generator().manual_seed(4)
    text_ids = torch.randint(0, cfg.vocab_size, (3, 7), generator=g)
    text_ids[:, ::2] = cfg.empty_token_id  # every other patch is speech
    codes = torch.stack([torch.randint(0, v, (3, 7, 4), generator=g) for v in cfg.speech_vocab_sizes], dim=-1)
    want = runtime.lm.embed_patches(text_ids, codes)
    got = embed(text_ids, codes)
    assert got.shape == want.shape == (3, 7, cfg.hidden_size)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(got[:, 1::2], want[:, 1::2])  # text patches: the same lookup
    with pytest.raises(ValueError, match="codes must have shape"):
        embed(text_ids, codes[:, :, :2])


def test_backbone_step_follows_decode_step(runtime, backend):
    """Slots out of order with histories of different lengths, several steps in a row: the same
    hidden states, the same keys and values written at the same positions, the same lengths."""
    lm, step = runtime.lm, backend.decode_step
    assert isinstance(step, OnnxBackboneStep)
    cfg = lm.config
    g = torch.Generator().manual_seed(8)
    want_cache, got_cache = lm.allocate_cache(4, 32), lm.allocate_cache(4, 32)
    with torch.inference_mode():
        for slot, n in ((0, 9), (2, 5), (3, 1)):
            emb = torch.randn(1, n, cfg.hidden_size, generator=g)
            lm.prefill(want_cache, slot, emb)
            lm.prefill(got_cache, slot, emb)
        for slots in ([2, 0, 3], [3, 2], [0], [1, 3]):  # slot 1 starts with no history at all
            emb = torch.randn(len(slots), 1, cfg.hidden_size, generator=g)
            want = lm.decode_step(want_cache, slots, emb)
            got = step(got_cache, slots, emb)
            assert got.shape == want.shape == (len(slots), cfg.hidden_size)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), slots
    assert got_cache.host_lengths == want_cache.host_lengths == [11, 1, 7, 4]
    assert step.graph_steps >= 4 and step.fallback_steps == 0
    assert torch.equal(got_cache.lengths, want_cache.lengths)
    for slot, n in enumerate(want_cache.host_lengths):
        for name in ("k", "v"):
            w, o = getattr(want_cache, name)[:, slot, :, :n], getattr(got_cache, name)[:, slot, :, :n]
            assert (o - w).abs().max() <= 1e-4 * w.abs().max(), (slot, name)
    with pytest.raises(ValueError, match="distinct"):
        step(got_cache, [0, 0], torch.zeros(2, 1, cfg.hidden_size))
    with pytest.raises(ValueError, match=r"emb \(B, 1, hidden\)"):
        step(got_cache, [0], torch.zeros(1, 2, cfg.hidden_size))


def test_backbone_step_falls_back_to_pytorch_past_its_size(runtime, backend):
    """Past ``max_rows`` rows x span the model's own step runs (the graph's history copy would
    cost more than it saves): bit for bit PyTorch's result."""
    lm = runtime.lm
    step = OnnxBackboneStep(backend.decode_step.runner, lm, max_rows=8)
    g = torch.Generator().manual_seed(9)
    want_cache, got_cache = lm.allocate_cache(2, 16), lm.allocate_cache(2, 16)
    with torch.inference_mode():
        for slot in (0, 1):
            emb = torch.randn(1, 5, lm.config.hidden_size, generator=g)
            lm.prefill(want_cache, slot, emb)
            lm.prefill(got_cache, slot, emb)
        emb = torch.randn(2, 1, lm.config.hidden_size, generator=g)
        assert torch.equal(step(got_cache, [0, 1], emb), lm.decode_step(want_cache, [0, 1], emb))  # 2 x 5 > 8
        assert (step.fallback_steps, step.graph_steps) == (1, 0)
        step(got_cache, [1], emb[:1])  # 1 x 6 <= 8: the graph
        assert (step.fallback_steps, step.graph_steps) == (1, 1)
    assert got_cache.host_lengths == [6, 7]


def test_encode_batch_gives_the_same_codes(runtime, backend):
    codec = backend.codec
    assert isinstance(codec, OnnxCodec)
    speech = load_wav(DATA / "speech_hello_padded.wav")
    turns = [speech, speech[:20_000], load_wav(DATA / "speech_yes.wav"), np.zeros(0, np.float32)]
    want = runtime.codec.encode_batch(turns)
    got = codec.encode_batch(turns)
    for w, g in zip(want, got, strict=True):
        assert g.dtype == torch.int64 and torch.equal(g, w)
    assert got[0].shape[0] > 0 and got[3].shape == (0, 8)
    with pytest.raises(ValueError, match="n_q=9"):
        codec.encode_batch(turns[:1], n_q=9)


def _prior(tok) -> NormStatistics:
    g = torch.Generator().manual_seed(21)
    return norm_statistics(tok, [torch.stack([torch.randint(0, 128, (40,), generator=g) for _ in range(8)], dim=1)])


SCHEDULES = {
    "default (refreshes at 8, 16, 32, 64 tokens)": lambda tok: DecodeSchedule(),
    "no refresh": lambda tok: DecodeSchedule(refresh_from=None),
    "refresh from 4 to 16 tokens": lambda tok: DecodeSchedule(refresh_from=4, refresh_until=16),
    "frozen norm": lambda tok: DecodeSchedule(norm="frozen", freeze_after_tokens=12),
    "prior statistics": lambda tok: DecodeSchedule(norm="prior", prior=_prior(tok), prior_tokens=10),
    "bigger chunks, short context": lambda tok: DecodeSchedule(first_chunk_patches=3, chunk_patches=2,
                                                               left_context_tokens=10),
    "no cross-fade, more hold-back": lambda tok: DecodeSchedule(holdback_tokens=5, crossfade_samples=0),
    "window mode (PyTorch pass)": lambda tok: DecodeSchedule(mode="window", left_context_tokens=20),
    "unbounded left context": lambda tok: DecodeSchedule(left_context_tokens=None),
}


def _stream(codec, streams_codes: list[torch.Tensor], schedule: DecodeSchedule, step: int):
    """Feed several streams together ``step`` tokens at a time; per stream, the audio of each call."""
    streams = [codec.new_decode_stream(schedule) for _ in streams_codes]
    pieces: list[list[np.ndarray]] = [[] for _ in streams]
    longest = max(c.shape[0] for c in streams_codes)
    for i in range(0, longest, step):
        live = [(b, s) for b, s in enumerate(streams) if i < streams_codes[b].shape[0]]
        out = codec.decode_streams([(s, streams_codes[b][i : i + step]) for b, s in live])
        for (b, _), audio in zip(live, out, strict=True):
            pieces[b].append(audio)
    for b, audio in enumerate(codec.finish_streams(streams)):  # one batched pass
        pieces[b].append(audio)
    return pieces


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_streaming_decode_matches_pytorch(runtime, backend, schedule):
    """Same chunk sizes at the same calls, same samples within fp32 rounding, for a batch of streams
    of different lengths and start times."""
    codec = backend.codec
    g = torch.Generator().manual_seed(11)
    codes = [torch.stack([torch.randint(0, 1024 if q < 2 else 128, (n,), generator=g) for q in range(8)], dim=1)
             for n in (96, 52, 8)]
    made = SCHEDULES[schedule](runtime.codec)
    for step in (4, 8):
        want = _stream(runtime.codec, codes, made, step)
        got = _stream(codec, codes, made, step)
        for w, o in zip(want, got, strict=True):
            assert [a.shape for a in o] == [a.shape for a in w]
            ref, out = np.concatenate(w), np.concatenate(o)
            assert ref.shape[0] > 0 and np.abs(ref).max() > 0
            assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_streams_move_to_the_pytorch_pass_past_the_graph_window(runtime, backend, monkeypatch):
    """A window longer than the graph takes goes to PyTorch mid-stream; the state carries over."""
    import export.codec

    monkeypatch.setattr(export.codec, "MAX_GRAPH_WINDOW", 64)  # 16 tokens: the switch comes early
    codec = backend.codec
    calls = []
    graph_pass = codec._graph_pass
    monkeypatch.setattr(codec, "_graph_pass", lambda tok, jobs: calls.append(len(jobs)) or graph_pass(tok, jobs))
    g = torch.Generator().manual_seed(12)
    codes = [torch.stack([torch.randint(0, 128, (n,), generator=g) for _ in range(8)], dim=1) for n in (60, 24)]
    schedule = DecodeSchedule(left_context_tokens=None)
    want = _stream(runtime.codec, codes, schedule, 4)
    got = _stream(codec, codes, schedule, 4)
    assert calls[0] > 0 and calls[-1] == 0  # the graph ran the first chunks, PyTorch the last ones
    for w, o in zip(want, got, strict=True):
        assert [a.shape for a in o] == [a.shape for a in w]
        ref, out = np.concatenate(w), np.concatenate(o)
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_stream_is_causal_on_onnx(backend):
    """Appending codes never changes audio already emitted."""
    codec = backend.codec
    g = torch.Generator().manual_seed(5)
    codes = torch.stack([torch.randint(0, 128, (40,), generator=g) for _ in range(8)], dim=1)
    short, long = codec.new_decode_stream(), codec.new_decode_stream()
    a = [codec.decode_streams([(short, codes[i : i + 4])])[0] for i in range(0, 20, 4)]
    b = [codec.decode_streams([(long, codes[i : i + 4])])[0] for i in range(0, 40, 4)]
    emitted = np.concatenate(a)
    np.testing.assert_array_equal(np.concatenate(b)[: emitted.shape[0]], emitted)
    for stream, tokens in ((short, 20), (long, 40)):  # finishing plays out every token's samples
        assert stream.samples_emitted + codec.finish_stream(stream).shape[0] == tokens * 960
