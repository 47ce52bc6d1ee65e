"""The CUDA path on a real device: the engine's CUDA graphs, captured and replayed, eager and
compiled (inductor's Triton kernels), give what the model's own functions give, and an engine on
them answers as the eager engine does.

The static-shape functions behind the graphs are checked on a CPU (test_graphs.py, test_compile.py);
capture and replay need a CUDA device, so without one (CI has none) this module is skipped with that
reason shown. Run it where a GPU is lent: ``python -m pytest -rs tests/agent/lm/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from agent.checkpoint import CheckpointError, parse_device
from agent.lm.graphs import DecodeGraphs, sample_text
from agent.lm.sampling import GREEDY, SamplingBatch, SamplingParams, task_sampling
from agent.runtime import load_runtime

from .conftest import short_answer, twin_caches

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)"),
]

DEVICE = "cuda"
SLOTS, MAX_BATCH, POSITIONS = 6, 4, 200  # slot 5 is the scratch slot
SPOKEN = task_sampling("spoken_dialogue")


@pytest.fixture(scope="module")
def runtime():
    return load_runtime(preset="tiny", device=DEVICE, dtype="fp32")


def test_a_cuda_device_comes_with_its_index() -> None:
    """``--device cuda`` is the current GPU by index: ``torch.cuda.set_device`` (which the runtime
    and the engine's thread call) refuses a CUDA device without one."""
    assert parse_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    assert parse_device("auto").index is not None
    with pytest.raises(CheckpointError, match=r"'cuda:99' requested but this machine has \d+ CUDA device"):
        parse_device("cuda:99")


def _gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator(device=DEVICE).manual_seed(seed + i) for i in range(n)]


def _caches(lm, lengths: list[int]):
    """Two identical caches on the device, each slot prefilled with its own random history."""
    return twin_caches(lm, lengths, SLOTS, POSITIONS, DEVICE)


@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "compiled"])
def test_captured_step_equals_the_model(runtime, compile) -> None:
    """The encoder and backbone step replayed from graphs (in place over a window of slots, and a
    row gathered from a far slot), several steps so the lengths advance and spans change bucket."""
    lm, cfg = runtime.lm, runtime.lm.config
    eager, static = _caches(lm, [70, 5, 130, 0, 64])
    graphs = DecodeGraphs(lm, static, max_batch=MAX_BATCH, scratch_slot=SLOTS - 1, capture=True, compile=compile)
    assert graphs.capture
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for slots in ([2, 0, 4], [4], [1, 3]):
            text = torch.tensor([[cfg.empty_token_id], [65], [cfg.empty_token_id]][: len(slots)], device=DEVICE)
            for _ in range(3):
                codes = torch.stack([torch.randint(0, n, (len(slots), 1, cfg.group_size), generator=g)
                                     for n in cfg.speech_vocab_sizes], dim=-1).to(DEVICE)
                want = lm.decode_step(eager, slots, lm.embed_patches(text, codes))
                got = graphs.step_patches(static, slots, text, codes)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                assert static.host_lengths == eager.host_lengths
                assert static.lengths.tolist() == eager.lengths.tolist()
    for s in range(SLOTS - 1):
        n = eager.length(s)
        torch.testing.assert_close(static.k[:, s, :, :n], eager.k[:, s, :, :n], rtol=1e-4, atol=1e-4)
    assert static.length(SLOTS - 1) == 0  # padding rows never advance the scratch slot


@pytest.mark.parametrize("compile", [False, True], ids=["graphs", "compiled"])
def test_captured_samplers_equal_the_model(runtime, compile) -> None:
    """The text head with its sampler and the whole patch decoder replayed from graphs: the same
    tokens and codes from the same draws of each row's CUDA generator, for every batch bucket."""
    lm, cfg = runtime.lm, runtime.lm.config
    graphs = DecodeGraphs(lm, lm.allocate_cache(SLOTS, POSITIONS), max_batch=MAX_BATCH, scratch_slot=SLOTS - 1,
                          capture=True, compile=compile)
    with torch.inference_mode():
        for rows in (1, 3, 4):
            h = torch.randn(rows, cfg.hidden_size, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
            text = SamplingBatch.from_params(([SPOKEN.text, GREEDY, SamplingParams(1.2, top_k=5)] * 2)[:rows], DEVICE)
            want = sample_text(lm, h, None, text, _gens(10, rows))
            assert torch.equal(graphs.sample_text(h, None, text, _gens(10, rows)), want)
            speech = ([SPOKEN.speech, GREEDY, SamplingParams(0.8, top_k=20, top_p=0.9)] * 2)[:rows]
            want = lm.decode_patch(h, speech, _gens(20, rows))
            got = graphs.decode_patch(h, speech, _gens(20, rows))
            assert got.shape == want.shape == (rows, cfg.group_size, len(cfg.speech_vocab_sizes))
            assert torch.equal(got, want)


def _answer(runtime, **config):
    return short_answer(runtime, SPOKEN, **config)


def test_engine_on_cuda_graphs_answers_as_eager(runtime) -> None:
    eager_engine, eager, eager_codes = _answer(runtime, cuda_graphs=False)
    assert eager_engine.graphs is None
    for config in ({"cuda_graphs": True}, {"cuda_graphs": True, "compile": True}):
        engine, done, codes = _answer(runtime, **config)
        assert engine.graphs is not None and engine.graphs.capture, config
        assert engine.graphs.compiled == config.get("compile", False)
        assert torch.equal(codes.cpu(), eager_codes.cpu()), config
        assert done.status == eager.status and done.transcript == eager.transcript, config
        assert done.timings["speech_patches"] == eager.timings["speech_patches"] > 0, config
