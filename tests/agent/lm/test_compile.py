"""``--compile``: the patch decoder's step through torch.compile (inductor), on a CPU at tiny size.

Inductor's CPU backend builds C++ kernels, so these tests need a C++ compiler (CI installs g++).
The compiled step must give the eager step's results: hidden states within float rounding, the
same codes from the same draws, and an engine on it must answer as the eager engine does.
"""

from __future__ import annotations

import queue
import shutil

import pytest
import torch

from agent.engine import AddUserText, Engine, EngineConfig, Respond, ResponseDone, ResponseParams
from agent.lm import patch_decoder
from agent.lm.patch_decoder import CompiledLocalStep
from agent.lm.sampling import GREEDY, ChannelSampling, SamplingParams
from agent.runtime import load_runtime

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="torch.compile on a CPU needs a C++ compiler (.ci/run installs g++)"),
]


@pytest.fixture(scope="module")
def runtime():
    torch.set_num_threads(1)
    return load_runtime(preset="tiny", device="cpu")


def test_compiled_step_matches_eager(runtime):
    lm = runtime.lm
    g = torch.Generator().manual_seed(0)
    compiled = CompiledLocalStep()
    for batch in (2, 3):  # one compiled graph for every batch size and step
        x = torch.randn(batch, 1, lm.local_transformer.cfg.hidden_size, generator=g)
        k, v = patch_decoder.new_local_cache(lm, batch)
        k.normal_(generator=g)
        v.normal_(generator=g)
        for step in (0, 5, 10):
            with torch.inference_mode():
                want = patch_decoder.local_step(lm, x, step, k.clone(), v.clone())
                got = compiled(lm, x, step, k.clone(), v.clone())
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    h = torch.randn(3, lm.config.hidden_size, generator=g)
    params = [SamplingParams(0.9, top_p=0.95), GREEDY, SamplingParams(0.8, top_k=40)]
    with torch.inference_mode():
        eager = patch_decoder.decode_patch(lm, h, params, [torch.Generator().manual_seed(i) for i in range(3)])
        fused = patch_decoder.decode_patch(lm, h, params, [torch.Generator().manual_seed(i) for i in range(3)],
                                           step=compiled)
    assert torch.equal(eager, fused)


def _answer(runtime, **config) -> tuple[Engine, ResponseDone, torch.Tensor]:
    """A short greedy answer: the engine, its ResponseDone and the answer's codes (patches, 4, 8)."""
    engine = Engine(runtime.lm, runtime.tokenizer, runtime.codec,
                    EngineConfig(max_sessions=2, max_positions=512, **config)).start()
    events: queue.Queue = queue.Queue()
    try:
        handle = engine.open_session(events.put, seed=3)
        handle.submit(AddUserText("u", "Say something"))
        handle.submit(Respond("r", "a", ResponseParams(sampling=ChannelSampling(GREEDY, GREEDY),
                                                       max_output_patches=8, min_patches=8, interleave=(2, 3))))
        while not isinstance(event := events.get(timeout=500), ResponseDone):
            pass
        return engine, event, engine._sessions[handle.sid].items[-1].patches.codes
    finally:
        engine.stop()


def test_engine_with_compile_answers_as_eager(runtime):
    engine, compiled, compiled_codes = _answer(runtime, compile=True)
    assert isinstance(engine.graphs._local_step, CompiledLocalStep)
    _, eager, eager_codes = _answer(runtime)
    assert torch.equal(compiled_codes, eager_codes)
    assert compiled.status == eager.status == "incomplete"
    assert compiled.transcript == eager.transcript
    assert compiled.timings["speech_patches"] == eager.timings["speech_patches"] > 0
