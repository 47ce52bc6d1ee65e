"""Tokenizer configuration: official config.json semantics, presets, validation."""

from __future__ import annotations

import json

import pytest
import torch

from agent.codec import AudioTokenizerConfig, ConfigError, MiMoAudioTokenizer, preset
from agent.codec.tokenizer import official_state_dict

from .conftest import DATA


def test_shipped_values_are_the_defaults():
    cfg = preset("mimo-audio-tokenizer")
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads) == (1280, 32, 20)
    assert cfg.encoder_ffn_dim == 5120
    assert (cfg.decoder_layers, cfg.decoder_attention_heads, cfg.decoder_ffn_dim) == (32, 20, 5120)
    assert (cfg.vocoder_dim, cfg.vocoder_num_layers, cfg.vocoder_attention_heads) == (256, 16, 16)
    assert cfg.codebook_size == [1024, 1024] + [128] * 18
    assert (cfg.n_mels, cfg.nfft, cfg.hop_length, cfg.encoder_skip_layer_id) == (128, 960, 240, 3)
    assert cfg.vocoder_attn_window_size == [40, 10]
    assert cfg.samples_per_token == 960 and cfg.token_rate == 25.0


def test_missing_keys_take_the_official_code_defaults():
    values = json.loads((DATA / "small" / "config.json").read_text())
    del values["n_mels"], values["vocoder_attention_heads"]
    cfg = AudioTokenizerConfig.from_dict(values)
    assert cfg.n_mels == 80  # official code default, not the shipped 128
    assert cfg.vocoder_attention_heads == 4
    # the defaults that differ from the shipped values are not silently "fixed"
    with pytest.raises(ConfigError, match="avg_pooler"):
        AudioTokenizerConfig.from_dict({})


def test_round_trip_and_codebook_list_extension():
    values = {**preset("tiny").to_dict(), "codebook_size": [64, 32], "num_quantizers": 5}
    cfg = AudioTokenizerConfig.from_dict(values)
    assert cfg.codebook_size == [64, 32, 32, 32, 32]  # the last size repeats, as in the official quantizer
    again = AudioTokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ln_type", "RMSNorm", "ln_type"),
        ("encoder_attention_heads", 7, "encoder_attention_heads"),
        ("encoder_skip_layer_id", 99, "encoder_skip_layer_id"),
        ("vocoder_attn_window_size", [40], "vocoder_attn_window_size"),
        ("window_size", 1024, "window_size"),
        ("vocoder_padding", "center", "vocoder_padding"),
    ],
)
def test_unsupported_values_are_refused_by_name(key, value, message):
    with pytest.raises(ConfigError, match=message):
        AudioTokenizerConfig.from_dict({**preset("tiny").to_dict(), key: value})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown tokenizer preset 'huge'"):
        preset("huge")


def test_real_size_parameter_count_and_official_keys():
    with torch.device("meta"):
        tok = MiMoAudioTokenizer(preset("mimo-audio-tokenizer"))
    params = sum(p.numel() for p in tok.parameters())
    assert params == 1_284_653_122  # spec 1.10
    keys = official_state_dict(tok).keys()
    assert sum(k.startswith("encoder.") for k in keys) == 569  # spec 1.9, 80 of them codebook buffers
    assert sum(k.startswith("decoder.") for k in keys) == 736
    assert tuple(tok.state_dict()["decoder.dconv1.conv.weight"].shape) == (1280, 1280, 2)
    assert tuple(tok.state_dict()["decoder.vocoder.head.out.weight"].shape) == (962, 256)
