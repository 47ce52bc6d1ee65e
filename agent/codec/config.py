"""Configuration of the MiMo-Audio tokenizer (spec 1.1).

The dataclass defaults are the shipped values of ``XiaomiMiMo/MiMo-Audio-Tokenizer``. The official
configuration class has different code defaults (``d_model`` 768, ``n_mels`` 80, ...) that apply
to keys a ``config.json`` leaves out; :meth:`AudioTokenizerConfig.from_dict` reproduces that, so a
``config.json`` means here what it means to the official code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Keys of the official configuration class and the value its code gives a key that is missing.
OFFICIAL_CODE_DEFAULTS: dict[str, Any] = {
    "max_audio_seconds": 1800,
    "stride_size": 2,
    "avg_pooler": 1,
    "d_model": 768,
    "scale_embedding": True,
    "kernel_size": 3,
    "activation_function": "gelu",
    "encoder_layers": 8,
    "encoder_skip_layer_id": None,
    "encoder_attention_heads": 12,
    "encoder_ffn_dim": 3072,
    "encoder_causal": False,
    "encoder_attn_window_size": [-1, -1],
    "decoder_layers": 8,
    "decoder_attention_heads": 12,
    "decoder_ffn_dim": 3072,
    "decoder_kernel_size": 3,
    "decoder_stride_size": 2,
    "decoder_causal": True,
    "decoder_attn_window_size": [-1, -1],
    "nfft": 1024,
    "vocoder_dim": 512,
    "vocoder_intermediate_dim": 4096,
    "vocoder_num_layers": 30,
    "n_mels": 80,
    "sampling_rate": 24000,
    "hop_length": 240,
    "window_size": 1024,
    "vocoder_padding": "same",
    "fmin": 0,
    "fmax": None,
    "num_quantizers": 12,
    "codebook_size": [1024],
    "threshold_ema_dead_code": 10,
    "position_embedding_type": "rope",
    "rope_theta": 10000,
    "rope_type": "default",
    "ln_type": "LayerNorm",
    "vocoder_attention_heads": 4,
    "vocoder_attn_window_size": [40, 10],
}


#: Codebooks the language model uses (the checkpoint has 20).
LM_CODEBOOKS = 8
#: Tokens per LM patch: encoded turns are padded to a multiple of it.
GROUP_SIZE = 4
#: The official pipeline encodes in independent 60 s segments (6000 mel frames) ...
ENCODE_SEGMENT_MEL_FRAMES = 6000
#: ... and decodes in independent 60 s segments (1500 tokens).
DECODE_SEGMENT_TOKENS = 1500


class ConfigError(ValueError):
    """A tokenizer configuration this implementation cannot run; the message names the key."""


#: integer fields that count something: at least 1
_COUNTS = (
    "sampling_rate", "n_mels", "nfft", "window_size", "hop_length", "d_model", "encoder_layers",
    "encoder_attention_heads", "encoder_ffn_dim", "kernel_size", "stride_size", "avg_pooler", "num_quantizers",
    "decoder_layers", "decoder_attention_heads", "decoder_ffn_dim", "decoder_kernel_size", "decoder_stride_size",
    "vocoder_dim", "vocoder_intermediate_dim", "vocoder_num_layers", "vocoder_attention_heads", "max_audio_seconds",
)


@dataclass
class AudioTokenizerConfig:
    """Hyper-parameters of the audio tokenizer, under their official ``config.json`` names."""

    # front end: 24 kHz audio -> 100 Hz log-mel
    sampling_rate: int = 24000
    n_mels: int = 128
    nfft: int = 960
    window_size: int = 960
    hop_length: int = 240
    fmin: float = 0
    fmax: float | None = None
    # encoder: 100 Hz mel -> 50 Hz transformer -> 25 Hz (avg_pooler) -> RVQ
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    encoder_skip_layer_id: int | None = 3
    encoder_causal: bool = False
    encoder_attn_window_size: list[int] = field(default_factory=lambda: [-1, -1])
    kernel_size: int = 3
    stride_size: int = 2
    avg_pooler: int = 2
    scale_embedding: bool = False  # computed but never applied by the official code
    activation_function: str = "gelu"
    # RVQ
    num_quantizers: int = 20
    codebook_size: list[int] = field(default_factory=lambda: [1024, 1024] + [128] * 18)
    threshold_ema_dead_code: int = 2  # training only
    # decoder: 25 Hz -> 50 Hz transformer -> 100 Hz coarse mel
    decoder_layers: int = 32
    decoder_attention_heads: int = 20
    decoder_ffn_dim: int = 5120
    decoder_kernel_size: int = 3
    decoder_stride_size: int = 2
    decoder_causal: bool = True
    decoder_attn_window_size: list[int] = field(default_factory=lambda: [-1, -1])
    # vocoder: 100 Hz coarse mel -> ISTFT -> 24 kHz
    vocoder_dim: int = 256
    vocoder_intermediate_dim: int = 1024
    vocoder_num_layers: int = 16
    vocoder_attention_heads: int = 16
    vocoder_attn_window_size: list[int] = field(default_factory=lambda: [40, 10])
    vocoder_padding: str = "same"
    # shared
    position_embedding_type: str = "rope"
    rope_theta: float = 10000
    rope_type: str = "default"
    ln_type: str = "LayerNorm"
    max_audio_seconds: int = 1800

    def __post_init__(self) -> None:
        from agent.checkpoint import check_field_types

        lists = ("codebook_size", "encoder_attn_window_size", "decoder_attn_window_size", "vocoder_attn_window_size")
        check_field_types(self, ConfigError, counts=_COUNTS, skip=lists)
        for name in lists:
            value = getattr(self, name)
            items = value if isinstance(value, list | tuple) else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
                raise ConfigError(f"{name}={value!r} must be a list of integers")
        sizes = self.codebook_size
        sizes = list(sizes) if isinstance(sizes, list | tuple) else [sizes]
        if not sizes:
            raise ConfigError("codebook_size is empty")
        # the official quantizer repeats the last size for the layers the list leaves out
        if len(sizes) < self.num_quantizers:
            sizes += [sizes[-1]] * (self.num_quantizers - len(sizes))
        self.codebook_size = [int(s) for s in sizes[: self.num_quantizers]]
        for name in ("encoder_attn_window_size", "decoder_attn_window_size", "vocoder_attn_window_size"):
            setattr(self, name, [int(v) for v in getattr(self, name)])
        self.validate()

    # --- derived sizes ---------------------------------------------------------------------------
    @property
    def samples_per_token(self) -> int:
        """Audio samples per 25 Hz token (960 at the shipped values)."""
        return self.hop_length * self.stride_size * self.avg_pooler

    @property
    def mel_frames_per_token(self) -> int:
        return self.stride_size * self.avg_pooler

    @property
    def token_rate(self) -> float:
        return self.sampling_rate / self.samples_per_token

    def validate(self) -> None:
        """Refuse values the official code would not run, or that this implementation does not cover."""
        fixed = {
            "activation_function": "gelu",
            "position_embedding_type": "rope",
            "rope_type": "default",
            "ln_type": "LayerNorm",
            "vocoder_padding": "same",
            "kernel_size": 3,  # the official convs hard-code padding=1, right only for kernel 3
            "stride_size": 2,
            "avg_pooler": 2,
            "decoder_kernel_size": 3,
            "decoder_stride_size": 2,
        }
        for key, want in fixed.items():
            have = getattr(self, key)
            if have != want:
                raise ConfigError(f"unsupported {key}={have!r}: this implementation needs {want!r}")
        for prefix in ("encoder", "decoder", "vocoder"):
            dim = self.vocoder_dim if prefix == "vocoder" else self.d_model
            heads = getattr(self, f"{prefix}_attention_heads")
            if heads <= 0 or dim % heads:
                raise ConfigError(f"{prefix}_attention_heads={heads} does not divide the width {dim}")
            if (dim // heads) % 2:
                raise ConfigError(f"{prefix} head_dim {dim // heads} is odd; rotary embeddings need it even")
            window = getattr(self, f"{prefix}_attn_window_size")
            if len(window) != 2:
                raise ConfigError(f"{prefix}_attn_window_size must be [left, right], got {window}")
        skip = self.encoder_skip_layer_id
        if skip is not None and not 1 <= skip <= self.encoder_layers:
            raise ConfigError(
                f"encoder_skip_layer_id={self.encoder_skip_layer_id} is outside 1..{self.encoder_layers}"
            )
        if self.nfft != self.window_size:
            # the vocoder's ISTFT uses win_length = nfft; the official front end allows them to differ
            # but every shipped configuration has them equal
            raise ConfigError(f"nfft={self.nfft} differs from window_size={self.window_size}")
        if (self.nfft - self.hop_length) % 2:
            raise ConfigError(f"nfft - hop_length = {self.nfft - self.hop_length} must be even ('same' trim)")
        if self.num_quantizers < 1:
            raise ConfigError(f"num_quantizers={self.num_quantizers} must be at least 1")

    # --- (de)serialisation -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AudioTokenizerConfig:
        """Parse an official ``config.json``; missing keys take the official *code* defaults."""
        if not isinstance(values, dict):
            raise ConfigError(f"a tokenizer config must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys outside the official class (Hugging Face metadata, PretrainedConfig's generic
        # fields) do not change the model and are ignored, as the official class ignores them.
        merged = {**OFFICIAL_CODE_DEFAULTS, **{k: v for k, v in values.items() if k in known}}
        try:
            return cls(**merged)
        except TypeError as exc:
            raise ConfigError(f"invalid tokenizer config: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The official ``config.json`` content (with the metadata keys ``save_pretrained`` writes)."""
        out = dataclasses.asdict(self)
        out["architectures"] = ["MiMoAudioTokenizer"]
        out["model_type"] = "mimo_audio_tokenizer"
        return out


def preset(name: str) -> AudioTokenizerConfig:
    """``tiny`` (same architecture, small widths: fast on one CPU core), ``tiny-speech`` (wider, the
    size trained by ``mimo-agent train codec``) or ``mimo-audio-tokenizer``
    (the shipped sizes). The front end, token rate and codebook sizes are the real ones in both, so
    codes from either preset are valid input for the language model."""
    if name == "mimo-audio-tokenizer":
        return AudioTokenizerConfig()
    if name == "tiny":
        return AudioTokenizerConfig(
            d_model=64,
            encoder_layers=4,
            encoder_attention_heads=4,
            encoder_ffn_dim=128,
            encoder_skip_layer_id=2,
            decoder_layers=4,
            decoder_attention_heads=4,
            decoder_ffn_dim=128,
            vocoder_dim=32,
            vocoder_intermediate_dim=64,
            vocoder_num_layers=4,
            vocoder_attention_heads=4,
        )
    if name == "tiny-speech":
        return AudioTokenizerConfig(**TINY_SPEECH)
    raise ConfigError(f"unknown tokenizer preset {name!r}; choose one of {', '.join(PRESETS)}")


#: ``tiny-speech``: the tiny architecture wide enough to carry speech (2.7 M weights and 0.56 M
#: codebook values); the size ``mimo-agent train codec`` trains.
TINY_SPEECH = {
    "d_model": 128, "encoder_layers": 4, "encoder_attention_heads": 4, "encoder_ffn_dim": 512,
    "encoder_skip_layer_id": 2, "decoder_layers": 4, "decoder_attention_heads": 4, "decoder_ffn_dim": 512,
    "vocoder_dim": 128, "vocoder_intermediate_dim": 512, "vocoder_num_layers": 4, "vocoder_attention_heads": 4,
}

PRESETS = ("tiny", "tiny-speech", "mimo-audio-tokenizer")
