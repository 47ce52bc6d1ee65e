"""The slot KV cache: incremental equals full, batching equals alone, rollback equals fresh."""

from __future__ import annotations

import pytest
import torch

from agent.lm.kv_cache import CacheFullError, KVCache
from agent.lm.prompts import PromptBuilder

from .conftest import mixed_prompt

ATOL = 1e-5


def _embed(lm, prompt):
    return lm.embed_patches(*prompt.batch())


def test_incremental_decoding_equals_full_recomputation(tiny) -> None:
    lm, config, tok = tiny
    prompt = mixed_prompt(PromptBuilder(tok, config), seed=1)
    emb = _embed(lm, prompt)
    P = emb.shape[1]
    cache = lm.allocate_cache(1, 64)
    h = lm.prefill(cache, 0, emb[:, :3])
    for i in range(3, P):
        h = lm.decode_step(cache, [0], emb[:, i : i + 1])
        full = lm.allocate_cache(1, 64)
        torch.testing.assert_close(h, lm.prefill(full, 0, emb[:, : i + 1]), rtol=0, atol=ATOL)
    assert cache.length(0) == P and int(cache.lengths[0]) == P


def test_chunked_prefill_equals_one_prefill(tiny) -> None:
    lm, config, tok = tiny
    emb = _embed(lm, mixed_prompt(PromptBuilder(tok, config), seed=2))
    whole = lm.prefill(lm.allocate_cache(1, 64), 0, emb)
    cache = lm.allocate_cache(1, 64)
    for start in range(0, emb.shape[1], 5):
        h = lm.prefill(cache, 0, emb[:, start : start + 5])
    torch.testing.assert_close(h, whole, rtol=0, atol=ATOL)
    # and the cached keys are the same, so later steps agree too
    nxt = emb[:, :1]
    ref = lm.allocate_cache(1, 64)
    lm.prefill(ref, 0, emb)
    torch.testing.assert_close(
        lm.decode_step(cache, [0], nxt), lm.decode_step(ref, [0], nxt), rtol=0, atol=ATOL
    )


@pytest.mark.parametrize("slots", [[0, 1, 2], [3, 0, 2], [1, 2, 3]], ids=["contiguous", "shuffled", "offset"])
def test_batched_decode_of_different_lengths_equals_each_alone(tiny, slots) -> None:
    lm, config, tok = tiny
    builder = PromptBuilder(tok, config)
    prompts = [mixed_prompt(builder, seed=10 + i, speech_patches=2 + 3 * i) for i in range(3)]
    steps = [mixed_prompt(builder, seed=20 + i)[:4] for i in range(3)]  # 4 more patches per row
    batched = lm.allocate_cache(4, 64)
    alone = []
    for slot, prompt in zip(slots, prompts, strict=True):
        lm.prefill(batched, slot, _embed(lm, prompt))
        single = lm.allocate_cache(1, 64)
        lm.prefill(single, 0, _embed(lm, prompt))
        alone.append(single)
    assert len({batched.length(s) for s in slots}) == 3  # really different lengths
    for t in range(4):
        emb = torch.cat([_embed(lm, s[t : t + 1]) for s in steps])  # (3, 1, hidden)
        h = lm.decode_step(batched, torch.tensor(slots), emb)
        for row, cache in enumerate(alone):
            want = lm.decode_step(cache, [0], emb[row : row + 1])
            torch.testing.assert_close(h[row : row + 1], want, rtol=0, atol=ATOL)
    for slot, prompt in zip(slots, prompts, strict=True):
        assert batched.length(slot) == len(prompt) + 4


def test_rollback_then_regenerate_equals_fresh_run(tiny) -> None:
    lm, config, tok = tiny
    builder = PromptBuilder(tok, config)
    prompt, detour, cont = mixed_prompt(builder, 3), mixed_prompt(builder, 4), mixed_prompt(builder, 5)[:3]
    cache = lm.allocate_cache(2, 64)
    lm.prefill(cache, 1, _embed(lm, prompt))
    lm.prefill(cache, 1, _embed(lm, detour))  # overwritten below
    cache.rollback(1, len(prompt))
    assert cache.length(1) == len(prompt) and int(cache.lengths[1]) == len(prompt)
    got = lm.prefill(cache, 1, _embed(lm, cont))
    fresh = lm.allocate_cache(1, 64)
    lm.prefill(fresh, 0, _embed(lm, prompt))
    torch.testing.assert_close(got, lm.prefill(fresh, 0, _embed(lm, cont)), rtol=0, atol=ATOL)


def test_reset_and_errors(tiny) -> None:
    lm, config, tok = tiny
    cache = KVCache.allocate(config, 2, 8)
    assert cache.k.shape == (config.num_hidden_layers, 2, config.num_key_value_heads, 8, config.head_dim)
    emb = _embed(lm, PromptBuilder(tok, config).text("abcdef"))
    lm.prefill(cache, 0, emb)
    with pytest.raises(CacheFullError, match="slot 0 holds 6 of 8"):
        lm.prefill(cache, 0, emb)
    assert cache.length(0) == 6  # a refused prefill changes nothing
    with pytest.raises(ValueError, match="cannot roll slot 0 back to 7"):
        cache.rollback(0, 7)
    with pytest.raises(IndexError, match="slot 2 out of range"):
        cache.length(2)
    with pytest.raises(ValueError, match="distinct"):
        lm.decode_step(cache, [1, 1], torch.cat([emb[:, :1]] * 2))
    cache.reset(0)
    assert cache.length(0) == 0 and int(cache.lengths[0]) == 0
    with pytest.raises(ValueError, match="max_positions"):
        KVCache.allocate(config, 1, config.max_position_embeddings + 1)


def test_copy_slot_shares_a_history(tiny) -> None:
    lm, config, tok = tiny
    builder = PromptBuilder(tok, config)
    prompt, nxt = mixed_prompt(builder, 6), mixed_prompt(builder, 7)[:1]
    cache = lm.allocate_cache(3, 64)
    lm.prefill(cache, 0, _embed(lm, prompt))
    cache.copy_slot(0, 2)
    assert cache.length(2) == len(prompt) and int(cache.lengths[2]) == len(prompt)
    h = lm.decode_step(cache, [0, 2], torch.cat([_embed(lm, nxt)] * 2))
    torch.testing.assert_close(h[0], h[1], rtol=0, atol=0)
