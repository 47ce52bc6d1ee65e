"""The CUDA-graph path's static-shape functions, run eagerly on the CPU: padded batches, span
buckets and the scratch slot must give what the model's own decode_step and decode_patch give.
(The capture and replay themselves need a CUDA device.)"""

from __future__ import annotations

import pytest
import torch

from agent.lm.graphs import DecodeGraphs, bucket_of, buckets, sample_text
from agent.lm.sampling import GREEDY, SamplingBatch, SamplingParams

from .conftest import twin_caches

SLOTS, MAX_BATCH, POSITIONS = 6, 4, 200  # slot 5 is the scratch slot


def _caches(lm, lengths: list[int]):
    """Two identical caches, each slot prefilled with its own random history."""
    return twin_caches(lm, lengths, SLOTS, POSITIONS)


def test_buckets() -> None:
    assert buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]
    assert buckets(200, 64) == [64, 128, 200]
    assert bucket_of(3, [1, 2, 4]) == 4 and bucket_of(64, [64, 128]) == 64
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_of(5, [1, 2, 4])


@pytest.mark.parametrize("slots", [[0], [2, 0, 4], [3, 1, 0, 2], [4]])  # [4]: a window 6x the batch, gathered
def test_decode_step_equals_the_model(tiny, slots) -> None:
    lm, _, _ = tiny
    eager, static = _caches(lm, [70, 5, 130, 0, 64])  # spans fall in different buckets; slot 3 is empty
    graphs = DecodeGraphs(lm, static, max_batch=MAX_BATCH, scratch_slot=SLOTS - 1, capture=False)
    emb = torch.randn(len(slots), 1, lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for _ in range(3):  # a few steps: the lengths advance identically
        want = lm.decode_step(eager, slots, emb)
        got = graphs.decode_step(static, slots, emb)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert static.host_lengths == eager.host_lengths
        assert static.lengths.tolist() == eager.lengths.tolist()
    for s in slots:
        n = eager.length(s)
        torch.testing.assert_close(static.k[:, s, :, :n], eager.k[:, s, :, :n], rtol=1e-5, atol=1e-5)
    assert static.length(SLOTS - 1) == 0  # padding rows never advance the scratch slot


@pytest.mark.parametrize("slots", [[2, 0, 4], [4]])
def test_the_encoder_and_step_region_equals_the_model(tiny, slots) -> None:
    """``step_patches``: the patch encoder and the backbone step as one region."""
    lm, cfg, _ = tiny
    eager, static = _caches(lm, [70, 5, 130, 0, 64])
    graphs = DecodeGraphs(lm, static, max_batch=MAX_BATCH, scratch_slot=SLOTS - 1, capture=False)
    g = torch.Generator().manual_seed(2)
    text = torch.tensor([[cfg.empty_token_id], [65], [cfg.empty_token_id]][: len(slots)])  # speech and text
    codes = torch.stack([torch.randint(0, n, (len(slots), 1, cfg.group_size), generator=g)
                         for n in cfg.speech_vocab_sizes], dim=-1)
    for _ in range(2):
        want = lm.decode_step(eager, slots, lm.embed_patches(text, codes))
        torch.testing.assert_close(graphs.step_patches(static, slots, text, codes), want, rtol=1e-5, atol=1e-5)
    assert static.host_lengths == eager.host_lengths


@pytest.mark.parametrize("banned", [False, True])
def test_the_text_region_equals_the_eager_sampler(tiny, banned) -> None:
    lm, cfg, _ = tiny
    graphs = DecodeGraphs(lm, lm.allocate_cache(SLOTS, POSITIONS), max_batch=MAX_BATCH, scratch_slot=SLOTS - 1,
                          capture=False)
    h = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    params = SamplingBatch.from_params([SamplingParams(0.6, top_p=0.95), GREEDY, SamplingParams(1.5, top_k=4)])
    bans = None
    if banned:  # every token but a few of each row
        bans = torch.ones(3, cfg.vocab_size, dtype=torch.bool)
        bans[:, 10:13] = False

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(3)]

    want = sample_text(lm, h, bans, params, gens())
    got = graphs.sample_text(h, bans, params, gens())  # 3 rows padded to the bucket of 4
    assert got.shape == (3,) and torch.equal(got, want)
    if banned:
        assert ((got >= 10) & (got < 13)).all()


def test_decode_step_refuses_the_scratch_slot_and_a_foreign_cache(tiny) -> None:
    lm, _, _ = tiny
    cache, other = _caches(lm, [4, 4, 0, 0, 0])
    graphs = DecodeGraphs(lm, cache, max_batch=MAX_BATCH, scratch_slot=SLOTS - 1, capture=False)
    emb = torch.zeros(1, 1, lm.config.hidden_size)
    with pytest.raises(ValueError, match="distinct session slots"):
        graphs.decode_step(cache, [SLOTS - 1], emb)
    with pytest.raises(ValueError, match="another KV cache"):
        graphs.decode_step(other, [0], emb)
    with pytest.raises(ValueError, match="leaves no scratch slot"):
        DecodeGraphs(lm, cache, max_batch=SLOTS, scratch_slot=SLOTS - 1, capture=False)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(0.9, top_p=0.95), SamplingParams(0.8, top_k=20)])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_decode_patch_equals_the_model(tiny, sampling, rows) -> None:
    lm, _, _ = tiny
    cache = lm.allocate_cache(SLOTS, POSITIONS)
    graphs = DecodeGraphs(lm, cache, max_batch=MAX_BATCH, scratch_slot=SLOTS - 1, capture=False)
    h = torch.randn(rows, lm.config.hidden_size, generator=torch.Generator().manual_seed(rows))
    params = [sampling] * rows

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(rows)]

    want = lm.decode_patch(h, params, gens())
    got = graphs.decode_patch(h, params, gens())
    assert got.shape == want.shape == (rows, lm.config.group_size, len(lm.config.speech_vocab_sizes))
    assert torch.equal(got, want)


def test_mixed_sampling_rows_match_too(tiny) -> None:
    lm, _, _ = tiny
    graphs = DecodeGraphs(lm, lm.allocate_cache(SLOTS, POSITIONS), max_batch=MAX_BATCH, scratch_slot=SLOTS - 1,
                          capture=False)
    h = torch.randn(3, lm.config.hidden_size, generator=torch.Generator().manual_seed(7))
    params = [GREEDY, SamplingParams(0.9, top_p=0.95), SamplingParams(1.2, top_k=5)]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    want = lm.decode_patch(h, params, gens)
    got = graphs.decode_patch(h, params, [torch.Generator().manual_seed(i) for i in range(3)])
    assert torch.equal(got, want)


def test_capture_needs_cuda(tiny) -> None:
    lm, _, _ = tiny
    with pytest.raises(ValueError, match="need a CUDA device"):
        DecodeGraphs(lm, lm.allocate_cache(SLOTS, POSITIONS), max_batch=MAX_BATCH, scratch_slot=SLOTS - 1,
                     capture=True)


def test_kv_read_counts_the_positions_a_step_reads_against_those_it_attends(tiny) -> None:
    lm, _, _ = tiny
    cache, _ = _caches(lm, [70, 5, 130, 0, 64])
    graphs = DecodeGraphs(lm, cache, max_batch=MAX_BATCH, scratch_slot=SLOTS - 1, capture=False)
    # slots 0-2: in place over a window of 4 rows, the longest row (130 + 1) in the span bucket of 192
    assert graphs.layout([0, 1, 2]) == (True, 4, 192)
    assert graphs.kv_read([0, 1, 2]) == (4 * 192, 71 + 6 + 131)
    # slot 4 alone: a window of 6 rows for 1 is gathered, its 65 positions in the span of 128, read twice
    assert graphs.layout([4]) == (False, 1, 128)
    assert graphs.kv_read([4]) == (2 * 128, 65)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_patch_decoder_s_bias_rows_are_aligned(dtype, monkeypatch) -> None:
    """A patch-decoder step hands its row of the step tables' attention bias to SDPA. CUDA's
    memory-efficient attention reads the bias in aligned vectors: a view of row t of the packed
    table, t x 11 elements in, faulted on a GPU ("misaligned address", bf16). Every bias a host step
    attends with starts on a 64-byte boundary and is that step's row of the table."""
    from agent.lm import patch_decoder
    from agent.lm.model import build_preset
    from agent.lm.transformer import attention_bias

    lm, cfg, _ = build_preset("tiny", dtype=dtype)
    seen: list[torch.Tensor] = []
    attend = patch_decoder.attend

    def spy(q, k, v, mask=None, **kw):
        seen.append(mask)
        return attend(q, k, v, mask, **kw)

    monkeypatch.setattr(patch_decoder, "attend", spy)
    with torch.inference_mode():
        lm.decode_patch(torch.randn(2, cfg.hidden_size, dtype=dtype), [GREEDY] * 2, None)
    layers, steps = cfg.local_layers, cfg.local_steps
    assert len(seen) == layers * steps
    table = attention_bias(torch.arange(steps)[None, :] <= torch.arange(steps)[:, None], dtype)
    for i, mask in enumerate(seen):
        t = i // layers
        assert torch.equal(mask.reshape(1, -1), table[t : t + 1]), t
        assert mask.data_ptr() % 64 == 0, f"step {t}: its bias is {mask.data_ptr() % 64} bytes past a 64-byte boundary"
