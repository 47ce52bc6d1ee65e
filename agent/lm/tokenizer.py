"""Text tokenizer: the checkpoint's ``tokenizer.json`` through the ``tokenizers`` library.

Text is encoded without added BOS/EOS (the official code passes ``add_special_tokens=False``);
special strings inside text, such as ``<|im_start|>``, become their single special token. The
special tokens are resolved by string (spec 2.2) following the official loader
(``MimoAudio.__init__``): the chat tokens of the Qwen2 vocabulary must be there; the MiMo tokens
that are missing are added as special tokens in the official order (so a plain Qwen2.5 tokenizer
gets them at the ids right after its last one, where MiMo-Audio has them); ``<think>`` and
``</think>`` are plain prompt text, never looked up.

:class:`ByteTokenizer` is the presets' tokenizer: byte-level (GPT-2 byte alphabet, ids 0..255 are
the bytes), no merges, the same special tokens after the bytes. It is a regular ``tokenizers``
tokenizer, so it saves as ``tokenizer.json`` and reloads through :class:`TextTokenizer`.

Decoding makes the text a person reads (transcripts, the offline commands' output): special
tokens are skipped (the official parser drops ``<|empty|>``, ``<|eot|>`` and ``<|eostm|>`` and
writes the others out, which put ``<|im_start|>`` or ``</think>`` in front of users), bytes that
are not valid UTF-8 are dropped rather than shown as U+FFFD, and so are control characters other
than newline and tab (a byte-level model can emit any byte). The model's context never goes
through text: an assistant turn is kept as its generated tokens. :class:`IncrementalDetokenizer`
produces the same text as deltas, holding back bytes of a character that is not complete yet.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

#: field of :class:`SpecialTokens` -> token string
SPECIAL_TOKEN_STRINGS: dict[str, str] = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "sosp": "<|sosp|>",
    "eosp": "<|eosp|>",
    "empty": "<|empty|>",
    "sostm": "<|sostm|>",
    "eostm": "<|eostm|>",
    "eot": "<|eot|>",
}

#: tokens of the Qwen2 vocabulary the prompts use; the official code does not add them, so a
#: tokenizer without them is refused.
REQUIRED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: the MiMo tokens the official loader adds when missing, in this order (``<|Human|>`` and
#: ``<|SpeechLM|>`` are never used, but adding them keeps the later ids where MiMo has them).
MIMO_ADDED_TOKENS = (
    "<|sosp|>", "<|eosp|>", "<|empty|>", "<|Human|>", "<|SpeechLM|>", "<|sostm|>", "<|eostm|>", "<|eot|>",
)
#: in the byte tokenizer only, as single tokens, so the presets' prompts stay short
_THINK_TOKENS = ("<think>", "</think>")

#: what decoded text never shows: U+FFFD (the decoder's stand-in for bytes that are not UTF-8),
#: C0 controls but tab and newline, DEL and the C1 controls
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]")

#: vocabulary of the byte tokenizer with the default ids: 256 bytes, 13 specials, padding.
BYTE_VOCAB_SIZE = 272

#: the real MiMo-Audio ids (spec 2.2), used by the `mimo-audio-7b` preset. `<think>`/`</think>`
#: are unverified there (possibly plain text); the preset only needs them distinct.
MIMO_SPECIAL_IDS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|sosp|>": 151665,
    "<|eosp|>": 151666,
    "<|empty|>": 151667,
    "<|Human|>": 151668,
    "<|SpeechLM|>": 151669,
    "<|sostm|>": 151670,
    "<|eostm|>": 151671,
    "<|eot|>": 151672,
    "<think>": 151673,
    "</think>": 151674,
}


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file or token at fault."""


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens the prompts and the generation loop use."""

    endoftext: int
    im_start: int
    im_end: int
    sosp: int
    eosp: int
    empty: int
    sostm: int
    eostm: int
    eot: int
    #: the tokenizer's end-of-sequence token (``eos_token`` of tokenizer_config.json, else endoftext)
    eos: int

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class TextTokenizer:
    """encode/decode, special ids and streaming detokenization over a ``tokenizers.Tokenizer``."""

    def __init__(
        self, tokenizer: Tokenizer, *, eos_token: str | None = None, source: str = "tokenizer"
    ) -> None:
        self._tok = tokenizer
        self.source = source
        missing = [t for t in REQUIRED_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(
                f"{source} lacks the chat token(s) {', '.join(missing)} (a MiMo-Audio tokenizer is Qwen2's "
                "vocabulary, which has them; only the MiMo tokens are added when missing)"
            )
        #: MiMo tokens this tokenizer lacked, added in the official order: token -> new id
        self.added_tokens: dict[str, int] = {}
        for token in MIMO_ADDED_TOKENS:
            if tokenizer.token_to_id(token) is None:
                tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
                self.added_tokens[token] = tokenizer.token_to_id(token)
        ids = {name: tokenizer.token_to_id(text) for name, text in SPECIAL_TOKEN_STRINGS.items()}
        eos_id = ids["endoftext"]
        if eos_token is not None:
            resolved = tokenizer.token_to_id(eos_token)
            if resolved is None:
                raise TokenizerError(f"{source}: eos_token {eos_token!r} is not in the vocabulary")
            eos_id = resolved
        self.specials = SpecialTokens(**ids, eos=eos_id)
        #: ids that decode to no text: every special token (the MiMo and chat tokens, and the
        #: checkpoint's other added special tokens)
        self.hidden_ids = frozenset(
            i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special
        ) | frozenset(self.specials.as_dict().values())

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> TextTokenizer:
        """``tokenizer.json`` (and the eos token of ``tokenizer_config.json`` when present)."""
        directory = Path(directory)
        path = directory / TOKENIZER_NAME
        if not path.is_file():
            raise TokenizerError(f"missing file: {path} (the checkpoint's text tokenizer)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise TokenizerError(f"{path} is not a valid tokenizers file: {exc}") from exc
        eos_token = None
        config_path = directory / TOKENIZER_CONFIG_NAME
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as exc:
                raise TokenizerError(f"{config_path} is not valid JSON: {exc}") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"cannot read {config_path}: {exc}") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_path} must hold a JSON object, not {type(config).__name__}")
            eos = config.get("eos_token")
            eos_token = eos.get("content") if isinstance(eos, dict) else eos
            if eos_token is not None and not isinstance(eos_token, str):
                raise TokenizerError(f"{config_path}: eos_token must be a token string, got {eos_token!r}")
        return cls(tokenizer, eos_token=eos_token, source=str(path))

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` into ``directory``."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._tok.save(str(Path(directory) / TOKENIZER_NAME))

    # ------------------------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        """One more than the largest id (added tokens included)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS/EOS added; special strings become special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int:
        """The id of one token string; raises naming it when absent."""
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return token_id

    def decode(self, ids: Iterable[int]) -> str:
        """The readable text of ``ids``: special tokens, invalid bytes and control characters
        dropped (see the module docstring)."""
        return printable(self._decode_raw([i for i in ids if i not in self.hidden_ids]))

    def detokenizer(self) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer (one per response)."""
        return IncrementalDetokenizer(self)

    def _decode_raw(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def printable(text: str) -> str:
    """``text`` without U+FFFD and control characters other than newline and tab."""
    return _UNPRINTABLE.sub("", text)


class IncrementalDetokenizer:
    """Text deltas from tokens pushed one at a time; concatenated they equal :meth:`TextTokenizer.decode`.

    A delta is released once the text decodes without a trailing replacement character, so a
    character whose bytes span several tokens comes out whole; what is not valid text is dropped
    from each delta as :meth:`TextTokenizer.decode` drops it from the whole (a window starts
    after a complete character, where a UTF-8 decoder of the whole starts afresh too). Decoding
    re-reads a short window (the tokens of the previous delta), which keeps it O(1) per token.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens already turned into released text

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        if token_id in self._tokenizer.hidden_ids:
            return ""
        self._ids.append(token_id)
        before = self._tokenizer._decode_raw(self._ids[self._prefix : self._read])
        after = self._tokenizer._decode_raw(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return printable(after[len(before) :])
        return ""

    def flush(self) -> str:
        """Whatever is still held back, less an incomplete character (dropped, as by decode)."""
        before = self._tokenizer._decode_raw(self._ids[self._prefix : self._read])
        after = self._tokenizer._decode_raw(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return printable(after[len(before) :])


def _byte_alphabet() -> list[str]:
    """The GPT-2 byte-to-character map: printable bytes map to themselves, the others to 256+."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


class ByteTokenizer(TextTokenizer):
    """Byte-level tokenizer for the presets: id = byte value, then the special tokens.

    ``special_ids`` maps special strings to ids (default: 256, 257, ... in a fixed order); every
    id must be >= 256 and unique.
    """

    def __init__(self, special_ids: Mapping[str, int] | None = None) -> None:
        specials = [*REQUIRED_TOKENS, *MIMO_ADDED_TOKENS, *_THINK_TOKENS]  # the official order (spec 2.2)
        if special_ids is None:
            special_ids = {s: 256 + i for i, s in enumerate(specials)}
        missing = [s for s in [*SPECIAL_TOKEN_STRINGS.values(), *_THINK_TOKENS] if s not in special_ids]
        if missing:
            raise TokenizerError(f"byte tokenizer special_ids lack: {', '.join(missing)}")
        if min(special_ids.values()) < 256 or len(set(special_ids.values())) != len(special_ids):
            raise TokenizerError("byte tokenizer special ids must be unique and >= 256")
        vocab = {ch: b for b, ch in enumerate(_byte_alphabet())}
        vocab.update(special_ids)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_ids])
        super().__init__(tok, source="byte tokenizer")
