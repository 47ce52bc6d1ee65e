"""Text tokenizers: round trips, special tokens, streaming detokenization."""

from __future__ import annotations

import json
import random
import re

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from agent.lm.config import preset
from agent.lm.tokenizer import (
    MIMO_ADDED_TOKENS,
    SPECIAL_TOKEN_STRINGS,
    ByteTokenizer,
    TextTokenizer,
    TokenizerError,
)

SAMPLES = [
    "Hello, world!",
    "héllo wörld",
    "你好，世界",
    "emoji 🎉👍🏽 mixed 中文 text",
    "  spaces\n\tand tabs  ",
]


def _bpe(with_specials=True) -> TextTokenizer:
    """A small Qwen2-style byte-level BPE trained here (the real tokenizer.json is not available offline)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 50, trainer)
    specials = list(SPECIAL_TOKEN_STRINGS.values()) if with_specials else ["<|im_start|>", "<|sosp|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return TextTokenizer(tok)


@pytest.mark.parametrize("make", [ByteTokenizer, _bpe], ids=["bytes", "bpe"])
def test_round_trip_and_specials(make) -> None:
    tok = make()
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    s = tok.specials
    for name, string in SPECIAL_TOKEN_STRINGS.items():
        assert tok.encode(string) == [getattr(s, name)]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == s.im_start and ids[-1] == s.im_end and len(ids) > 2
    # readable text: every special token vanishes
    assert tok.decode([s.empty, *tok.encode("ok"), s.eot, s.eostm]) == "ok"
    assert tok.decode(tok.encode("<|im_start|>assistant\na<|im_end|>")) == "assistant\na"


@pytest.mark.parametrize("make", [ByteTokenizer, _bpe], ids=["bytes", "bpe"])
def test_incremental_detokenizer_never_splits_characters(make) -> None:
    tok = make()
    for text in SAMPLES:
        ids = tok.encode(text)
        ids = [x for i in ids for x in (i, tok.specials.empty)]  # hidden tokens in between
        detok = tok.detokenizer()
        deltas = [detok.push(i) for i in ids]
        deltas.append(detok.flush())
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)
    # a character cut off at the end is dropped on flush, as decode drops it
    detok = tok.detokenizer()
    partial = list("你".encode())[:2] if make is ByteTokenizer else None
    if partial is not None:
        assert detok.push(partial[0]) == "" and detok.push(partial[1]) == ""
        assert detok.flush() == "" and tok.decode(partial) == ""


#: what a transcript must never show
_UNREADABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]|<\\|[A-Za-z]+\\|>|</?think>")


def test_what_a_random_model_writes_reads_as_text() -> None:
    """A byte-level model can emit any id: special tokens, control bytes, bytes that are not UTF-8
    (a lone continuation byte, a lead byte cut off by a special). The text, whole or streamed,
    shows none of them, keeps every valid character (multi-byte ones split over tokens too) and
    the streamed deltas add up to the whole."""
    tok = ByteTokenizer()
    s = tok.specials
    sample = "héllo 你好 🎉\tok\n"
    noise = [0x01, 0x1B, 0x7F, 0xFF, 0x80, *"€".encode()[:2], s.im_start, *"😀".encode()[:3], s.eostm,
             267, 268, s.im_end, 0xC2, 0x85, s.endoftext]  # 267, 268: <think>, </think>; C2 85: U+0085
    ids = [*tok.encode(sample[:6]), *noise, *tok.encode(sample[6:]), *noise]
    assert tok.decode(ids) == sample
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        text = tok.decode(ids)
        assert not _UNREADABLE.search(text), (ids, text)
        detok = tok.detokenizer()
        deltas = [detok.push(i) for i in ids] + [detok.flush()]
        assert "".join(deltas) == text, ids


def test_bpe_decoding_skips_every_special_token() -> None:
    tok = _bpe()
    ids = [tok.specials.im_start, *tok.encode("hello"), tok.specials.sosp, *tok.encode(" world"), tok.specials.im_end]
    assert tok.decode(ids) == "hello world"
    detok = tok.detokenizer()
    assert "".join([*(detok.push(i) for i in ids), detok.flush()]) == "hello world"


def test_byte_tokenizer_fits_the_tiny_preset_and_reloads(tmp_path) -> None:
    tok = ByteTokenizer()
    config = preset("tiny").config
    assert tok.vocab_size <= config.vocab_size
    assert config.empty_token_id == tok.specials.empty
    assert tok.encode("\x00\xff".encode("latin-1").decode("latin-1"))  # any text encodes
    assert tok.encode("A") == [65]  # id = byte value
    tok.save(tmp_path)
    again = TextTokenizer.from_dir(tmp_path)
    assert again.specials == tok.specials and again.encode("héllo") == tok.encode("héllo")


def test_missing_chat_tokens_are_named_exactly() -> None:
    with pytest.raises(TokenizerError, match=r"lacks the chat token\(s\) <\|endoftext\|>, <\|im_end\|> \("):
        _bpe(with_specials=False)
    with pytest.raises(TokenizerError, match="special_ids lack"):
        ByteTokenizer({"<|sosp|>": 300})


def _qwen25_like(path, extra=()) -> None:
    """A tokenizer.json laid out like Qwen2.5's: a byte-level BPE, then its added tokens
    (<|endoftext|>, <|im_start|>, <|im_end|>, ...), and no MiMo tokens, no <think>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["think about the answer, then speak"] * 20, trainer)
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", *extra]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in added])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


def test_qwen25_tokenizer_gets_the_mimo_tokens_added_in_official_order(tmp_path) -> None:
    """The official loader adds each missing MiMo token in order: on a Qwen2.5 vocabulary they land
    right after its last id (where MiMo-Audio has them); <think> is plain text, not required."""
    _qwen25_like(tmp_path)
    base = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    last = max(base.get_vocab(with_added_tokens=True).values())
    assert base.token_to_id("<think>") is None
    tok = TextTokenizer.from_dir(tmp_path)
    assert list(tok.added_tokens) == list(MIMO_ADDED_TOKENS)
    assert list(tok.added_tokens.values()) == list(range(last + 1, last + 1 + len(MIMO_ADDED_TOKENS)))
    s = tok.specials
    assert (s.sosp, s.eosp, s.empty) == (last + 1, last + 2, last + 3)
    assert (s.sostm, s.eostm, s.eot) == (last + 6, last + 7, last + 8)
    assert s.eos == s.im_end
    for token in MIMO_ADDED_TOKENS:
        assert tok.encode(token) == [tok.added_tokens[token]]
    think = tok.encode("<think>\n\n</think>\n")  # the prompts' empty think block, as text
    assert len(think) > 3 and tok.decode(think) == "<think>\n\n</think>\n"
    # a tokenizer that has some of them keeps their ids and gets only the others
    _qwen25_like(tmp_path, extra=["<|sosp|>", "<|eosp|>", "<|empty|>"])
    partial = TextTokenizer.from_dir(tmp_path)
    assert list(partial.added_tokens) == list(MIMO_ADDED_TOKENS[3:])
    assert partial.specials.empty == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id("<|empty|>")


def test_broken_tokenizer_config_names_the_file_and_position(tmp_path) -> None:
    _qwen25_like(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",\n "pad_token": }')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is not valid JSON: .*line 2 column 15"):
        TextTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": 7}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: eos_token must be a token string, got 7"):
        TextTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is not a valid tokenizers file"):
        TextTokenizer.from_dir(tmp_path)


def test_eos_token_from_tokenizer_config(tmp_path) -> None:
    tok = ByteTokenizer()
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert TextTokenizer.from_dir(tmp_path).specials.eos == tok.specials.im_end
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|nope|>"}}))
    with pytest.raises(TokenizerError, match=r"eos_token '<\|nope\|>' is not in the vocabulary"):
        TextTokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="missing file"):
        TextTokenizer.from_dir(tmp_path / "elsewhere")
