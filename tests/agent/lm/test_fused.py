"""q/k/v and gate/up as one matmul each (``agent.lm.transformer.FusedLinear``): the official
parameters stay (a checkpoint loads and saves as it is) and are views of the fused weight."""

from __future__ import annotations

import torch

from agent.checkpoint import load_lm, save_lm
from agent.lm.model import build_preset
from agent.lm.transformer import MLP, Attention


def _layers(lm):
    for stack in (lm.model, lm.local_transformer, lm.input_local_transformer):
        for layer in stack.layers:
            yield layer.self_attn, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
            yield layer.mlp, (layer.mlp.gate_proj, layer.mlp.up_proj)


def _unfused(layers, x):
    return tuple(torch.nn.functional.linear(x, layer.weight, layer.bias) for layer in layers)


def _check_fused(lm) -> None:
    """Every fused projection equals its layers run one by one, and holds no copy of them."""
    g = torch.Generator().manual_seed(0)
    for module, layers in _layers(lm):
        fused = module.fused
        assert all(layer.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
                   for layer in layers)
        x = torch.randn(3, layers[0].in_features, generator=g).to(lm.dtype)
        with torch.inference_mode():
            for got, want in zip(fused(x), _unfused(layers, x), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_saved_and_loaded_checkpoint_lands_in_the_fused_weights(tiny, tmp_path) -> None:
    lm, _, tokenizer = tiny
    loaded, _, _ = load_lm(save_lm(lm, tmp_path, tokenizer=tokenizer), "fp32", tokenizer=tokenizer)
    assert loaded.state_dict().keys() == lm.state_dict().keys()  # the official names, nothing added
    _check_fused(loaded)
    for (a, _), (b, _) in zip(_layers(loaded), _layers(lm), strict=True):
        assert torch.equal(a.fused.weight, b.fused.weight)


def test_weights_changed_in_place_and_moved_stay_fused() -> None:
    lm, _, _ = build_preset("tiny")
    attn = lm.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.mul_(2.0)  # an edit of an official parameter is an edit of the fused weight
    q, k = attn.q_proj.out_features, attn.k_proj.out_features
    assert torch.equal(attn.fused.weight[q : q + k], attn.k_proj.weight)
    lm.to(torch.bfloat16)  # each parameter is copied on its own, then fused again
    assert attn.fused.weight.dtype == torch.bfloat16
    _check_fused(lm)


def test_trained_layers_run_one_by_one_so_gradients_reach_them(tiny) -> None:
    lm, _, _ = tiny
    cfg = lm.local_transformer.cfg
    for module in (Attention(cfg), MLP(cfg)):
        x = torch.randn(2, cfg.hidden_size)
        outs = module.fused(x)
        sum(o.sum() for o in outs).backward()
        assert all(layer.weight.grad is not None for layer in module.fused.layers)
