"""Loading and saving the language model in the official layout, and the errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from agent.checkpoint import INDEX_NAME, CheckpointError, load_lm, save_lm
from agent.lm.config import MiMoAudioConfig
from agent.lm.prompts import PromptBuilder

from .conftest import mixed_prompt
from .reference import FIXTURES, reference_tokenizer


def _last_logits(lm, config, tok) -> torch.Tensor:
    prompt = mixed_prompt(PromptBuilder(tok, config), seed=0)
    cache = lm.allocate_cache(1, 64)
    return lm.text_logits(lm.prefill(cache, 0, lm.embed_patches(*prompt.batch())))


@pytest.fixture(scope="module")
def saved_tiny(tiny, tmp_path_factory) -> Path:
    lm, _, tok = tiny
    return save_lm(lm, tmp_path_factory.mktemp("tiny"), tokenizer=tok)


def test_save_load_round_trip_single_file(tiny, saved_tiny) -> None:
    lm, config, tok = tiny
    assert (saved_tiny / "model.safetensors").is_file() and (saved_tiny / "tokenizer.json").is_file()
    lm2, config2, tok2 = load_lm(saved_tiny, "fp32", "cpu")
    assert config2 == config and tok2.specials == tok.specials
    state, state2 = lm.state_dict(), lm2.state_dict()
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert torch.equal(_last_logits(lm, config, tok), _last_logits(lm2, config2, tok2))


def test_save_load_round_trip_sharded(tiny, tmp_path) -> None:
    lm, _, tok = tiny
    save_lm(lm, tmp_path, tokenizer=tok, max_shard_bytes=1 << 20)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    lm2, _, _ = load_lm(tmp_path, "fp32", "cpu")
    assert all(
        torch.equal(a, b) for a, b in zip(lm.state_dict().values(), lm2.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_load(tiny, saved_tiny, dtype) -> None:
    lm, config, tok = tiny
    half, _, _ = load_lm(saved_tiny, dtype, "cpu")
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert all(p.dtype == want for p in half.parameters())
    assert half.allocate_cache(1, 8).k.dtype == want
    logits = _last_logits(half, config, tok)
    assert logits.dtype == torch.float32
    ref = _last_logits(lm, config, tok)
    assert torch.corrcoef(torch.stack([logits[0], ref[0]]))[0, 1] > 0.99


def test_official_config_round_trip() -> None:
    raw = json.loads((FIXTURES / "small" / "config.json").read_text())
    config = MiMoAudioConfig.from_dict(raw, empty_token_id=292)
    assert config.speech_vocab_sizes == (17, 17, 9, 9, 9, 9, 9, 9)
    assert config.speech_empty_ids == (16, 16, 8, 8, 8, 8, 8, 8)
    assert config.delays == tuple(range(8)) and config.local_steps == 11
    assert config.local().head_dim == 8 and config.input_local().intermediate_size == 128
    out = config.to_dict()
    for key, value in raw.items():  # every official field written back, unused ones included
        assert out[key] == value, key
    assert "empty_token_id" not in out
    single = {"delay_pattern": 0, "speech_zeroemb_idx": 16, "speech_vocab_size": 17}  # one int for all
    ints = MiMoAudioConfig.from_dict({**raw, **single}, empty_token_id=292)
    assert ints.delays == (0,) * 8 and ints.speech_empty_ids == (16,) * 8


# ------------------------------------------------------------------------------------ errors
@pytest.fixture()
def ref_copy(tmp_path) -> Path:
    shutil.copytree(FIXTURES / "small", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _load(path, **kw):
    return load_lm(path, kw.pop("dtype", "fp32"), "cpu", tokenizer=kw.pop("tokenizer", reference_tokenizer()))


def _edit_weights(path: Path, edit) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


def test_error_missing_config(ref_copy) -> None:
    (ref_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing file: .*config\.json"):
        _load(ref_copy)


def test_error_missing_weights(ref_copy) -> None:
    (ref_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        _load(ref_copy)


def test_error_missing_shard(tiny, tmp_path) -> None:
    lm, _, tok = tiny
    save_lm(lm, tmp_path, tokenizer=tok, max_shard_bytes=1 << 20)
    next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"missing file: .*model-00002-of-.*listed in"):
        load_lm(tmp_path, "fp32", "cpu")


def test_error_missing_key(ref_copy) -> None:
    _edit_weights(ref_copy, lambda s: s.pop("local_transformer.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing key\(s\).*local_transformer\.layers\.1\.mlp\.up_proj\.weight"
    ):
        _load(ref_copy)


def test_error_unexpected_key(ref_copy) -> None:
    _edit_weights(ref_copy, lambda s: s.update({"mtp.layers.0.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\).*mtp\.layers\.0\.weight"):
        _load(ref_copy)


def test_error_wrong_shape(ref_copy) -> None:
    _edit_weights(ref_copy, lambda s: s.update({"speech_group_downcast.weight": torch.zeros(64, 100)}))
    want = r"wrong shape for speech_group_downcast\.weight: .* has \[64, 100\], the model expects \[64, 128\]"
    with pytest.raises(CheckpointError, match=want):
        _load(ref_copy)


def test_error_unsupported_stored_dtype(ref_copy) -> None:
    _edit_weights(ref_copy, lambda s: s.update({"lm_head.weight": s["lm_head.weight"].double()}))
    with pytest.raises(CheckpointError, match=r"unsupported dtype torch\.float64 for lm_head\.weight"):
        _load(ref_copy)


def test_error_unsupported_requested_dtype(ref_copy) -> None:
    with pytest.raises(CheckpointError, match="unsupported dtype 'int8'"):
        _load(ref_copy, dtype="int8")


def test_error_device_without_cuda(ref_copy) -> None:
    if torch.cuda.is_available():
        lm, _, _ = load_lm(ref_copy, "fp32", "cuda", tokenizer=reference_tokenizer())
        assert lm.device.type == "cuda"
    else:
        with pytest.raises(CheckpointError, match="CUDA is not available"):
            load_lm(ref_copy, "fp32", "cuda", tokenizer=reference_tokenizer())


def test_error_missing_tokenizer(ref_copy) -> None:
    with pytest.raises(CheckpointError, match=r"missing file: .*tokenizer\.json"):
        load_lm(ref_copy, "fp32", "cpu")  # the default reads the checkpoint's tokenizer


def test_error_tokenizer_without_mimo_specials(saved_tiny, tmp_path) -> None:
    shutil.copytree(saved_tiny, tmp_path / "ckpt")
    tok_json = json.loads((tmp_path / "ckpt" / "tokenizer.json").read_text())
    tok_json["added_tokens"] = [
        t for t in tok_json["added_tokens"] if t["content"] not in ("<|sostm|>", "<|eot|>")
    ]
    tok_json["model"]["vocab"] = {
        k: v for k, v in tok_json["model"]["vocab"].items() if k not in ("<|sostm|>", "<|eot|>")
    }
    (tmp_path / "ckpt" / "tokenizer.json").write_text(json.dumps(tok_json))
    with pytest.raises(CheckpointError, match=r"lacks the MiMo special token\(s\): <\|sostm\|>, <\|eot\|>"):
        load_lm(tmp_path / "ckpt", "fp32", "cpu")


def test_error_bad_config_value(ref_copy) -> None:
    raw = json.loads((ref_copy / "config.json").read_text())
    raw["speech_zeroemb_idx"] = "16-16-8-8-8-8-8"
    (ref_copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(
        CheckpointError, match=r"speech_zeroemb_idx=.* has 7 entries, expected audio_channels=8"
    ):
        _load(ref_copy)
