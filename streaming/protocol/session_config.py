"""The GA session object (``session.update`` / ``session.created``) and its MiMo extension.

Shape follows OpenAI's GA ``RealtimeSessionCreateRequest``: ``type: "realtime"``,
``output_modalities``, ``instructions``, ``max_output_tokens``, ``audio.input.{format,
turn_detection, transcription, noise_reduction}``, ``audio.output.{format, voice, speed}``.
MiMo-specific settings live in one nested object, ``session.mimo``, that stock clients never send
and can ignore when they read it back.

A ``session.update`` carries only the fields that change: :func:`merge_session_update` merges it
into the current configuration (objects listed in ``MERGED_OBJECTS`` merge key by key; every other
field, ``audio.input.turn_detection`` and ``audio.*.format`` included, is replaced whole), and
:func:`upgrade_beta_session` rewrites the beta's flat shape (``modalities``,
``input_audio_format: "pcm16"``, ``turn_detection`` ...) into the GA one.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .base import StrictModel

PCM_RATE = 24000
MAX_VOICE_PROMPT_MS = 20_000
VOICE_DESCRIPTOR_PREFIX = "voice:"
G711_RATE = 8000

AudioFormatType = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
Modality = Literal["text", "audio"]

_BETA_FORMATS: dict[str, dict[str, Any]] = {
    "pcm16": {"type": "audio/pcm", "rate": PCM_RATE},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
}


def unsupported(message: str) -> PydanticCustomError:
    """A validation error that the protocol reports with code ``unsupported_feature``."""
    return PydanticCustomError("unsupported_feature", message)


class AudioFormat(StrictModel):
    """``{"type": "audio/pcm", "rate": 24000}`` (pcm16 little-endian mono), ``{"type": "audio/pcmu"}``
    or ``{"type": "audio/pcma"}`` (G.711 mu-law / A-law, 8 kHz). Anything else is rejected with a
    message that lists what is accepted."""

    type: AudioFormatType = "audio/pcm"
    rate: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _beta_string(cls, value: Any) -> Any:
        # beta clients put "pcm16" / "g711_ulaw" / "g711_alaw" where GA expects an object
        if isinstance(value, str):
            if value in _BETA_FORMATS:
                return dict(_BETA_FORMATS[value])
            raise ValueError(
                f"unknown audio format {value!r}; use {{'type': 'audio/pcm', 'rate': 24000}}, "
                "{'type': 'audio/pcmu'} or {'type': 'audio/pcma'} "
                "(beta names: 'pcm16', 'g711_ulaw', 'g711_alaw')"
            )
        return value

    @field_validator("rate")
    @classmethod
    def _rate(cls, rate: int | None, info: Any) -> int | None:
        kind = info.data.get("type", "audio/pcm")
        if rate is None:
            return rate
        if kind == "audio/pcm" and rate != PCM_RATE:
            raise ValueError(
                f"audio/pcm supports only rate {PCM_RATE} (got {rate}); "
                f"use audio/pcmu or audio/pcma for {G711_RATE} Hz G.711 audio"
            )
        if kind in ("audio/pcmu", "audio/pcma") and rate != G711_RATE:
            raise ValueError(f"{kind} is G.711 at {G711_RATE} Hz (got rate {rate})")
        return rate

    @property
    def sample_rate(self) -> int:
        return PCM_RATE if self.type == "audio/pcm" else G711_RATE


class TurnDetection(StrictModel):
    """``audio.input.turn_detection``: server VAD (webrtcvad or Silero, see ``streaming.vad``) or
    semantic VAD (the same plus a learned end-of-turn model, ``streaming.turn_model``). ``null``
    means manual commits."""

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(default=None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(default=None, ge=0, le=60_000)
    create_response: bool | None = None
    interrupt_response: bool | None = None
    idle_timeout_ms: int | None = Field(default=None, ge=1, le=3_600_000)
    eagerness: Literal["low", "medium", "high", "auto"] | None = None

    @model_validator(mode="after")
    def _fields_match_type(self) -> TurnDetection:
        if self.type == "server_vad" and self.eagerness is not None:
            raise ValueError("eagerness applies to semantic_vad only")
        if self.type == "semantic_vad":
            for name in ("threshold", "prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to server_vad only")
        return self


class NoiseReduction(StrictModel):
    """Accepted for compatibility; this server applies no noise reduction."""

    type: Literal["near_field", "far_field"] | None = None
    strength: float | None = None


class AudioInputConfig(StrictModel):
    format: AudioFormat | None = None
    turn_detection: TurnDetection | None = None
    # set (any object, e.g. {"model": "mimo-asr"}): user audio items are transcribed by the model's
    # own ASR task, reported with conversation.item.input_audio_transcription.* events
    transcription: dict[str, Any] | None = None
    noise_reduction: NoiseReduction | None = None


class VoiceId(StrictModel):
    """A custom voice by id (GA's ``{"id": "voice_1234"}``): accepted and echoed. MiMo speaks in
    the voice of ``session.mimo.voice_prompt``, or its own default."""

    id: str


#: ``audio.output.voice``: a name (built-in voices are names) or a custom voice's id object
Voice = str | VoiceId


class AudioOutputConfig(StrictModel):
    format: AudioFormat | None = None
    voice: Voice | None = None
    speed: float | None = Field(default=None, ge=0.25, le=1.5)


class AudioConfig(StrictModel):
    input: AudioInputConfig | None = None
    output: AudioOutputConfig | None = None


class SamplingParams(StrictModel):
    """Sampling for one channel group. ``top_k`` null or 0 disables top-k; ``temperature`` 0 is greedy."""

    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)


class SamplingConfig(StrictModel):
    """Per channel group: ``text`` (the backbone's text/global sampler) and ``speech`` (the patch
    decoder's local sampler)."""

    text: SamplingParams | None = None
    speech: SamplingParams | None = None


class CodecSchedule(StrictModel):
    """Streaming codec decode schedule, in 160 ms patches. Null fields mean "engine default"."""

    first_chunk_patches: int | None = Field(default=None, ge=1)
    chunk_patches: int | None = Field(default=None, ge=1)
    left_context_patches: int | None = Field(default=None, ge=0)
    right_holdback_patches: int | None = Field(default=None, ge=0)


class MimoConfig(StrictModel):
    """``session.mimo``: MiMo-Audio generation controls.

    ``interleave``: ``"N:M"`` forces N text patches then M speech patches, repeatedly; ``null`` lets
    the model choose per patch. ``task`` picks the prompt layout and sampler defaults (spec 2.8/2.9);
    ``thinking`` opens a ``<think>`` block instead of skipping it where the layout has one.
    """

    interleave: str | None = None
    min_output_tokens: int | None = Field(default=None, ge=0)
    sampling: SamplingConfig | None = None
    codec: CodecSchedule | None = None
    task: Literal["spoken_dialogue", "audio_understanding", "text_chat"] | None = None
    thinking: bool | None = None
    #: the voice to speak with (the official dialogue prompt's "Your voice should be:" segment): base64
    #: pcm16 mono 24 kHz, at most ``MAX_VOICE_PROMPT_MS``. The server echoes a short descriptor
    #: (``"voice:<ms>ms:<hash>"``) in its place; sending the descriptor back keeps the prompt, ``""``
    #: or null clears it.
    voice_prompt: str | None = None
    #: the frame classifier under server_vad and semantic_vad: webrtcvad (null, the default) or
    #: Silero VAD (needs the silero-vad package)
    vad: Literal["webrtcvad", "silero"] | None = None

    @field_validator("interleave")
    @classmethod
    def _interleave(cls, value: str | None) -> str | None:
        if value is not None:
            parse_interleave(value)
        return value


def parse_interleave(value: str) -> tuple[int, int]:
    """``"5:5"`` -> ``(5, 5)``; both counts must be positive integers."""
    parts = value.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or min(int(p) for p in parts) < 1:
        raise ValueError(f"interleave must look like 'N:M' with positive integers N and M (got {value!r})")
    return int(parts[0]), int(parts[1])


class SessionConfig(StrictModel):
    """The GA realtime session object, as sent in ``session.update`` and returned in
    ``session.created`` / ``session.updated``."""

    type: Literal["realtime"] = "realtime"
    # set by the server; a client may send them back (the official SDK round-trips sessions)
    id: str | None = None
    object: Literal["realtime.session"] | None = None
    model: str | None = None
    expires_at: int | None = None

    output_modalities: list[Modality] | None = None
    instructions: str | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    audio: AudioConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # accepted and echoed, without effect here
    tracing: Any = None
    include: list[str] | None = None
    truncation: Any = None
    prompt: Any = None
    reasoning: Any = None
    parallel_tool_calls: bool | None = None

    mimo: MimoConfig | None = None

    @field_validator("output_modalities")
    @classmethod
    def _modalities(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("output_modalities must name 'audio' or 'text'")
        return value

    @field_validator("max_output_tokens")
    @classmethod
    def _max_tokens(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"max_output_tokens must be at least 1 or 'inf' (got {value})")
        return value

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise unsupported("tools (function calling) are not supported by this server; send [] or omit")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if value is not None:
            raise unsupported("prompt templates are not supported by this server; use instructions")
        return value


def resolve_modalities(modalities: list[str] | None) -> tuple[str, ...]:
    """GA allows one output modality; beta's ``["text", "audio"]`` means audio plus its transcript."""
    if modalities is None or "audio" in modalities:
        return ("audio",)
    return ("text",)


# objects that a session.update merges key by key; everything else is replaced whole
MERGED_OBJECTS: frozenset[tuple[str, ...]] = frozenset(
    {
        ("audio",),
        ("audio", "input"),
        ("audio", "output"),
        ("mimo",),
        ("mimo", "sampling"),
        ("mimo", "sampling", "text"),
        ("mimo", "sampling", "speech"),
        ("mimo", "codec"),
    }
)


def merge_session_update(current: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Apply a partial ``session.update`` (as a dict of the fields that were sent) to ``current``."""

    def merge(base: dict[str, Any], patch: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        out = copy.deepcopy(base)
        for key, value in patch.items():
            sub = (*path, key)
            if sub in MERGED_OBJECTS and isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value, sub)
            else:
                out[key] = copy.deepcopy(value)
        return out

    return merge(current, update, ())


_BETA_KEYS = frozenset(
    {
        "modalities",
        "input_audio_format",
        "output_audio_format",
        "turn_detection",
        "input_audio_transcription",
        "input_audio_noise_reduction",
        "voice",
        "speed",
        "max_response_output_tokens",
        "temperature",
    }
)


def is_beta_session(session: dict[str, Any]) -> bool:
    return any(key in session for key in _BETA_KEYS)


def upgrade_beta_session(session: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a beta (flat) session object into the GA shape. GA keys pass through untouched.

    ``temperature`` maps to ``mimo.sampling.text.temperature``. Unknown format strings are left in
    place so that validation reports them under the GA parameter name.
    """
    if not is_beta_session(session):
        return session
    out = {k: v for k, v in session.items() if k not in _BETA_KEYS}
    audio = copy.deepcopy(out.get("audio")) if isinstance(out.get("audio"), dict) else {}
    audio_in = audio.setdefault("input", {}) if isinstance(audio.get("input", {}), dict) else {}
    audio_out = audio.setdefault("output", {}) if isinstance(audio.get("output", {}), dict) else {}

    def beta_format(value: Any) -> Any:
        return dict(_BETA_FORMATS[value]) if isinstance(value, str) and value in _BETA_FORMATS else value

    if "modalities" in session:
        mods = session["modalities"]
        out["output_modalities"] = (
            (["audio"] if "audio" in mods else list(mods)) if isinstance(mods, list) else mods
        )
    if "input_audio_format" in session:
        audio_in["format"] = beta_format(session["input_audio_format"])
    if "output_audio_format" in session:
        audio_out["format"] = beta_format(session["output_audio_format"])
    if "turn_detection" in session:
        audio_in["turn_detection"] = session["turn_detection"]
    if "input_audio_transcription" in session:
        audio_in["transcription"] = session["input_audio_transcription"]
    if "input_audio_noise_reduction" in session:
        audio_in["noise_reduction"] = session["input_audio_noise_reduction"]
    if "voice" in session:
        audio_out["voice"] = session["voice"]
    if "speed" in session:
        audio_out["speed"] = session["speed"]
    if "max_response_output_tokens" in session:
        out["max_output_tokens"] = session["max_response_output_tokens"]
    if "temperature" in session:
        mimo = out.setdefault("mimo", {})
        if isinstance(mimo, dict):
            sampling = mimo.setdefault("sampling", {})
            if isinstance(sampling, dict):
                sampling.setdefault("text", {})["temperature"] = session["temperature"]
    if not audio_in:
        audio.pop("input", None)
    if not audio_out:
        audio.pop("output", None)
    if audio:
        out["audio"] = audio
    out.setdefault("type", "realtime")
    return out
