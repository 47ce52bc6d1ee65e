"""Loading and saving the official safetensors layout, and the errors on bad checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from agent.checkpoint import CheckpointError
from agent.codec import load_audio_tokenizer, save_audio_tokenizer

from .conftest import DATA


def _codes(tok, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (T,), generator=g) for n in tok.config.codebook_size[:8]], dim=1)


def test_save_load_round_trip(tiny, tmp_path):
    save_audio_tokenizer(tiny, tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    # the official extra buffers are written, so the official code loads it without missing keys
    assert "decoder.vocoder.head.istft.window" in stored
    assert "encoder.quantizer.vq.layers.19._codebook.embed_avg" in stored
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MiMoAudioTokenizer"]
    again = load_audio_tokenizer(tmp_path, dtype="fp32", device="cpu")
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    codes = _codes(tiny)
    np.testing.assert_array_equal(tiny.decode(codes), again.decode(codes))


def test_sharded_and_bf16_checkpoints(tiny, tmp_path):
    save_audio_tokenizer(tiny, tmp_path, dtype="bf16", max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    tok = load_audio_tokenizer(tmp_path, dtype="bf16", device="cpu")
    assert tok.dtype == torch.bfloat16
    assert tok.encoder.quantizer.codebook(0).dtype == torch.float32
    # bf16 storage keeps the codebooks exact
    assert torch.equal(tok.encoder.quantizer.codebook(3), tiny.encoder.quantizer.codebook(3))
    wav = tok.decode(_codes(tiny))
    assert wav.dtype == np.float32 and np.isfinite(wav).all()


def test_checkpoint_without_training_buffers_loads(tmp_path):
    shutil.copy(DATA / "small" / "config.json", tmp_path)
    state = load_file(str(DATA / "small" / "model.safetensors"))
    training_only = ("embed_avg", "cluster_size", "inited", "istft.window")
    kept = {k: v for k, v in state.items() if not k.endswith(training_only)}
    assert len(kept) < len(state)
    save_file(kept, str(tmp_path / "model.safetensors"))
    tok = load_audio_tokenizer(tmp_path, device="cpu")
    reference = load_audio_tokenizer(DATA / "small", device="cpu")
    codes = _codes(tok, seed=3)
    np.testing.assert_array_equal(tok.decode(codes), reference.decode(codes))


def _broken(tmp_path, edit):
    shutil.copy(DATA / "small" / "config.json", tmp_path)
    state = load_file(str(DATA / "small" / "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_key_is_named(tmp_path):
    path = _broken(tmp_path, lambda s: s.pop("decoder.layers.1.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*decoder\.layers\.1\.fc2\.bias"):
        load_audio_tokenizer(path, device="cpu")


def test_wrong_shape_is_named(tmp_path):
    path = _broken(tmp_path, lambda s: s.update({"encoder.conv1.weight": torch.zeros(32, 16, 5)}))
    message = r"wrong shape for encoder\.conv1\.weight: .* has \[32, 16, 5\], the model expects \[32, 16, 3\]"
    with pytest.raises(CheckpointError, match=message):
        load_audio_tokenizer(path, device="cpu")


def test_unexpected_key_is_named(tmp_path):
    path = _broken(tmp_path, lambda s: s.update({"decoder.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\).*decoder\.extra\.weight"):
        load_audio_tokenizer(path, device="cpu")


def test_missing_files_and_bad_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing file.*config\.json"):
        load_audio_tokenizer(tmp_path, device="cpu")
    config = json.loads((DATA / "small" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "ln_type": "RMSNorm"}))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported ln_type='RMSNorm'"):
        load_audio_tokenizer(tmp_path, device="cpu")
    shutil.copy(DATA / "small" / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=r"missing file: no model\.safetensors"):
        load_audio_tokenizer(tmp_path, device="cpu")
    with pytest.raises(CheckpointError, match="not both"):
        load_audio_tokenizer(tmp_path, preset="tiny", device="cpu")


def test_presets_are_seeded():
    a = load_audio_tokenizer(None, preset="tiny", seed=5)
    b = load_audio_tokenizer(None, preset="tiny", seed=5)
    c = load_audio_tokenizer(None, preset="tiny", seed=6)
    assert torch.equal(a.decoder.vocoder.head.out.weight, b.decoder.vocoder.head.out.weight)
    assert not torch.equal(a.decoder.vocoder.head.out.weight, c.decoder.vocoder.head.out.weight)
    assert torch.equal(a.encoder.quantizer.codebook(0), b.encoder.quantizer.codebook(0))
