"""The kernel counter behind `mimo-agent bench-lm --kernels` (counts are printed, not bounded here)."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from agent.lm.kernels import count_kernels, patch_kernels, shallow
from agent.lm.model import empty_model, init_weights
from streaming.cli import main


def test_views_are_free_and_a_fused_operator_counts_once(tiny) -> None:
    lm, _, _ = tiny
    x = torch.randn(2, 4, 8)
    q, w = torch.randn(1, 2, 1, 4), torch.ones(3, 8)
    assert count_kernels(lm, lambda: x.view(8, 8).t().transpose(0, 1)[1:]).total == 0
    assert count_kernels(lm, lambda: F.scaled_dot_product_attention(q, q, q)).total == 1
    with torch.inference_mode():  # composites are counted by their parts under inference mode too
        assert count_kernels(lm, lambda: F.linear(x, w)).total == 1


def test_a_shallow_model_scaled_to_full_depth_counts_what_the_full_model_runs(tiny) -> None:
    lm, config, _ = tiny
    small_config, full = shallow(config, 1)
    small = empty_model(small_config, torch.float32, "cpu")
    init_weights(small, 0)
    assert full == {"model": 4, "local_transformer": 2, "input_local_transformer": 1}
    for scaled, real in zip(patch_kernels(small, full), patch_kernels(lm), strict=True):
        assert scaled.total == real.total
        assert scaled.stacks == real.stacks
    text, speech = patch_kernels(lm)
    assert 0 < text.total < speech.total  # a speech patch adds the patch decoder


def test_bench_lm_kernels_json(capsys) -> None:
    assert main(["bench-lm", "--kernels", "--json", "--kernel-layers", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "tiny" and out["scaled_7b"] is None
    assert out["kernels_per_speech_patch"] > out["kernels_per_text_patch"] > 0


def test_compiled_launches_counts_kernel_calls_not_allocations_or_views() -> None:
    from agent.lm.kernels import compiled_launches

    generated = '''
def helper():
    cpp_fused_not_in_call_0(a)
def call(self, args):
    arg0_1, arg1_1 = args
    buf0 = empty_strided_cpu((1, 64), (64, 1), torch.float32)
    cpp_fused_add_mean_mul_pow_rsqrt_0(arg0_1, buf0)
    extern_kernels.addmm(arg1_1, reinterpret_tensor(buf0, (1, 64), (64, 1), 0), out=buf1)
    buf2 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(buf1, buf1, buf1)
    triton_poi_fused_mul_1.run(buf2, 64, stream=stream0)
    del buf0
    return (buf2, )
'''
    assert compiled_launches([generated, "no wrapper here"]) == 4
