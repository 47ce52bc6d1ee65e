"""Session configuration: the server's defaults, the canonical (complete) form a session keeps,
and the resolution of per-response parameters."""

from __future__ import annotations

import json
from typing import Any

from streaming import protocol as p
from streaming.actions import ResponseParams
from streaming.audio import SAMPLE_RATE
from streaming.vad import resolve_turn_detection

#: the official demo's default system prompt (``run_mimo_audio.py``)
DEFAULT_INSTRUCTIONS = "You are MiMo-Audio, a friendly AI assistant and your response needs to be concise."
DEFAULT_VOICE = "default"


def default_session_config(model: str | None = None) -> p.SessionConfig:
    """The full configuration a session starts from, before the server's and client's overrides.

    MiMo defaults: the official spoken-dialogue samplers (text T 0.6 / top-p 0.95, speech T 0.9 /
    top-p 0.95; spec 2.8), interleave off (the model decides), codec schedule from the engine."""
    pcm = {"type": "audio/pcm", "rate": SAMPLE_RATE}
    return p.SessionConfig.model_validate(
        {
            "type": "realtime",
            "object": "realtime.session",
            "model": model,
            "output_modalities": ["audio"],
            "instructions": DEFAULT_INSTRUCTIONS,
            "max_output_tokens": "inf",
            "audio": {
                "input": {
                    "format": pcm,
                    "turn_detection": resolve_turn_detection(p.TurnDetection(type="server_vad")).model_dump(),
                    "transcription": None,
                    "noise_reduction": None,
                },
                "output": {"format": pcm, "voice": DEFAULT_VOICE, "speed": 1.0},
            },
            "tools": [],
            "tool_choice": "auto",
            "tracing": None,
            "include": None,
            "truncation": "auto",
            "prompt": None,
            "mimo": {
                "interleave": None,
                "sampling": {
                    "text": {"temperature": 0.6, "top_k": None, "top_p": 0.95},
                    "speech": {"temperature": 0.9, "top_k": None, "top_p": 0.95},
                },
                "codec": {
                    "first_chunk_patches": None,
                    "chunk_patches": None,
                    "left_context_patches": None,
                    "right_holdback_patches": None,
                },
                "task": "spoken_dialogue",
                "thinking": False,
            },
        }
    )


def canonical_session(config: p.SessionConfig, session_id: str) -> p.SessionConfig:
    """Fill in what an update may leave out (formats, turn-detection defaults, speed), so the
    stored configuration, and what ``session.updated`` shows, is complete."""
    data = config.model_dump(mode="json")
    audio = data.get("audio") or {}
    audio_in, audio_out = audio.get("input") or {}, audio.get("output") or {}
    for part in (audio_in, audio_out):
        fmt = part.get("format") or {"type": "audio/pcm"}
        if fmt["type"] == "audio/pcm":
            fmt["rate"] = SAMPLE_RATE
        part["format"] = fmt
    td = audio_in.get("turn_detection")
    if td is not None:
        audio_in["turn_detection"] = resolve_turn_detection(p.TurnDetection.model_validate(td)).model_dump()
    audio_in.setdefault("turn_detection", None)
    if audio_out.get("speed") is None:
        audio_out["speed"] = 1.0
    data["audio"] = {"input": audio_in, "output": audio_out}
    data["id"], data["object"] = session_id, "realtime.session"
    if data.get("mimo") is None:
        data["mimo"] = default_session_config().mimo.model_dump(mode="json")
    return p.SessionConfig.model_validate(data)


#: session fields only the server sets; a client's session object may carry them back (ignored)
SERVER_OWNED = ("id", "object", "model", "expires_at")


def merge_client_session(base: dict[str, Any], session: dict[str, Any] | None) -> dict[str, Any]:
    """``base`` (session settings) with a client's session object over it, validated as a
    ``session.update`` would be: a WebRTC call's ``session`` part, a client secret's ``session``.
    Raises :class:`~streaming.protocol.ProtocolError` naming the field."""
    if not session:
        return base
    event = p.parse_client_event(json.dumps({"type": "session.update", "session": session}))
    patch = event.session.model_dump(mode="json", exclude_unset=True)
    for server_owned in SERVER_OWNED:
        patch.pop(server_owned, None)
    return p.merge_session_update(base, patch)


def fully_set(model: Any) -> Any:
    """A copy whose every field counts as set, so the wire form (``exclude_unset``) shows it all."""
    return type(model).model_validate(model.model_dump())


def _voice_name(voice: p.Voice | None) -> str | None:
    """The response object names its voice with a string (GA's ``RealtimeResponse``): a custom
    voice ``{"id": ...}`` by its id."""
    return voice.id if isinstance(voice, p.VoiceId) else voice


def resolve_response_params(
    config: p.SessionConfig, override: p.ResponseCreateParams | None
) -> ResponseParams:
    """Session settings with ``response.create``'s overrides applied."""
    o = override or p.ResponseCreateParams()
    mimo = config.mimo.model_dump(mode="json")
    if o.mimo is not None:
        patch = {"mimo": o.mimo.model_dump(mode="json", exclude_unset=True)}
        mimo = p.merge_session_update({"mimo": mimo}, patch)["mimo"]
    mimo_cfg = p.MimoConfig.model_validate(mimo)
    out = o.audio.output if o.audio and o.audio.output else None
    fmt = (out.format if out and out.format else config.audio.output.format).type
    max_tokens = o.max_output_tokens if o.max_output_tokens is not None else config.max_output_tokens
    sampling = mimo_cfg.sampling or p.SamplingConfig()
    return ResponseParams(
        output_modalities=p.resolve_modalities(o.output_modalities or config.output_modalities),
        instructions=o.instructions if o.instructions is not None else (config.instructions or ""),
        max_output_tokens=None if max_tokens in (None, "inf") else max_tokens,
        conversation=o.conversation or "auto",
        metadata=o.metadata,
        voice=_voice_name(out.voice if out and out.voice else config.audio.output.voice),
        speed=config.audio.output.speed or 1.0,
        output_format=fmt,
        interleave=p.parse_interleave(mimo_cfg.interleave) if mimo_cfg.interleave else None,
        min_output_tokens=mimo_cfg.min_output_tokens or 0,
        text_sampling=sampling.text or p.SamplingParams(),
        speech_sampling=sampling.speech or p.SamplingParams(),
        codec=mimo_cfg.codec or p.CodecSchedule(),
        task=mimo_cfg.task or "spoken_dialogue",
        thinking=bool(mimo_cfg.thinking),
    )
