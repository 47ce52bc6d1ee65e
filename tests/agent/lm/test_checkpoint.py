"""Loading and saving the language model in the official layout, and the errors on bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from agent.checkpoint import INDEX_NAME, CheckpointError, load_lm, save_lm
from agent.codec import load_audio_tokenizer, save_audio_tokenizer
from agent.lm.config import MiMoAudioConfig
from agent.lm.model import build_preset
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


def test_half_precision_load(tiny, saved_tiny) -> None:
    lm, config, tok = tiny
    half, _, _ = load_lm(saved_tiny, "bf16", "cpu")
    want = torch.bfloat16
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


def test_fp16_is_refused_for_the_lm_with_the_reason(ref_copy) -> None:
    """The official code cannot run the LM in fp16 (speech embeddings built in bf16)."""
    with pytest.raises(CheckpointError, match=r"fp16 is not supported for the language model: .*bf16.*overflow"):
        _load(ref_copy, dtype="fp16")
    with pytest.raises(CheckpointError, match="fp16 is not supported"):
        build_preset("tiny", torch.float16)


@pytest.mark.parametrize("damage", ["truncated", "garbled", "lfs-pointer"])
def test_error_unreadable_weights_names_the_file_and_the_kind(ref_copy, tmp_path, damage) -> None:
    """A broken model.safetensors names its path and whether it is the LM or the audio tokenizer."""
    codec_dir = tmp_path / "codec"
    save_audio_tokenizer(load_audio_tokenizer(None, preset="tiny"), codec_dir)
    for directory in (ref_copy, codec_dir):
        weights = directory / "model.safetensors"
        raw = weights.read_bytes()
        broken = {"truncated": raw[: len(raw) // 2], "garbled": b"\xff" * 8 + raw[8:],
                  "lfs-pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n"}[damage]
        weights.write_bytes(broken)
    path = re.escape(str(ref_copy / "model.safetensors"))
    want = rf"^language model checkpoint {path} is not a readable safetensors"
    with pytest.raises(CheckpointError, match=want) as lm:
        _load(ref_copy)
    path = re.escape(str(codec_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"^audio tokenizer checkpoint {path} is not a readable") as codec:
        load_audio_tokenizer(codec_dir, device="cpu")
    hint = "Git LFS pointer" if damage == "lfs-pointer" else "truncated or corrupted download"
    assert hint in str(lm.value) and hint in str(codec.value)


def test_error_checkpoints_swapped_are_named(ref_copy, tmp_path) -> None:
    codec_dir = save_audio_tokenizer(load_audio_tokenizer(None, preset="tiny"), tmp_path / "codec")
    with pytest.raises(CheckpointError, match=r"codec is a audio tokenizer checkpoint .* pass it as --tokenizer"):
        _load(codec_dir)
    with pytest.raises(CheckpointError, match=r"ckpt is a language model checkpoint .* pass it as --model"):
        load_audio_tokenizer(ref_copy, device="cpu")


def test_error_non_finite_weights_name_the_tensor(ref_copy) -> None:
    def poison(state):
        state["local_transformer.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
        state["model.norm.weight"][0] = float("inf")

    _edit_weights(ref_copy, poison)
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN or Inf\) in tensor\(s\) of language model "
                       r"checkpoint .*ckpt: local_transformer\.layers\.1\.mlp\.up_proj\.weight, model\.norm\.weight"):
        _load(ref_copy)


def test_error_value_beyond_the_load_dtype_is_non_finite(tmp_path) -> None:
    tok = load_audio_tokenizer(None, preset="tiny")
    with torch.no_grad():
        tok.decoder.vocoder.head.out.weight[0, 0] = 1e5  # fp32 holds it, fp16 does not
    save_audio_tokenizer(tok, tmp_path)
    with pytest.raises(CheckpointError, match=r"decoder\.vocoder\.head\.out\.weight \(after conversion to the load"):
        load_audio_tokenizer(tmp_path, dtype="fp16", device="cpu")


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


def _drop_tokens(directory: Path, tokens) -> None:
    tok_json = json.loads((directory / "tokenizer.json").read_text())
    tok_json["added_tokens"] = [t for t in tok_json["added_tokens"] if t["content"] not in tokens]
    tok_json["model"]["vocab"] = {k: v for k, v in tok_json["model"]["vocab"].items() if k not in tokens}
    (directory / "tokenizer.json").write_text(json.dumps(tok_json))


def test_tokenizer_without_mimo_specials_gets_them_added_or_is_named(saved_tiny, tmp_path) -> None:
    """Missing MiMo tokens are added in the official order after the last id; if that is beyond
    the model's vocabulary the error lists exactly which were missing and where they went."""
    shutil.copytree(saved_tiny, tmp_path / "ckpt")
    dropped = ("<|sosp|>", "<|eosp|>", "<|sostm|>", "<|eot|>")
    _drop_tokens(tmp_path / "ckpt", dropped)  # ids up to 268 remain (</think>)
    with pytest.raises(CheckpointError, match=r"tokenizer of .*ckpt has ids up to 272, beyond the model's "
                       r"vocab_size=272; it lacked <\|sosp\|>, <\|eosp\|>, <\|sostm\|>, <\|eot\|>, which were "
                       r"added .* at ids 269, 270, 271, 272$"):
        load_lm(tmp_path / "ckpt", "fp32", "cpu")
    # without <think> and </think> (not needed), there is room: they land at the next free ids, in order
    _drop_tokens(tmp_path / "ckpt", ("<think>", "</think>"))  # ids up to 265 remain (<|eostm|>)
    _, _, tok = load_lm(tmp_path / "ckpt", "fp32", "cpu")
    assert tok.added_tokens == dict(zip(dropped, range(266, 270), strict=True))
    assert (tok.specials.sosp, tok.specials.eosp, tok.specials.sostm, tok.specials.eot) == (266, 267, 268, 269)


def test_error_tokenizer_without_chat_tokens_lists_them(saved_tiny, tmp_path) -> None:
    shutil.copytree(saved_tiny, tmp_path / "ckpt")
    _drop_tokens(tmp_path / "ckpt", ("<|im_start|>", "<|im_end|>"))
    want = r"tokenizer\.json lacks the chat token\(s\) <\|im_start\|>, <\|im_end\|> \("
    with pytest.raises(CheckpointError, match=want):
        load_lm(tmp_path / "ckpt", "fp32", "cpu")


def test_error_broken_tokenizer_config_names_file_and_position(saved_tiny, tmp_path) -> None:
    shutil.copytree(saved_tiny, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"')
    with pytest.raises(CheckpointError, match=r"ckpt/tokenizer_config\.json is not valid JSON: .*line 1 column 27"):
        load_lm(tmp_path / "ckpt", "fp32", "cpu")


def _edit_config(path: Path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    (path / "config.json").write_text(json.dumps(raw))


def test_error_config_type_names_file_and_field(ref_copy) -> None:
    _edit_config(ref_copy, hidden_size="big")
    with pytest.raises(CheckpointError, match=r"ckpt/config\.json: hidden_size='big' must be int$"):
        _load(ref_copy)
    _edit_config(ref_copy, hidden_size=64, rope_theta=[1])
    with pytest.raises(CheckpointError, match=r"config\.json: rope_theta=\[1\] must be float$"):
        _load(ref_copy)
    _edit_config(ref_copy, rope_theta=640000.0, local_layers=0)
    with pytest.raises(CheckpointError, match=r"config\.json: local_layers=0 must be at least 1$"):
        _load(ref_copy)
    (ref_copy / "config.json").write_text('{"hidden_size": 64,\n  "vocab_size": }')
    with pytest.raises(CheckpointError, match=r"ckpt/config\.json is not valid JSON: .* line 2 column 17"):
        _load(ref_copy)


@pytest.mark.parametrize("key", ["hidden_size", "num_key_value_heads", "vocab_size", "rope_theta"])
def test_error_missing_size_key_is_not_defaulted(ref_copy, key) -> None:
    _edit_config(ref_copy, **{key: None})
    with pytest.raises(CheckpointError, match=rf"config\.json: missing key\(s\) {key}: they size the model"):
        _load(ref_copy)


def test_missing_keys_take_the_official_code_defaults(ref_copy) -> None:
    """``input_full_attention`` absent is None in the official config: ``is_causal=not None``, a
    causal patch encoder; ``head_dim`` absent is MiMoAudioConfig's 128."""
    raw = json.loads((ref_copy / "config.json").read_text())
    assert raw["input_full_attention"] is True
    _edit_config(ref_copy, input_full_attention=None)
    config = MiMoAudioConfig.from_dict(json.loads((ref_copy / "config.json").read_text()), empty_token_id=292)
    assert not config.input_full_attention
    lm, _, _ = _load(ref_copy)
    x = torch.randn(1, 4, 32)
    # causal: the first frame's output does not depend on the later ones
    y1, y2 = lm.input_local_transformer(x, causal=True), lm.input_local_transformer(torch.cat([x[:, :1], -x[:, 1:]], 1),
                                                                                     causal=True)
    assert torch.allclose(y1[:, 0], y2[:, 0])
    no_head_dim = {k: v for k, v in raw.items() if k != "head_dim"}
    assert MiMoAudioConfig.from_dict(no_head_dim, empty_token_id=292).head_dim == 128


def test_error_bad_config_value(ref_copy) -> None:
    raw = json.loads((ref_copy / "config.json").read_text())
    raw["speech_zeroemb_idx"] = "16-16-8-8-8-8-8"
    (ref_copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(
        CheckpointError, match=r"speech_zeroemb_idx=.* has 7 entries, expected audio_channels=8"
    ):
        _load(ref_copy)
