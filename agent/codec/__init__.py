"""The MiMo-Audio tokenizer: 24 kHz audio <-> 25 Hz RVQ codes (8 of 20 codebooks used by the LM),
offline and streaming. See :class:`MiMoAudioTokenizer`."""

from .audio import AudioError, load_wav, write_wav
from .config import PRESETS, AudioTokenizerConfig, ConfigError, preset
from .incremental import IncrementalEncodeConfig, IncrementalEncoder
from .streaming import DecodeSchedule, DecodeStream, NormStatistics, norm_statistics
from .tokenizer import (
    GROUP_SIZE,
    LM_CODEBOOKS,
    MiMoAudioTokenizer,
    load_audio_tokenizer,
    pad_codes_to_group,
    save_audio_tokenizer,
)

__all__ = [
    "GROUP_SIZE",
    "LM_CODEBOOKS",
    "PRESETS",
    "AudioError",
    "AudioTokenizerConfig",
    "ConfigError",
    "DecodeSchedule",
    "DecodeStream",
    "IncrementalEncodeConfig",
    "IncrementalEncoder",
    "MiMoAudioTokenizer",
    "NormStatistics",
    "load_audio_tokenizer",
    "load_wav",
    "norm_statistics",
    "pad_codes_to_group",
    "preset",
    "save_audio_tokenizer",
    "write_wav",
]
