"""Configuration of the MiMo-Audio language model.

:class:`MiMoAudioConfig` mirrors the official ``config.json`` (a Qwen2 config plus the MiMo-Audio
fields, spec 2.1): it is built from that file with :meth:`MiMoAudioConfig.from_dict` and written
back with the official field names by :meth:`MiMoAudioConfig.to_json`. The three transformers of
the model (backbone, patch decoder, patch encoder) share one block design; :class:`StackConfig`
holds the sizes of one of them, derived exactly as the official ``local_config()`` and
``input_local_config()`` do.

Presets are configs plus a seed for the random weights: ``tiny`` (the real architecture at CPU
sizes, byte-level text vocabulary) and ``mimo-audio-7b`` (the real sizes, spec 2.1).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from agent.checkpoint import check_field_types

#: the ``<|empty|>`` id of the real MiMo tokenizer (spec 2.2); ``load_lm`` resolves it from the
#: checkpoint's tokenizer, so this default only matters for configs built by hand.
MIMO_EMPTY_TOKEN_ID = 151667


#: keys ``config.json`` must have: they size the weights (or, for ``rope_theta``, change every
#: output), and the official code would silently give a missing one Qwen2's generic default.
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rope_theta",
)

#: what the official code gives the other keys when ``config.json`` lacks them: ``Qwen2Config``'s
#: defaults, then ``MiMoAudioConfig``'s (``head_dim`` 128 whatever the width; ``input_full_attention``
#: None, which makes the patch encoder causal: ``is_causal=not config.input_full_attention``).
OFFICIAL_CODE_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "head_dim": 128,
    "input_full_attention": None,
}


class ConfigError(ValueError):
    """A config that does not describe a valid MiMo-Audio language model."""


def parse_int_list(value: str | int | list[int] | tuple[int, ...], length: int, name: str) -> tuple[int, ...]:
    """``"1025-1025-129"``, ``[1025, 1025, 129]`` or a single int repeated ``length`` times.

    The official code accepts a dash-separated string or one int for every channel (spec 2.1).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an int or a dash-separated list of ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * length
    if isinstance(value, str):
        try:
            items = [int(s) for s in value.split("-")] if "-" in value else [int(value)] * length
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a dash-separated list of ints") from None
    else:
        items = [int(v) for v in value]
    if len(items) != length:
        raise ConfigError(f"{name}={value!r} has {len(items)} entries, expected audio_channels={length}")
    return tuple(items)


@dataclass(frozen=True)
class StackConfig:
    """Sizes of one Qwen2 transformer stack (backbone, patch decoder or patch encoder)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float


@dataclass
class MiMoAudioConfig:
    """The official config fields (names as in ``config.json``) and the parsed speech settings."""

    # Qwen2 backbone
    vocab_size: int = 151680
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 640000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # MiMo-Audio
    speech_vocab_size: str | int = "1025-1025-129-129-129-129-129-129"
    speech_zeroemb_idx: str | int = "1024-1024-128-128-128-128-128-128"
    delay_pattern: str | int = "0-1-2-3-4-5-6-7"
    group_size: int = 4
    audio_channels: int = 8
    local_dim: int = 1024
    local_layers: int = 16
    local_attn_heads: int = 64
    local_ffn_dim: int = 4096
    local_attn_dropout: float = 0.1
    input_local_layers: int = 6
    input_local_dim: int | None = None
    #: bidirectional attention inside a patch in the patch encoder; None (the official default) is
    #: causal. The shipped checkpoints set true.
    input_full_attention: bool | None = None
    #: not an official field: the codebooks of the speech the model hears (its ``<|sosp|>`` ..
    #: ``<|eosp|>`` segments: user turns, voice prompts) that it reads; the finer ones enter as the
    #: empty ids. None (the official behaviour) reads all. A tiny model trained on synthetic voices
    #: otherwise recognises an utterance by its fine codes, which a 1-LSB change of the audio
    #: redraws, instead of learning what was said.
    input_speech_codebooks: int | None = None
    #: not an official config field: the text id of ``<|empty|>``, which marks speech patches.
    #: ``load_lm`` takes it from the checkpoint's tokenizer.
    empty_token_id: int = MIMO_EMPTY_TOKEN_ID
    #: official fields we do not use, kept so ``to_json`` writes them back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.input_local_dim is None:
            self.input_local_dim = self.local_dim
        self.validate()

    # ----------------------------------------------------------------------------- parsed fields
    @property
    def speech_vocab_sizes(self) -> tuple[int, ...]:
        """Vocabulary size of each RVQ channel, the empty id included (1025, 1025, 129, ...)."""
        return parse_int_list(self.speech_vocab_size, self.audio_channels, "speech_vocab_size")

    @property
    def speech_empty_ids(self) -> tuple[int, ...]:
        """The id that means "no code" in each channel (1024, 1024, 128, ...)."""
        return parse_int_list(self.speech_zeroemb_idx, self.audio_channels, "speech_zeroemb_idx")

    @property
    def delays(self) -> tuple[int, ...]:
        """Delay of each channel inside a patch, in patch-decoder steps (0, 1, ..., 7)."""
        return parse_int_list(self.delay_pattern, self.audio_channels, "delay_pattern")

    @property
    def local_steps(self) -> int:
        """Sequential patch-decoder steps per patch: group_size + max delay (11)."""
        return self.group_size + max(self.delays)

    def backbone(self) -> StackConfig:
        return StackConfig(
            hidden_size=self.hidden_size,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
        )

    def local(self) -> StackConfig:
        """The patch decoder (``local_transformer``): like the official ``local_config()``."""
        return StackConfig(
            hidden_size=self.local_dim,
            num_layers=self.local_layers,
            num_heads=self.local_attn_heads,
            num_kv_heads=self.local_attn_heads,
            head_dim=self.local_dim // self.local_attn_heads,
            intermediate_size=self.local_ffn_dim,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
        )

    def input_local(self) -> StackConfig:
        """The patch encoder (``input_local_transformer``): like ``input_local_config()``; it also
        uses ``local_attn_heads`` and an FFN of 4x its width (spec 2.1)."""
        dim = int(self.input_local_dim)  # set in __post_init__
        return StackConfig(
            hidden_size=dim,
            num_layers=self.input_local_layers,
            num_heads=self.local_attn_heads,
            num_kv_heads=self.local_attn_heads,
            head_dim=dim // self.local_attn_heads,
            intermediate_size=dim * 4,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
        )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent field."""
        # the dash-separated speech fields are checked by parse_int_list below
        check_field_types(self, ConfigError, counts=_COUNTS,
                          skip=("extra", "speech_vocab_size", "speech_zeroemb_idx", "delay_pattern"))
        for name in ("rope_theta", "rms_norm_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be positive")
        sizes, empties, delays = self.speech_vocab_sizes, self.speech_empty_ids, self.delays
        for c, (size, empty) in enumerate(zip(sizes, empties, strict=True)):
            if not 0 <= empty < size:
                raise ConfigError(f"speech_zeroemb_idx[{c}]={empty} is outside speech_vocab_size[{c}]={size}")
        n = self.input_speech_codebooks
        if n is not None and not 1 <= n <= self.audio_channels:
            raise ConfigError(f"input_speech_codebooks={n} must be between 1 and audio_channels={self.audio_channels}")
        if min(delays) < 0:
            raise ConfigError(f"delay_pattern={self.delay_pattern!r} has a negative delay")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name, dim in (("local_dim", self.local_dim), ("input_local_dim", self.input_local_dim)):
            if dim % self.local_attn_heads:
                raise ConfigError(
                    f"{name}={dim} is not a multiple of local_attn_heads={self.local_attn_heads}"
                )
        if self.local_dim != self.input_local_dim:
            # the official model would add `speech_embeddings_to_local` here; no checkpoint has it.
            raise ConfigError(
                f"local_dim={self.local_dim} != input_local_dim={self.input_local_dim} is not supported "
                "(the speech embeddings feed both local transformers)"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (Qwen2 uses silu)")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=true is not supported (MiMo-Audio has its own lm_head)")
        if not 0 <= self.empty_token_id < self.vocab_size:
            raise ConfigError(f"empty_token_id={self.empty_token_id} is outside vocab_size={self.vocab_size}")

    # -------------------------------------------------------------------------------- JSON I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> MiMoAudioConfig:
        """Build from a parsed official ``config.json``; unknown keys are kept in ``extra``."""
        if not isinstance(data, dict):
            raise ConfigError(f"the config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "empty_token_id"}
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ConfigError(
                f"missing key(s) {', '.join(missing)}: they size the model and have no safe default"
            )
        known = {**OFFICIAL_CODE_DEFAULTS, **{k: v for k, v in data.items() if k in names}}
        extra = {k: v for k, v in data.items() if k not in names}
        if extra.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported (MiMo-Audio uses full attention)")
        if extra.get("rope_scaling"):
            raise ConfigError(f"rope_scaling={extra['rope_scaling']!r} is not supported (plain RoPE only)")
        known.update(overrides)
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str, **overrides: Any) -> MiMoAudioConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The official ``config.json`` fields (``empty_token_id`` lives in the tokenizer)."""
        out: dict[str, Any] = {"architectures": ["MiMoAudioForCausalLM"], "model_type": "qwen2"}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "empty_token_id"):
                out[f.name] = getattr(self, f.name)
        if self.input_speech_codebooks is None:  # ours, not official: written only when set
            del out["input_speech_codebooks"]
        return out

    def to_json(self, path: str | None = None) -> str:
        """The config as official ``config.json`` text; written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text


#: integer fields that count something: at least 1
_COUNTS = (*REQUIRED_KEYS[:-1], "head_dim", "max_position_embeddings", "group_size", "audio_channels",
           "local_dim", "local_layers", "local_attn_heads", "local_ffn_dim", "input_local_layers", "input_local_dim")


@dataclass(frozen=True)
class Preset:
    """A named config and the seed of its random weights."""

    name: str
    config: MiMoAudioConfig
    seed: int


def _tiny() -> MiMoAudioConfig:
    from agent.lm.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer

    # Same architecture as the real model (8 channels, real codebook sizes, 4-frame patches, delays
    # 0..7, bidirectional patch encoder), dims small enough for many patches/s on one CPU core.
    return MiMoAudioConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,  # 4 query heads per key head, as the real model's 32:8
        head_dim=32,
        local_dim=64,
        local_layers=2,
        local_attn_heads=4,
        local_ffn_dim=256,
        input_local_layers=1,
        input_local_dim=64,
        input_full_attention=True,
        empty_token_id=ByteTokenizer().specials.empty,
    )


def preset(name: str) -> Preset:
    """The preset called ``name`` (``tiny`` or ``mimo-audio-7b``)."""
    if name == "tiny":
        return Preset("tiny", _tiny(), seed=20250921)
    if name == "mimo-audio-7b":
        # the real sizes (spec 2.1) with the real text vocabulary; weights are random.
        return Preset("mimo-audio-7b", MiMoAudioConfig(input_full_attention=True), seed=7)
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")


PRESET_NAMES = ("tiny", "mimo-audio-7b")
