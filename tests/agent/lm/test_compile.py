"""``--compile``: a tick's three regions through torch.compile (inductor), on a CPU at tiny size.

Inductor's CPU backend builds C++ kernels, so these tests need a C++ compiler (CI installs g++).
The compiled regions must give the eager regions' results: hidden states within float rounding,
the same tokens and codes from the same draws, and an engine on them must answer as the eager
engine does. Every test runs batch 1 with the spoken-dialogue sampling (sizes 0 and 1 get graphs
of their own, and so does each set of sampler flags): each region compiles once for the module.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from agent.lm.graphs import DecodeGraphs
from agent.lm.kernels import patch_kernels
from agent.lm.sampling import SamplingBatch, task_sampling
from agent.runtime import load_runtime
from streaming.cli import main

from .conftest import short_answer

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="torch.compile on a CPU needs a C++ compiler (.ci/run installs g++)"),
]

SAMPLING = task_sampling("spoken_dialogue")


@pytest.fixture(scope="module")
def runtime():
    torch.set_num_threads(1)
    return load_runtime(preset="tiny", device="cpu")


def _tick(lm, graphs: DecodeGraphs, cache, text, codes):
    """One speech patch as the engine runs it: (hidden, text token, codes), seeded draws."""
    h = graphs.step_patches(cache, [0], text, codes)
    token = graphs.sample_text(h, None, SamplingBatch.from_params([SAMPLING.text]), [torch.Generator().manual_seed(1)])
    patch = graphs.decode_patch(h, [SAMPLING.speech], [torch.Generator().manual_seed(2)])
    return h, token, patch


def test_the_compiled_regions_give_the_eager_results(runtime):
    lm, cfg = runtime.lm, runtime.lm.config
    g = torch.Generator().manual_seed(0)
    results = []
    for compile in (False, True):
        cache = lm.allocate_cache(2, 64)
        lm.prefill(cache, 0, torch.randn(1, 10, cfg.hidden_size, generator=torch.Generator().manual_seed(0)))
        graphs = DecodeGraphs(lm, cache, max_batch=1, scratch_slot=1, capture=False, compile=compile)
        text = torch.full((1, 1), cfg.empty_token_id)
        codes = torch.stack([torch.randint(0, n, (1, 1, cfg.group_size), generator=g.manual_seed(3))
                             for n in cfg.speech_vocab_sizes], dim=-1)
        with torch.inference_mode():
            results.append([_tick(lm, graphs, cache, text, codes) for _ in range(3)])  # 3 positions: 3 spans
    for (h, token, patch), (h2, token2, patch2) in zip(*results, strict=True):
        torch.testing.assert_close(h2, h, atol=2e-5, rtol=1e-4)
        assert torch.equal(token2, token) and torch.equal(patch2, patch)


def test_the_compiled_step_attends_scattered_rows_in_place(runtime):
    """Compiled on a CPU, a backbone step's attention is the fused kernel: rows in scattered slots
    with different lengths each read their own slot, nothing gathered (every position read is one
    attended), and the results are the eager model's."""
    lm, cfg = runtime.lm, runtime.lm.config
    caches = []
    for _ in range(2):
        cache = lm.allocate_cache(6, 64)
        for slot, n in ((0, 9), (2, 3), (4, 17)):
            lm.prefill(cache, slot, torch.randn(1, n, cfg.hidden_size, generator=torch.Generator().manual_seed(slot)))
        caches.append(cache)
    eager, compiled = caches
    graphs = DecodeGraphs(lm, compiled, max_batch=4, scratch_slot=5, capture=False, compile=True)
    slots = [4, 0, 2]
    assert graphs.kv_read(slots) == (18 + 10 + 4 + 1, 18 + 10 + 4)  # + the padding row's scratch position
    emb = torch.randn(3, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        want = lm.decode_step(eager, slots, emb)
        got = graphs.decode_step(compiled, slots, emb)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for s in slots:
        n = eager.length(s)
        torch.testing.assert_close(compiled.k[:, s, :, :n], eager.k[:, s, :, :n], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(compiled.v[:, s, :, :n], eager.v[:, s, :, :n], atol=2e-5, rtol=1e-4)
    assert compiled.lengths.tolist() == eager.lengths.tolist() and compiled.length(5) == 0


def test_compiled_regions_count_their_generated_launches(runtime):
    """bench-lm --kernels --compile: each region's launches come from inductor's code, and a tick
    compiled launches far fewer kernels than eager."""
    eager_text, eager_speech = patch_kernels(runtime.lm)
    text, speech = patch_kernels(runtime.lm, compile=True)
    assert set(speech.regions) == {"step", "text", "patch"} and set(text.regions) == {"step", "text"}
    assert text.regions["step"] == speech.regions["step"] > 0
    assert 0 < text.total < eager_text.total / 2 and 0 < speech.total < eager_speech.total / 2
    assert speech.ops["compiled"] == sum(speech.regions.values())


def _answer(runtime, **config):
    return short_answer(runtime, SAMPLING, **config)


def test_engine_with_compile_answers_as_eager(runtime):
    engine, compiled, compiled_codes = _answer(runtime, compile=True)
    assert engine.graphs is not None and engine.graphs.compiled
    _, eager, eager_codes = _answer(runtime)
    assert torch.equal(compiled_codes, eager_codes)
    assert compiled.status == eager.status == "incomplete"
    assert compiled.transcript == eager.transcript
    assert compiled.timings["speech_patches"] == eager.timings["speech_patches"] > 0


def test_bench_lm_times_the_compiled_path(runtime, capsys):
    assert main(["bench-lm", "--compile", "--batch", "1", "--context", "8", "--steps", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "--compile" in out.splitlines()[0]
    assert [line.split("|")[1:3] for line in out.splitlines() if line.startswith("| 1 ")] == [[" 1 ", " 8 "]]
