"""Protocol models against the golden fixtures: round trips, beta upgrade, validation errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from streaming import protocol as p
from tests.streaming.helpers import FIXTURES, MALFORMED_JSON, ROOT, load_json

CLIENT_FILES = sorted((FIXTURES / "client").glob("*.json"))
SERVER_FILES = sorted((FIXTURES / "server").glob("*.json"))
INVALID_FILES = sorted((FIXTURES / "invalid").glob("*.json"))


def _event_type(path) -> str:
    # "response.create.out_of_band.json" -> "response.create"
    name = path.name.removesuffix(".json")
    for known in sorted({*p.CLIENT_EVENTS, *p.SERVER_EVENTS}, key=len, reverse=True):
        if name == known or name.startswith(known + "."):
            return known
    raise AssertionError(f"fixture {path.name} is not named after an event type")


def test_every_event_type_has_a_fixture():
    assert {_event_type(f) for f in CLIENT_FILES} == set(p.CLIENT_EVENTS)
    assert {_event_type(f) for f in SERVER_FILES} == set(p.SERVER_EVENTS)


@pytest.mark.parametrize("path", CLIENT_FILES, ids=lambda f: f.name)
def test_client_fixture_round_trip(path):
    data = load_json(path)
    event = p.parse_client_event(json.dumps(data))
    assert type(event) is p.CLIENT_EVENTS[_event_type(path)]
    assert event.to_wire() == data
    assert json.loads(event.to_json()) == data
    # the model class alone, as the task names it, round trips too
    assert type(event).model_validate(data).model_dump(mode="json", exclude_unset=True) == data


@pytest.mark.parametrize("path", SERVER_FILES, ids=lambda f: f.name)
def test_server_fixture_round_trip(path):
    data = load_json(path)
    event = p.parse_server_event(json.dumps(data))
    assert type(event) is p.SERVER_EVENTS[_event_type(path)]
    assert event.to_wire() == data
    assert json.loads(event.to_json()) == data


def test_beta_session_update_is_read_as_ga():
    beta = load_json(FIXTURES / "beta" / "session.update.json")
    ga = load_json(FIXTURES / "beta" / "session.update.ga.json")
    event = p.parse_client_event(json.dumps(beta))
    assert event.to_wire() == ga
    assert p.parse_client_event(json.dumps(ga)).to_wire() == ga


@pytest.mark.parametrize(
    "path", [f for f in INVALID_FILES if load_json(f)["stage"] == "parse"], ids=lambda f: f.name
)
def test_invalid_input_is_named(path):
    case = load_json(path)
    message = case["raw"] if "raw" in case else json.dumps(case["send"])
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client_event(message)
    err = info.value
    assert err.code == case["expect"]["code"], err.message
    if "param" in case["expect"]:
        assert err.param == case["expect"]["param"], err.message
    assert err.message  # a human-readable explanation
    if isinstance(case.get("send"), dict) and "event_id" in case["send"]:
        assert err.event_id == case["send"]["event_id"]


def test_invalid_messages_name_the_value():
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client_event(
            '{"type":"session.update","session":{"audio":{"input":{"format":'
            '{"type":"audio/pcm","rate":16000}}}}}'
        )
    assert "24000" in info.value.message and "16000" in info.value.message
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client_event('{"type":"session.update","session":{"foo":1}}')
    assert info.value.message == "Unknown parameter: 'session.foo'."


@pytest.mark.parametrize(("name", "message", "needle"), MALFORMED_JSON, ids=[c[0] for c in MALFORMED_JSON])
def test_pathological_json_is_refused_naming_the_problem(name, message, needle):
    for data in (message, message.encode()):
        with pytest.raises(p.ProtocolError) as info:
            p.parse_client_event(data)
        assert info.value.code == p.ErrorCode.INVALID_JSON, info.value.message
        assert needle in info.value.message, info.value.message


def test_oversized_and_binary_messages():
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client_event(b'{"type":"input_audio_buffer.commit"}' + b" " * 100, max_bytes=64)
    assert info.value.code == p.ErrorCode.MESSAGE_TOO_LARGE
    assert type(p.parse_client_event(b'{"type":"input_audio_buffer.commit"}')) is p.InputAudioBufferCommit
    with pytest.raises(p.ProtocolError) as info:
        p.parse_client_event(b"\xff\xfe")
    assert info.value.code == p.ErrorCode.INVALID_JSON


def test_audio_formats():
    assert p.AudioFormat.model_validate({"type": "audio/pcm", "rate": 24000}).sample_rate == 24000
    assert p.AudioFormat.model_validate({"type": "audio/pcmu"}).sample_rate == 8000
    assert p.AudioFormat.model_validate({"type": "audio/pcma", "rate": 8000}).sample_rate == 8000
    assert p.AudioFormat.model_validate("g711_alaw").type == "audio/pcma"


def test_session_update_merges_containers_and_replaces_leaves():
    current = p.SessionConfig.model_validate(
        load_json(FIXTURES / "server" / "session.created.json")["session"]
    )
    update = p.parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "audio": {
                        "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 800}},
                        "output": {"voice": "marin"},
                    },
                    "mimo": {"sampling": {"speech": {"top_k": 20}}},
                },
            }
        )
    )
    merged = p.merge_session_update(
        current.model_dump(mode="json"), update.session.model_dump(mode="json", exclude_unset=True)
    )
    cfg = p.SessionConfig.model_validate(merged)
    assert cfg.audio.input.turn_detection.silence_duration_ms == 800
    assert cfg.audio.input.turn_detection.threshold is None  # turn_detection replaced whole
    assert cfg.audio.input.format.type == "audio/pcm"  # sibling kept
    assert cfg.audio.output.voice == "marin" and cfg.audio.output.speed == 1.0
    assert cfg.mimo.sampling.speech.top_k == 20 and cfg.mimo.sampling.speech.temperature == 0.9
    assert cfg.mimo.sampling.text.temperature == 0.6


def test_parse_server_event_is_lenient():
    event = p.parse_server_event('{"type":"response.mcp_call.in_progress","event_id":"e","item_id":"i"}')
    assert isinstance(event, p.UnknownServerEvent) and event.type == "response.mcp_call.in_progress"
    assert event.model_extra["item_id"] == "i"
    # a known type with a field this version does not know still parses as the known type
    event = p.parse_server_event('{"type":"input_audio_buffer.cleared","event_id":"e","extra":1}')
    assert isinstance(event, p.InputAudioBufferCleared)


def test_server_events_built_in_code_carry_type_and_event_id():
    event = p.InputAudioBufferSpeechStarted(audio_start_ms=100, item_id="item_1")
    wire = event.to_wire()
    assert wire["type"] == "input_audio_buffer.speech_started"
    assert wire["event_id"].startswith("event_")
    assert set(wire) == {"type", "event_id", "audio_start_ms", "item_id"}


def test_protocol_client_and_session_import_without_torch():
    code = (
        "import streaming, streaming.protocol, streaming.audio, streaming.vad, streaming.session, "
        "streaming.client, streaming.talk, streaming.cli; import sys; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
