"""Sampling semantics (official MiMoSampler), per-row settings and seeded generators."""

from __future__ import annotations

import math

import pytest
import torch

from agent.lm.sampling import (
    DEFAULT_SAMPLING,
    GREEDY,
    SamplingBatch,
    SamplingParams,
    draw_uniform,
    filter_logits,
    sample,
    task_sampling,
)

NEG = float("-inf")
PROBS = [0.5, 0.25, 0.15, 0.1]
LOGITS = torch.tensor([[math.log(p) for p in PROBS]])


def _kept(params: SamplingParams) -> list[bool]:
    out = filter_logits(LOGITS, SamplingBatch.from_params([params]))
    return (out[0] > NEG).tolist()


def test_top_p_hand_computed() -> None:
    # ascending probs .1 .15 .25 .5, cumulative .1 .25 .5 1: with top_p 0.7 those <= 0.3 go
    assert _kept(SamplingParams(top_p=0.7)) == [True, True, False, False]
    # top_p 0.76: cumulative <= 0.24 goes: only the 0.1 token
    assert _kept(SamplingParams(top_p=0.76)) == [True, True, True, False]
    # a tiny top_p still keeps the most likely token
    assert _kept(SamplingParams(top_p=0.01)) == [True, False, False, False]
    assert _kept(SamplingParams(top_p=1.0)) == [True, True, True, True]


def test_top_k_then_top_p_hand_computed() -> None:
    assert _kept(SamplingParams(top_k=3)) == [True, True, True, False]
    assert _kept(SamplingParams(top_k=1)) == [True, False, False, False]
    assert _kept(SamplingParams(top_k=10)) == [True, True, True, True]
    # top-k 3 renormalises to .556 .278 .167; top_p 0.8 removes cumulative <= 0.2: the .167 token
    assert _kept(SamplingParams(top_k=3, top_p=0.8)) == [True, True, False, False]


def test_temperature_scales_before_filtering() -> None:
    out = filter_logits(LOGITS, SamplingBatch.from_params([SamplingParams(temperature=0.5)]))
    torch.testing.assert_close(out, LOGITS / 0.5)
    # at T=4 the distribution flattens, so top_p 0.7 keeps three tokens instead of two
    assert _kept(SamplingParams(temperature=4.0, top_p=0.7)) == [True, True, True, False]


def test_per_row_settings_in_one_batch_equal_rows_alone() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(top_p=0.7), SamplingParams(top_k=5, temperature=0.7), GREEDY, SamplingParams()]
    batch = filter_logits(logits, SamplingBatch.from_params(params))
    for row, p in enumerate(params):
        torch.testing.assert_close(
            batch[row : row + 1], filter_logits(logits[row : row + 1], SamplingBatch.from_params([p]))
        )


def test_sampling_follows_the_distribution() -> None:
    n = 20000
    logits = LOGITS.expand(n, -1)
    uniform = torch.rand(n, generator=torch.Generator().manual_seed(1))  # one number per draw
    tokens = sample(logits, SamplingBatch.coerce(SamplingParams(), n, torch.device("cpu")), uniform)
    freq = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor(PROBS), atol=0.015, rtol=0)
    # with top_p 0.7 only the two kept tokens appear, renormalised: 2/3 and 1/3
    tokens = sample(logits, SamplingBatch.coerce(SamplingParams(top_p=0.7), n, torch.device("cpu")), uniform)
    freq = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.015, rtol=0)


def test_greedy_and_removed_tokens() -> None:
    logits = LOGITS.clone()
    params = SamplingBatch.from_params([GREEDY])
    assert sample(logits, params).tolist() == [0]
    removed = torch.tensor([True, False, False, False])
    assert sample(logits, params, removed=removed).tolist() == [1]
    # removal happens after filtering (official removed_tokens); if nothing is left the row falls
    # back to its logits minus the removed tokens
    strict = SamplingBatch.from_params([SamplingParams(top_k=1)])
    uniform = torch.rand(1, generator=torch.Generator().manual_seed(0))
    assert sample(logits, strict, uniform, removed=removed).item() in (1, 2, 3)
    assert (
        sample(
            logits, SamplingBatch.from_params([SamplingParams(top_k=1, greedy=True)]), removed=removed
        ).item()
        == 1
    )
    with pytest.raises(ValueError, match=r"one uniform number per token, shape \(1,\); got None"):
        sample(logits, strict)
    # several distributions per row (the patch decoder's channels): (N, n, V) with one setting per row
    many = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
    params = SamplingBatch.from_params([GREEDY, SamplingParams(top_k=1)])
    got = sample(many, params, torch.rand(2, 3, generator=torch.Generator().manual_seed(3)))
    assert got.shape == (2, 3) and torch.equal(got, many.argmax(-1))


def test_seeded_generators_are_reproducible_per_row() -> None:
    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = draw_uniform(gens(1, 2), 2, (3, 5), torch.device("cpu"))
    b = draw_uniform(gens(1, 2), 2, (3, 5), torch.device("cpu"))
    assert torch.equal(a, b)
    alone = draw_uniform(gens(2), 1, (3, 5), torch.device("cpu"))
    assert torch.equal(a[1], alone[0])  # a row's noise does not depend on its neighbours
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        draw_uniform(gens(1, 2), 3, (4,), torch.device("cpu"))


def test_invalid_params_and_task_defaults() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
    assert task_sampling("asr").text.greedy and task_sampling("asr").speech == SamplingParams(0.9, top_p=0.95)
    assert task_sampling("tts").text == SamplingParams(0.6, top_p=1.0)
    assert task_sampling("spoken_dialogue").text == SamplingParams(0.6, top_p=0.95)
    assert task_sampling("in_context_learning_s2s").text.greedy
    assert task_sampling("continuation") == DEFAULT_SAMPLING and DEFAULT_SAMPLING.text.top_k == 50
