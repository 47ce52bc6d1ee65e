"""The memory plan: what --max-sessions costs, checked against the device (or a given limit) before
the KV cache is allocated."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.engine import Engine, EngineConfig
from agent.memory import kv_bytes_per_slot, plan_memory
from agent.runtime import load_runtime

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def runtime():
    return load_runtime(preset="tiny", device="cpu")


def _plan(runtime, sessions: int, limit: int | None = None):
    return plan_memory(runtime.lm, runtime.codec, max_sessions=sessions, max_positions=512, max_batch=64,
                       prefill_chunk=256, extra_slots=0, limit_bytes=limit)


def test_the_plan_counts_kv_codec_state_and_activations(runtime):
    plan = _plan(runtime, 4)
    lm = runtime.lm
    assert plan.lm_kv_bytes_per_session == kv_bytes_per_slot(lm.config, 512, lm.dtype)
    assert plan.lm_kv_bytes_per_session == lm.allocate_cache(1, 512).nbytes  # what the cache really takes
    assert plan.codec_kv_bytes_per_session == runtime.codec.decode_cache_bytes() > 0
    assert plan.weights_bytes > sum(p.numel() * 4 for p in lm.parameters())  # the codec's weights too
    assert plan.activation_bytes > 0
    assert plan.total_bytes == 4 * plan.per_session_bytes + plan.activation_bytes
    assert not plan.limited and plan.available_bytes > 0  # the host's available RAM


def test_max_sessions_that_do_not_fit_are_refused_with_the_figures(runtime):
    limit = _plan(runtime, 3).total_bytes  # room for 3 sessions, not 4
    config = {"max_positions": 512, "memory_limit_bytes": limit}
    with pytest.raises(ValueError) as refused:
        Engine(runtime.lm, runtime.tokenizer, runtime.codec, EngineConfig(max_sessions=4, **config))
    message = str(refused.value)
    plan = _plan(runtime, 4, limit)
    assert "--max-sessions 4 does not fit" in message and "At most 3 sessions fit" in message
    assert f"{plan.total_bytes / 2**20:,.1f} MiB of {limit / 2**20:,.1f} MiB the given limit" in message
    assert f"LM KV {plan.lm_kv_bytes_per_session / 2**20:,.1f} MiB" in message
    # the sessions that fit start, and the check can be overridden
    assert Engine(runtime.lm, runtime.tokenizer, runtime.codec, EngineConfig(max_sessions=3, **config)).plan.fits()
    forced = Engine(runtime.lm, runtime.tokenizer, runtime.codec,
                    EngineConfig(max_sessions=4, memory_check=False, **config))
    assert not forced.plan.fits() and forced.cache.num_slots == 4


def test_serve_refuses_max_sessions_over_its_memory_limit():
    """``--memory-limit-gib`` stands for a small device: serve exits with the plan's figures."""
    proc = subprocess.run(
        [sys.executable, "-m", "streaming.cli", "serve", "--preset", "tiny", "--device", "cpu", "--port", "0",
         "--max-sessions", "64", "--memory-limit-gib", "0.05", "--no-warmup"],
        capture_output=True, text=True, timeout=110)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--max-sessions 64 does not fit" in proc.stderr and "of 51.2 MiB the given limit" in proc.stderr
    assert "lower --max-sessions" in proc.stderr
