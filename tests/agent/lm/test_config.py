"""Config parsing, validation and the presets' architecture."""

from __future__ import annotations

import pytest
import torch

from agent.lm.config import ConfigError, MiMoAudioConfig, preset
from agent.lm.model import MiMoAudioLM


def test_mimo_audio_7b_preset_has_the_official_keys_and_sizes() -> None:
    """Spec 2.10/2.11: 719 tensors, 8,018,587,648 parameters, the listed shapes."""
    with torch.device("meta"):
        lm = MiMoAudioLM(preset("mimo-audio-7b").config)
    state = lm.state_dict()
    assert len(state) == 719
    assert sum(t.numel() for t in state.values()) == 8_018_587_648
    shapes = {
        "model.embed_tokens.weight": [151680, 4096],
        "model.layers.35.self_attn.q_proj.bias": [4096],
        "model.layers.0.self_attn.k_proj.weight": [1024, 4096],
        "model.layers.0.self_attn.o_proj.weight": [4096, 4096],
        "model.layers.0.mlp.gate_proj.weight": [11008, 4096],
        "model.norm.weight": [4096],
        "lm_head.weight": [151680, 4096],
        "local_transformer.layers.15.mlp.down_proj.weight": [1024, 4096],
        "local_transformer.norm.weight": [1024],
        "input_local_transformer.layers.5.self_attn.v_proj.bias": [1024],
        "input_local_transformer.norm.weight": [1024],
        "local_transformer_lm_heads.1.weight": [1025, 1024],
        "local_transformer_lm_heads.7.weight": [129, 1024],
        "speech_embeddings.0.weight": [1025, 1024],
        "speech_embeddings.2.weight": [129, 1024],
        "speech_group_downcast.weight": [4096, 4096],
        "hidden_states_downcast.weight": [1024, 4096],
    }
    for key, shape in shapes.items():
        assert list(state[key].shape) == shape, key
    assert not any(k.endswith("o_proj.bias") for k in state)  # o_proj has no bias
    assert [k for k in state if "embed_tokens" in k] == ["model.embed_tokens.weight"]


def test_tiny_preset_keeps_the_architecture() -> None:
    tiny, real = preset("tiny").config, preset("mimo-audio-7b").config
    for field in (
        "speech_vocab_sizes",
        "speech_empty_ids",
        "delays",
        "group_size",
        "audio_channels",
        "local_steps",
    ):
        assert getattr(tiny, field) == getattr(real, field), field
    assert tiny.input_full_attention and tiny.rope_theta == real.rope_theta
    assert (
        tiny.num_attention_heads // tiny.num_key_value_heads
        == real.num_attention_heads // real.num_key_value_heads
    )
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"speech_zeroemb_idx": "1025-1024-128-128-128-128-128-128"},
            r"speech_zeroemb_idx\[0\]=1025 is outside",
        ),
        ({"delay_pattern": "0-1-2"}, "has 3 entries, expected audio_channels=8"),
        ({"delay_pattern": "a-b"}, "is not a dash-separated list of ints"),
        ({"num_key_value_heads": 5}, "not a multiple of num_key_value_heads=5"),
        ({"local_dim": 1000}, "local_dim=1000 is not a multiple of local_attn_heads=64"),
        ({"input_local_dim": 512}, "local_dim=1024 != input_local_dim=512 is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings=true is not supported"),
        ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling=.* is not supported"),
        ({"vocab_size": 1000}, "empty_token_id=151667 is outside vocab_size=1000"),
    ],
)
def test_invalid_configs_are_named(change, message) -> None:
    with pytest.raises(ConfigError, match=message):
        MiMoAudioConfig.from_dict({**preset("mimo-audio-7b").config.to_dict(), **change})
