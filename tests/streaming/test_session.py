"""The sans-I/O session: event sequences, server VAD turns, barge-in, truncation, limits, errors.

The tests play the engine bridge's part by calling the feedback methods with real audio arrays."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from streaming import actions as act
from streaming import audio as A
from streaming import protocol as p
from streaming.session import (
    RealtimeSession,
    SessionLimits,
    SessionOptions,
    SessionState,
    SessionStateError,
    Transport,
)
from tests.streaming.helpers import DATA, FIXTURES, load_json

HELLO, _ = A.read_wav(DATA / "speech_hello_padded.wav")  # speech 0.6 s .. 2.87 s, 3.87 s total
YES, _ = A.read_wav(DATA / "speech_yes.wav")
STOP, _ = A.read_wav(DATA / "speech_stop.wav")
SILENCE_1S = np.zeros(24000, np.int16)


class ManualClock:
    """Time that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(*, transport=Transport.WEBSOCKET, limits=None, config=None, stream_input=True, speculate=False, **session):
    """A started session (streaming input on: the server turns it on with streaming prefill or
    speculation)."""
    clock = ManualClock()
    options = SessionOptions(transport=transport, limits=limits or SessionLimits(), stream_input=stream_input,
                             speculate=speculate)
    s = RealtimeSession(options, clock=clock)
    s.start(config)
    if session:
        send(s, {"type": "session.update", "session": session})
    s.take_events(), s.take_actions()
    return s, clock


def send(s: RealtimeSession, event: dict) -> None:
    s.receive(json.dumps(event))


def append(s: RealtimeSession, pcm: np.ndarray, chunk: int = 480) -> None:
    for i in range(0, len(pcm), chunk):
        send(s, {"type": "input_audio_buffer.append", "audio": A.b64encode_audio(pcm[i : i + chunk])})


def types(events) -> list[str]:
    return [e.type for e in events]


def errors(events) -> list[p.ErrorDetail]:
    return [e.error for e in events if e.type == "error"]


MANUAL = {"audio": {"input": {"turn_detection": None}}}


def engine_actions(s: RealtimeSession) -> list[act.Action]:
    """The session's actions but the streamed input (checked on its own)."""
    return [a for a in s.take_actions() if not isinstance(a, act.StreamUserAudio)]


def play_audio_response(s, response_id, audio=YES, text=("Yes, ", "please."), chunk=2400):
    """The engine's part: text leads the audio it speaks, audio follows in chunks."""
    s.response_started(response_id)
    pieces = np.array_split(audio, len(text))
    for words, piece in zip(text, pieces, strict=True):
        s.response_text(response_id, words)
        for i in range(0, len(piece), chunk):
            s.response_audio(response_id, piece[i : i + chunk])


# ----------------------------------------------------------------------------------------------
# lifecycle


def test_start_emits_the_full_configuration():
    s = RealtimeSession(clock=ManualClock(), wall_clock=lambda: 1_700_000_000.0)
    assert s.state is SessionState.PENDING
    s.start({"mimo": {"interleave": "5:5"}}, model="mimo-audio-tiny")
    (created,) = s.take_events()
    wire = created.to_wire()
    assert wire["type"] == "session.created"
    session = wire["session"]
    golden = load_json(FIXTURES / "server" / "session.created.json")["session"]
    assert set(golden) <= set(session)  # every field of the golden shape is present
    assert session["id"] == s.id and session["model"] == "mimo-audio-tiny"
    assert session["expires_at"] == 1_700_000_000 + 30 * 60
    assert session["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert (
        session["mimo"]["interleave"] == "5:5" and session["mimo"]["sampling"]["text"]["temperature"] == 0.6
    )
    (update,) = s.take_actions()
    assert isinstance(update, act.UpdateSession) and update.config.mimo.interleave == "5:5"
    with pytest.raises(SessionStateError):
        s.start()


def test_pending_queues_session_update_and_refuses_audio():
    s = RealtimeSession(clock=ManualClock())
    send(s, {"type": "session.update", "session": {"instructions": "Be brief."}})
    send(s, {"type": "input_audio_buffer.append", "audio": A.b64encode_audio(SILENCE_1S[:480])})
    s.push_audio(SILENCE_1S[:480])
    refused = s.take_events()
    assert [e.error.code for e in refused] == ["session_not_ready", "session_not_ready"]
    s.start()
    created, updated = s.take_events()
    assert created.type == "session.created" and updated.type == "session.updated"
    assert updated.session.instructions == "Be brief."


def test_session_update_merges_and_echoes_the_full_session():
    s, _ = make()
    send(
        s,
        {"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"voice": "marin"}}}},
    )
    (updated,) = s.take_events()
    assert updated.session.audio.output.voice == "marin"
    assert updated.session.audio.input.turn_detection.type == "server_vad"  # untouched sibling
    send(
        s,
        {
            "type": "session.update",
            "session": {
                "audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}
            },
        },
    )
    (updated,) = s.take_events()
    td = updated.to_wire()["session"]["audio"]["input"]["turn_detection"]
    assert td["type"] == "semantic_vad" and td["eagerness"] == "high" and td["create_response"] is True


def test_beta_session_update_is_accepted():
    s, _ = make()
    s.receive((FIXTURES / "beta" / "session.update.json").read_text())
    (updated,) = s.take_events()
    cfg = updated.session
    assert cfg.output_modalities == ["audio"] and cfg.audio.output.format.type == "audio/pcmu"
    assert cfg.audio.input.turn_detection.threshold == 0.6 and cfg.mimo.sampling.text.temperature == 0.8
    assert cfg.mimo.sampling.speech.temperature == 0.9  # merged, not replaced


# ----------------------------------------------------------------------------------------------
# bad input: every case answers with a named error and the session keeps working


@pytest.mark.parametrize("path", sorted((FIXTURES / "invalid").glob("*.json")), ids=lambda f: f.name)
def test_invalid_input_then_the_session_goes_on(path):
    case = load_json(path)
    s, _ = make()
    s.receive(case["raw"] if "raw" in case else json.dumps(case["send"]))
    (err,) = errors(s.take_events())
    assert err.code == case["expect"]["code"], err.message
    if "param" in case["expect"]:
        assert err.param == case["expect"]["param"]
    if isinstance(case.get("send"), dict) and "event_id" in case["send"]:
        assert err.event_id == case["send"]["event_id"]
    assert s.state is SessionState.ACTIVE
    send(s, {"type": "input_audio_buffer.clear", "event_id": "evt_next"})
    assert types(s.take_events()) == ["input_audio_buffer.cleared"]


def test_oversized_message():
    s, _ = make(limits=SessionLimits(max_message_bytes=1000))
    append(s, SILENCE_1S[:4800], chunk=4800)  # 9.6 kB of pcm -> 12.8 kB of base64
    (err,) = errors(s.take_events())
    assert err.code == "message_too_large" and "1000" in err.message
    append(s, SILENCE_1S[:240], chunk=240)
    assert s.take_events() == []


def test_rate_limit_then_recovery():
    s, clock = make(limits=SessionLimits(max_events_per_second=10, max_events_burst=5))
    for _ in range(7):
        send(s, {"type": "input_audio_buffer.clear"})
    events = s.take_events()
    assert types(events).count("input_audio_buffer.cleared") == 5
    assert [e.code for e in errors(events)] == ["rate_limit_exceeded"] * 2
    clock.advance(0.2)  # two tokens back
    send(s, {"type": "input_audio_buffer.clear"})
    assert types(s.take_events()) == ["input_audio_buffer.cleared"]


def test_input_buffer_is_bounded():
    s, _ = make(limits=SessionLimits(max_input_buffer_ms=500), **MANUAL)
    append(s, SILENCE_1S[:9600], chunk=4800)  # 400 ms fits
    append(s, SILENCE_1S[:4800], chunk=4800)  # 200 more does not
    (err,) = errors(s.take_events())
    assert err.code == "input_audio_buffer_full"
    send(s, {"type": "input_audio_buffer.commit"})
    events = s.take_events()
    assert types(events)[0] == "input_audio_buffer.committed"
    (audio,) = [a for a in s.take_actions() if isinstance(a, act.AppendUserAudio)]
    assert len(audio.pcm) == 9600


def test_session_duration_limit_closes():
    s, clock = make(limits=SessionLimits(max_session_s=60))
    clock.advance(59)
    s.tick()
    assert s.take_events() == []
    clock.advance(1)
    s.tick()
    (err,) = errors(s.take_events())
    assert err.code == "session_expired" and "1 minutes" in err.message
    assert isinstance(s.take_actions()[-1], act.Close) and s.state is SessionState.CLOSED
    send(s, {"type": "input_audio_buffer.clear"})
    assert s.take_events() == []


def test_bridge_misuse_raises():
    s, _ = make(**MANUAL)
    with pytest.raises(SessionStateError):
        s.response_text("resp_unknown", "x")
    send(s, {"type": "response.create", "response": {"output_modalities": ["text"]}})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    with pytest.raises(SessionStateError, match="text-only"):
        s.response_audio(create.response_id, YES[:100])


# ----------------------------------------------------------------------------------------------
# a full server-VAD turn


def test_server_vad_turn_and_audio_response():
    s, _ = make()
    append(s, HELLO)  # 20 ms appends, like a microphone
    events = s.take_events()
    assert types(events) == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "rate_limits.updated",
    ]
    started, stopped, committed, added, _, created, rate = events
    assert 250 <= started.audio_start_ms <= 400  # 600 ms onset minus 300 ms padding
    assert 3250 <= stopped.audio_end_ms <= 3500  # 2.87 s offset plus the 500 ms window
    item_id = started.item_id
    assert stopped.item_id == committed.item_id == added.item.id == item_id
    assert committed.previous_item_id is None
    assert added.item.role == "user" and added.item.content[0].type == "input_audio"
    assert created.response.status == "in_progress" and created.response.output == []
    # OpenAI's rate_limits.updated follows every response.created; here the client event bucket
    (limit,) = rate.rate_limits
    assert limit.name == "requests" and limit.limit == SessionLimits().max_events_burst
    assert 0 < limit.remaining <= limit.limit and limit.reset_seconds >= 0

    *streamed, user_audio, create = s.take_actions()
    assert isinstance(user_audio, act.AppendUserAudio) and user_audio.item_id == item_id
    span = HELLO[started.audio_start_ms * 24 : stopped.audio_end_ms * 24]
    assert np.array_equal(user_audio.pcm, span)  # exactly the committed span, padding included
    # while the user spoke, the turn's audio went to the engine as it came (streaming input), a patch
    # (160 ms) at least at a time: from the committed span's start up to the last whole part before
    # the append that ended the turn (the detector decides a little behind the audio)
    assert streamed and all(isinstance(a, act.StreamUserAudio) and a.item_id == item_id for a in streamed)
    so_far = HELLO[started.audio_start_ms * 24:][:sum(len(a.pcm) for a in streamed)]
    assert np.array_equal(np.concatenate([a.pcm for a in streamed]), so_far)
    assert len(so_far) >= len(span) - 960 - 24 * SessionOptions().stream_part_ms
    assert isinstance(create, act.CreateResponse) and create.response_id == created.response.id
    assert create.params.output_modalities == ("audio",) and create.params.conversation == "auto"
    assert create.params.text_sampling.temperature == 0.6 and create.params.max_output_tokens is None

    rid = create.response_id
    play_audio_response(s, rid)
    s.response_done(
        rid,
        usage={"input_tokens": 300, "output_tokens": 50, "total_tokens": 350},
        timings={"prefill_ms": 20.0, "first_audio_ms": 80.0},
    )
    events = s.take_events()
    kinds = types(events)
    assert kinds[:3] == [
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    tail = kinds[-6:]
    assert tail == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    middle = kinds[3:-6]
    assert set(middle) == {"response.output_audio_transcript.delta", "response.output_audio.delta"}
    assert middle[0] == "response.output_audio_transcript.delta"
    deltas = [e for e in events if e.type == "response.output_audio.delta"]
    audio = np.concatenate([A.pcm16_from_bytes(base64.b64decode(d.delta)) for d in deltas])
    assert np.array_equal(audio, YES)
    for e in events[:-1]:
        if hasattr(e, "response_id"):
            assert e.response_id == rid
    assert events[1].previous_item_id == item_id  # the assistant item follows the user item
    done = events[-1].response
    assert done.status == "completed" and done.status_details.type == "completed"
    assert done.output[0].content[0].transcript == "Yes, please."
    assert done.output[0].status == "completed"
    assert done.usage.total_tokens == 350 and done.mimo.timings["first_audio_ms"] == 80.0
    assert done.mimo.audio_ms == pytest.approx(len(YES) / 24)
    wire = events[-1].to_wire()
    assert wire["response"]["output"][0]["content"][0] == {
        "type": "output_audio",
        "transcript": "Yes, please.",
    }
    assert s.take_actions() == []
    # the conversation now holds the user turn and the assistant reply
    assert [i.role for i in s.conversation] == ["user", "assistant"]


def test_manual_commit_and_text_only_response():
    s, _ = make(**MANUAL)
    append(s, YES[:1200])  # 50 ms: too short
    send(s, {"type": "input_audio_buffer.commit", "event_id": "evt_c"})
    (err,) = errors(s.take_events())
    assert (
        err.code == "input_audio_buffer_commit_empty" and "50.00ms" in err.message and err.event_id == "evt_c"
    )
    append(s, YES[1200:])
    assert s.take_events() == []  # no VAD events in manual mode
    send(s, {"type": "input_audio_buffer.commit"})
    assert types(s.take_events()) == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    (audio,) = s.take_actions()
    assert np.array_equal(audio.pcm, YES)  # nothing was lost to the refused commit
    send(
        s,
        {
            "type": "response.create",
            "response": {
                "output_modalities": ["text"],
                "instructions": "Be terse.",
                "max_output_tokens": 64,
                "metadata": {"k": "v"},
            },
        },
    )
    created, _rate = s.take_events()
    (create,) = s.take_actions()
    assert create.params.output_modalities == ("text",) and create.params.instructions == "Be terse."
    assert create.params.max_output_tokens == 64 and created.response.metadata == {"k": "v"}
    rid = create.response_id
    s.response_text(rid, "Sure")
    s.response_text(rid, ", done.")
    s.response_done(rid)
    events = s.take_events()
    assert types(events) == [
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    assert events[2].part.type == "text" and events[5].text == "Sure, done."
    assert events[-1].response.output[0].content[0].model_dump(exclude_none=True) == {
        "type": "output_text",
        "text": "Sure, done.",
    }


def test_one_response_at_a_time_and_cancel():
    s, _ = make(**MANUAL)
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    s.take_events()
    send(s, {"type": "response.create", "event_id": "evt_2"})
    (err,) = errors(s.take_events())
    assert err.code == "conversation_already_has_active_response" and err.event_id == "evt_2"
    send(s, {"type": "response.cancel", "response_id": "resp_other"})
    assert [e.code for e in errors(s.take_events())] == ["response_cancel_not_active"]
    play_audio_response(s, create.response_id, audio=YES[:4800], text=("Yes",))
    s.take_events()
    send(s, {"type": "response.cancel"})
    # the cancel completes at once: response.done does not wait for the engine
    events = s.take_events()
    assert types(events) == ["response.output_audio.done", "response.output_audio_transcript.done",
                             "response.content_part.done", "response.output_item.done",
                             "conversation.item.done", "response.done"]
    done = events[-1].response
    assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"
    assert done.output[0].status == "incomplete" and done.output[0].content[0].transcript == "Yes"
    assert s.take_actions() == [act.CancelResponse(create.response_id, "client_cancelled"),
                                act.FlushOutputAudio(create.response_id)]
    s.response_audio(create.response_id, YES[4800:9600])  # in flight before the engine saw the cancel
    s.response_text(create.response_id, " more")
    s.response_done(create.response_id, "completed")  # the engine's late confirmation
    assert s.take_events() == []  # all dropped
    send(s, {"type": "response.create"})
    assert types(s.take_events()) == ["response.created", "rate_limits.updated"]  # free again


def test_cancel_then_truncate_keeps_the_truncation():
    """Clients send the pair back to back: the engine's late confirmation must not restore the item."""
    s, _ = make(**MANUAL)
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    play_audio_response(s, create.response_id, audio=YES[:9600], text=("Yes, ", "please."))
    s.take_events()
    send(s, {"type": "response.cancel"})
    send(s, {"type": "conversation.item.truncate", "item_id": create.item_id, "content_index": 0,
             "audio_end_ms": 200})
    assert "conversation.item.truncated" in types(s.take_events())
    s.response_audio(create.response_id, YES[9600:14400])
    s.response_done(create.response_id, "completed", timings={"total_ms": 1.0})
    assert s.take_events() == []
    send(s, {"type": "conversation.item.retrieve", "item_id": create.item_id})
    (retrieved,) = s.take_events()
    assert retrieved.item.content[0].transcript == "Yes, "  # the truncation's transcript, not the full one
    assert s.conversation.get(create.item_id).audio_ms == 200
    # the item is 200 ms long now: a truncate to a later time is refused
    send(s, {"type": "conversation.item.truncate", "item_id": create.item_id, "content_index": 0,
             "audio_end_ms": 300})
    assert errors(s.take_events())[0].param == "audio_end_ms"


def test_cancel_then_delete_deletes():
    """LiveKit's truncate(audio_end_ms=0) is a cancel then a delete of the item, in one breath."""
    s, _ = make(**MANUAL)
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    play_audio_response(s, create.response_id, audio=YES[:4800], text=("Yes",))
    s.take_events(), s.take_actions()
    send(s, {"type": "response.cancel"})
    send(s, {"type": "conversation.item.delete", "item_id": create.item_id})
    events = s.take_events()
    assert errors(events) == []
    assert types(events)[-2:] == ["response.done", "conversation.item.deleted"]
    assert s.take_actions()[-1] == act.DeleteItem(create.item_id)
    assert create.item_id not in s.conversation


def test_cancel_while_the_finished_response_still_plays_stops_its_audio():
    """The engine is ahead of real time: a response may be generated while its audio (and its
    response.done) still wait in the paced output. For the client it is still running."""
    s, clock = make(**MANUAL)
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    play_audio_response(s, create.response_id, audio=YES[:48000], text=("Yes",))  # 2 s
    s.response_done(create.response_id)
    (done,) = [e for e in s.take_events() if e.type == "response.done"]
    s.take_actions()
    clock.advance(1.0)
    send(s, {"type": "response.cancel"})
    assert s.take_events() == []  # no error: it was generated, and stops now
    # and its response.done, if still queued behind the audio, says so
    assert s.take_actions() == [act.FlushOutputAudio(create.response_id, cancelled="client_cancelled")]
    item_id = done.response.output[0].id  # not all of it was heard: incomplete, as if cancelled in progress
    send(s, {"type": "conversation.item.retrieve", "item_id": item_id})
    (retrieved,) = s.take_events()
    assert retrieved.item.status == "incomplete"
    clock.advance(1.5)  # played out: now it is over for the client too
    send(s, {"type": "response.cancel"})
    assert [e.code for e in errors(s.take_events())] == ["response_cancel_not_active"]


def test_webrtc_cut_truncates_the_item_to_what_was_played():
    s, _ = make(transport=Transport.WEBRTC, **MANUAL)
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    play_audio_response(s, create.response_id, audio=YES[:24000], text=("Yes, ", "please."))
    s.take_events()
    send(s, {"type": "response.cancel"})
    events = s.take_events()
    assert types(events)[0] == "output_audio_buffer.cleared" and types(events)[-1] == "response.done"
    (flush,) = [a for a in s.take_actions() if isinstance(a, act.FlushOutputAudio)]
    assert flush.cut
    s.output_audio_cut(create.response_id, 9600)  # the track had played 400 ms of it
    (truncated,) = s.take_events()
    assert truncated.type == "conversation.item.truncated" and truncated.audio_end_ms == 400
    (truncate,) = s.take_actions()
    assert isinstance(truncate, act.TruncateItem) and truncate.audio_end_ms == 400
    s.output_audio_cut(create.response_id, 9600)  # nothing more to cut
    assert s.take_events() == [] and s.take_actions() == []
    send(s, {"type": "output_audio_buffer.clear"})  # the usual cancel + clear pair: one cleared in all
    assert s.take_events() == []


def test_barge_in_cancels_flushes_and_the_next_turn_follows():
    s, _ = make()
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    rid = create.response_id
    play_audio_response(s, rid, audio=YES[:12000], text=("Yes",))
    s.take_events()
    append(s, np.concatenate([SILENCE_1S[:12000], STOP]))  # the user talks over the reply
    events = s.take_events()
    assert types(events)[0] == "input_audio_buffer.speech_started"
    done = events[-1].response
    assert done.status == "cancelled" and done.status_details.reason == "turn_detected"
    assert engine_actions(s) == [act.CancelResponse(rid, "turn_detected"), act.FlushOutputAudio(rid)]
    s.response_audio(rid, YES[12000:14400])
    assert s.take_events() == []
    s.response_done(rid)
    append(s, SILENCE_1S)  # the user stops: the turn is committed and answered
    assert types(s.take_events()) == [
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "rate_limits.updated",
    ]
    append_audio, create2 = engine_actions(s)
    assert isinstance(append_audio, act.AppendUserAudio)
    assert isinstance(create2, act.CreateResponse) and create2.response_id != rid


def test_interrupt_response_false_lets_the_reply_finish():
    s, _ = make(audio={"input": {"turn_detection": {"type": "server_vad", "interrupt_response": False}}})
    send(s, {"type": "response.create"})
    s.take_actions(), s.take_events()
    append(s, np.concatenate([SILENCE_1S[:12000], STOP]))
    assert types(s.take_events()) == ["input_audio_buffer.speech_started"]
    assert engine_actions(s) == []


def test_a_turn_ending_at_its_candidate_end_releases_the_speculated_answer():
    """Server VAD with OpenAI's defaults: 200 ms into the silence the engine is asked for a held answer
    to the turn so far; at speech_stopped the commit and the response release it. The client's events
    are those of a session without speculation."""
    plain, _ = make()
    append(plain, HELLO)
    s, _ = make(speculate=True)
    append(s, HELLO)
    events = s.take_events()
    assert types(events) == types(plain.take_events())
    started = events[0]
    actions = engine_actions(s)
    assert [type(a) for a in actions] == [act.Speculate, act.AppendUserAudio, act.CreateResponse]
    spec, user_audio, create = actions
    assert spec.item_id == user_audio.item_id == started.item_id
    assert spec.params == create.params  # what releases it
    # the turn's audio up to 200 ms into the silence (speech ends at 2.87 s)
    assert 2870 + 200 <= started.audio_start_ms + spec.samples / 24 <= 2870 + 200 + 60
    assert spec.samples < len(user_audio.pcm)
    assert spec.end_in_s == pytest.approx(0.3)  # the turn ends 500 ms into the silence at the earliest
    assert not spec.ends_early


@pytest.mark.parametrize(("td", "end_in_s"), [({"type": "server_vad", "silence_duration_ms": 900}, 0.7),
                                              ({"type": "semantic_vad", "eagerness": "high"}, 0.4)])
def test_a_speculation_says_when_the_turn_may_end_at_the_earliest(td, end_in_s):
    """The silence window's rest after the candidate end (semantic_vad: its window when the model is
    unsure; a confident score ends the turn sooner, and the commit releases what is held then)."""
    s, _ = make(speculate=True, audio={"input": {"turn_detection": td}})
    append(s, HELLO[:24 * 3150])
    (spec,) = [a for a in engine_actions(s) if isinstance(a, act.Speculate)]
    assert spec.end_in_s == pytest.approx(end_in_s)
    assert spec.ends_early == (td["type"] == "semantic_vad")  # a confident score ends it sooner


def test_streamed_input_goes_in_patch_sized_parts_and_whole_before_a_speculation():
    """A client's 20 ms appends reach the engine's thread as parts of at least 160 ms (a job per
    append filled the engine's queue whenever it lagged, and a speculation then found no headroom);
    a speculation is asked for only after all the audio it covers."""
    s, _ = make(speculate=True)
    append(s, HELLO)  # 20 ms appends
    actions = s.take_actions()
    kinds = [type(a) for a in actions]
    spec_at = kinds.index(act.Speculate)
    streamed = [a for a in actions[:spec_at] if isinstance(a, act.StreamUserAudio)]
    part = 24 * SessionOptions().stream_part_ms
    assert len(streamed) >= 10 and all(len(a.pcm) >= part for a in streamed[:-1])
    assert sum(len(a.pcm) for a in streamed) >= actions[spec_at].samples  # its audio, all there before it
    assert len(streamed) <= len(HELLO) // part + 2  # not one per append (~190)


def test_speech_after_a_candidate_end_abandons_the_speculation():
    pause = np.zeros(24 * 300, np.int16)  # longer than the candidate (200 ms), shorter than the window
    audio = np.concatenate([HELLO[:24 * 2900], pause, STOP, SILENCE_1S])
    plain, _ = make()
    append(plain, audio)
    s, _ = make(speculate=True)
    append(s, audio)
    assert types(s.take_events()) == types(plain.take_events())  # one turn, the same events
    kinds = [type(a) for a in engine_actions(s)]
    assert kinds == [act.Speculate, act.AbandonSpeculation, act.Speculate, act.AppendUserAudio, act.CreateResponse]


@pytest.mark.parametrize("case", ["no_create_response", "response_active", "cleared"])
def test_no_speculation_where_the_turn_would_not_be_answered(case):
    # (interrupt_response false: the user's speech does not cancel the active response)
    td = {"type": "server_vad", "create_response": case != "no_create_response", "interrupt_response": False}
    s, _ = make(speculate=True, audio={"input": {"turn_detection": td}})
    if case == "response_active":
        send(s, {"type": "response.create"})  # still in progress when the turn ends: its answer waits
    s.take_actions()
    if case == "cleared":
        append(s, HELLO[:24 * 3100])  # past the candidate end: speculated
        send(s, {"type": "input_audio_buffer.clear"})
        assert [type(a) for a in engine_actions(s)] == [act.Speculate, act.AbandonSpeculation]
        return
    append(s, HELLO)
    assert act.Speculate not in [type(a) for a in engine_actions(s)]


def test_without_streaming_input_a_turn_reaches_the_engine_at_its_commit():
    s, _ = make(stream_input=False)
    append(s, HELLO)
    assert [type(a) for a in s.take_actions()] == [act.AppendUserAudio, act.CreateResponse]


# ----------------------------------------------------------------------------------------------
# truncation, items


def _finished_audio_response(s, text=("Yes, ", "please.")):
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    play_audio_response(s, create.response_id, text=text)
    s.response_done(create.response_id)
    s.take_events()
    return create


def test_truncate_validation_and_transcript():
    s, _ = make(**MANUAL)
    create = _finished_audio_response(s)
    item_id = create.item_id
    audio_ms = len(YES) / 24  # 1100 ms; "Yes, " arrived at 0 ms, "please." at 550 ms
    for bad, code, param in [
        (
            {"item_id": "item_nope", "content_index": 0, "audio_end_ms": 10},
            "item_truncate_invalid_item_id",
            "item_id",
        ),
        ({"item_id": item_id, "content_index": 1, "audio_end_ms": 10}, "invalid_value", "content_index"),
        (
            {"item_id": item_id, "content_index": 0, "audio_end_ms": int(audio_ms) + 50},
            "invalid_value",
            "audio_end_ms",
        ),
    ]:
        send(s, {"type": "conversation.item.truncate", **bad})
        (err,) = errors(s.take_events())
        assert (err.code, err.param) == (code, param)
    send(
        s, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 400}
    )
    (truncated,) = s.take_events()
    assert truncated.to_wire() | {"event_id": None} == {
        "type": "conversation.item.truncated",
        "event_id": None,
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": 400,
    }
    # its audio may still be queued (the session's clock did not move): the listener stopped, so does it
    assert s.take_actions() == [act.FlushOutputAudio(create.response_id, cut=False, cancelled="client_cancelled"),
                                act.TruncateItem(item_id, 400, "Yes, ")]
    send(s, {"type": "conversation.item.retrieve", "item_id": item_id})
    (retrieved,) = s.take_events()
    assert retrieved.item.content[0].transcript == "Yes, "
    # now shorter: the old length is no longer valid
    send(
        s, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 600}
    )
    assert errors(s.take_events())[0].param == "audio_end_ms"


def test_an_audio_item_without_transcript_text_can_be_truncated_while_it_plays():
    """Speech whose text patches decoded to nothing yet (no transcript delta) is still an audio item:
    a barge-in truncates it (the browser demo's interrupt hit this with the tiny model)."""
    s, _ = make(**MANUAL)
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    s.response_started(create.response_id)
    s.response_audio(create.response_id, YES[:4800])  # 200 ms, no text
    s.take_events()
    send(s, {"type": "response.cancel"})
    send(s, {"type": "conversation.item.truncate", "item_id": create.item_id, "content_index": 0,
             "audio_end_ms": 100})
    events = s.take_events()
    assert errors(events) == []
    assert "conversation.item.truncated" in types(events)
    assert act.TruncateItem(create.item_id, 100, "") in s.take_actions()


def test_truncate_refuses_user_items():
    s, _ = make(**MANUAL)
    send(
        s,
        {
            "type": "conversation.item.create",
            "item": {
                "id": "item_u1",
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hi"}],
            },
        },
    )
    s.take_events()
    send(
        s, {"type": "conversation.item.truncate", "item_id": "item_u1", "content_index": 0, "audio_end_ms": 0}
    )
    (err,) = errors(s.take_events())
    assert err.code == "invalid_value" and err.param == "item_id"


def test_item_create_kinds_delete_and_retrieve():
    s, _ = make(**MANUAL)
    for role, part in [
        ("system", {"type": "input_text", "text": "Be kind."}),
        ("user", {"type": "input_text", "text": "Hi!"}),
        ("assistant", {"type": "output_text", "text": "Hello."}),
        ("user", {"type": "input_audio", "audio": A.b64encode_audio(YES)}),
    ]:
        send(
            s,
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": role, "content": [part]},
            },
        )
    events = s.take_events()
    assert types(events) == ["conversation.item.added", "conversation.item.done"] * 4
    actions = s.take_actions()
    assert [type(a) for a in actions] == [
        act.AppendSystemText,
        act.AppendUserText,
        act.AppendAssistantText,
        act.AppendUserAudio,
    ]
    assert actions[1].text == "Hi!" and np.array_equal(actions[3].pcm, YES)
    ids = [e.item.id for e in events[::2]]
    assert [e.previous_item_id for e in events[::2]] == [None, *ids[:-1]]
    assert "audio" not in events[-1].to_wire()["item"]["content"][0]  # no audio echoed back
    send(s, {"type": "conversation.item.retrieve", "item_id": ids[3]})
    (retrieved,) = s.take_events()
    assert A.b64decode_audio(retrieved.item.content[0].audio) == A.pcm16_to_bytes(YES)
    send(
        s,
        {
            "type": "conversation.item.create",
            "item": {
                "id": ids[0],
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "x"}],
            },
        },
    )
    assert errors(s.take_events())[0].code == "item_id_conflict"
    send(s, {"type": "conversation.item.delete", "item_id": ids[1]})
    (deleted,) = s.take_events()
    assert deleted.item_id == ids[1] and s.take_actions() == [act.DeleteItem(ids[1])]
    assert [i.id for i in s.conversation] == [ids[0], ids[2], ids[3]]


def test_previous_item_id_appends_inserts_first_or_after_an_item():
    """GA semantics: absent appends, "root" inserts first, an id inserts right after it, an
    unknown id is refused and nothing is added."""
    s, _ = make(**MANUAL)

    def create(text: str, **where) -> tuple[list, list]:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        send(s, {"type": "conversation.item.create", "item": {"id": text, **item}, **where})
        return s.take_events(), s.take_actions()

    create("b")
    events, actions = create("a", previous_item_id="root")
    assert types(events) == ["conversation.item.added", "conversation.item.done"]
    assert events[0].previous_item_id is None and events[0].to_wire()["previous_item_id"] is None
    assert actions == [act.AppendUserText("a", "a", after="")]
    events, actions = create("a2", previous_item_id="a")
    assert events[0].previous_item_id == "a" and actions == [act.AppendUserText("a2", "a2", after="a")]
    events, actions = create("c")
    assert events[0].previous_item_id == "b" and actions == [act.AppendUserText("c", "c")]
    events, actions = create("x", previous_item_id="nope")
    (err,) = errors(events)
    assert err.code == "item_create_invalid_previous_item_id" and err.param == "previous_item_id"
    assert "'nope'" in err.message and actions == []
    assert [i.id for i in s.conversation] == ["a", "a2", "b", "c"]
    send(s, {"type": "conversation.item.create", "previous_item_id": "root", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "one"},
                                                        {"type": "input_text", "text": "two"},
                                                        {"type": "input_audio", "audio": A.b64encode_audio(YES)}]}})
    added = s.take_events()[0]
    first, second, audio = s.take_actions()
    assert next(i.id for i in s.conversation) == added.item.id
    # the engine gets one action per part: the first goes first, each later one after the one before
    assert (first.after, second.after, audio.after) == ("", added.item.id, added.item.id)


def test_input_transcription_events_name_the_audio_part_and_carry_usage():
    """GA's transcription events: ``content_index`` of the item's audio part (here the second part,
    after a text part), and ``completed`` with the audio's duration as usage."""
    s, _ = make(audio={"input": {"turn_detection": None, "transcription": {"model": "mimo-asr"}}})
    send(s, {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "Listen:"}, {"type": "input_audio", "audio": A.b64encode_audio(YES)}]}})
    item_id = s.take_events()[0].item.id
    (audio,) = [a for a in s.take_actions() if isinstance(a, act.AppendUserAudio)]
    assert audio.transcribe
    s.transcription_delta(item_id, "Ye")
    s.transcription_done(item_id, "Yes")
    s.transcription_failed(item_id, "a later pass failed")
    delta, completed, failed = (e.to_wire() for e in s.take_events())
    assert delta["content_index"] == completed["content_index"] == failed["content_index"] == 1
    assert completed["usage"] == {"type": "duration", "seconds": round(len(YES) / 24000, 3)}
    assert s.conversation.get(item_id).parts[1].transcript == "Yes"


def test_out_of_band_response_stays_out_of_the_conversation():
    s, _ = make(**MANUAL)
    send(s, {"type": "response.create", "response": {"conversation": "none", "output_modalities": ["text"]}})
    created, _rate = s.take_events()
    assert created.response.conversation_id is None
    (create,) = s.take_actions()
    s.response_text(create.response_id, "Summary.")
    s.response_done(create.response_id)
    assert "conversation.item.added" not in types(s.take_events())
    assert len(s.conversation) == 0


# ----------------------------------------------------------------------------------------------
# formats, transports, timers


def test_g711_in_and_out():
    s, _ = make(
        audio={
            "input": {"format": {"type": "audio/pcmu"}, "turn_detection": None},
            "output": {"format": {"type": "audio/pcma"}},
        }
    )
    pcm8k = A.resample(YES, 24000, 8000)
    codes = A.mulaw_encode(pcm8k).tobytes()
    send(s, {"type": "input_audio_buffer.append", "audio": base64.b64encode(codes).decode()})
    send(s, {"type": "input_audio_buffer.commit"})
    (audio,) = [a for a in s.take_actions() if isinstance(a, act.AppendUserAudio)]
    assert abs(len(audio.pcm) - len(YES)) < 240  # 8 kHz mu-law in, 24 kHz pcm16 for the engine
    n = min(len(audio.pcm), len(YES))
    corr = np.corrcoef(audio.pcm[:n].astype(float), YES[:n].astype(float))[0, 1]
    assert corr > 0.9
    send(s, {"type": "response.create"})
    created, _rate = s.take_events()[-2:]
    assert created.response.audio.output.format.type == "audio/pcma"
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    play_audio_response(s, create.response_id, text=("Yes",))
    s.response_done(create.response_id)
    deltas = [e for e in s.take_events() if e.type == "response.output_audio.delta"]
    payload = b"".join(base64.b64decode(d.delta) for d in deltas)
    assert abs(len(payload) - len(YES) / 3) <= 1  # one A-law byte per 8 kHz sample
    decoded = A.resample(A.alaw_decode(payload), 8000, 24000)
    corr = np.corrcoef(decoded[: len(YES)].astype(float), YES[: len(decoded)].astype(float))[0, 1]
    assert corr > 0.9


def test_webrtc_output_buffer_events():
    s, _ = make(transport=Transport.WEBRTC)
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    rid = create.response_id
    s.take_events()
    play_audio_response(s, rid, audio=YES[:9600], text=("Yes",))
    kinds = types(s.take_events())
    assert "response.output_audio.delta" not in kinds  # audio goes on the media track
    assert kinds.count("output_audio_buffer.started") == 1
    assert kinds.index("output_audio_buffer.started") > kinds.index("response.content_part.added")
    s.push_audio(np.concatenate([SILENCE_1S[:12000], STOP]))  # barge-in over the track
    events = s.take_events()
    assert types(events)[:2] == ["input_audio_buffer.speech_started", "output_audio_buffer.cleared"]
    assert events[1].response_id == rid and types(events)[-1] == "response.done"
    s.response_done(rid)
    s.output_audio_drained(rid)  # already cleared: no stopped event
    assert "output_audio_buffer.stopped" not in types(s.take_events())


def test_webrtc_stopped_after_playback_and_client_clear():
    s, _ = make(transport=Transport.WEBRTC, **MANUAL)
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    play_audio_response(s, create.response_id, audio=YES[:4800], text=("Yes",))
    s.response_done(create.response_id)
    s.take_events()
    s.output_audio_drained(create.response_id)
    assert types(s.take_events()) == ["output_audio_buffer.stopped"]
    send(s, {"type": "output_audio_buffer.clear"})
    assert types(s.take_events()) == ["output_audio_buffer.cleared"]
    assert s.take_actions() == [act.FlushOutputAudio(create.response_id)]


def test_voice_is_fixed_after_audio():
    s, _ = make(**MANUAL)
    send(s, {"type": "session.update", "session": {"audio": {"output": {"voice": "cedar"}}}})
    assert types(s.take_events()) == ["session.updated"]
    _finished_audio_response(s)
    send(s, {"type": "session.update", "session": {"audio": {"output": {"voice": "marin"}}}})
    (err,) = errors(s.take_events())
    assert err.param == "session.audio.output.voice"
    send(
        s,
        {"type": "session.update", "session": {"audio": {"output": {"voice": "cedar"}}, "instructions": "x"}},
    )
    assert types(s.take_events()) == ["session.updated"]


def test_idle_timeout_prompts_a_response():
    s, clock = make(audio={"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 2000}}})
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    play_audio_response(s, create.response_id, audio=YES, text=("Yes",))  # 1.1 s of audio
    s.response_done(create.response_id)
    s.take_events()
    append(s, SILENCE_1S[:4800])
    clock.advance(3.0)  # playback ends at +1.1 s; the deadline is +3.1 s
    s.tick()
    assert s.take_events() == []
    clock.advance(0.2)
    s.tick()
    events = s.take_events()
    assert types(events) == [
        "input_audio_buffer.timeout_triggered",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "rate_limits.updated",
    ]
    assert events[0].item_id == events[1].item_id
    clock.advance(10)
    s.tick()
    assert s.take_events() == []  # once per response, not repeatedly


def test_failed_and_incomplete_responses():
    s, _ = make(**MANUAL)
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    s.take_events()
    s.response_failed(create.response_id, "engine stopped")
    done, err = s.take_events()
    assert done.response.status == "failed" and done.response.status_details.error.message == "engine stopped"
    assert err.error.type == "server_error" and err.error.code == "response_failed"
    send(s, {"type": "response.create", "response": {"max_output_tokens": 8}})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    s.response_text(create.response_id, "Partial")
    s.response_done(create.response_id, "incomplete", "max_output_tokens")
    done = s.take_events()[-1].response
    assert (done.status, done.status_details.reason) == ("incomplete", "max_output_tokens")
    assert done.output[0].status == "incomplete"


def test_close_cancels_the_active_response():
    s, _ = make(**MANUAL)
    send(s, {"type": "response.create"})
    (create,) = [a for a in s.take_actions() if isinstance(a, act.CreateResponse)]
    s.close("client_disconnected")
    assert s.take_actions() == [
        act.CancelResponse(create.response_id, "client_cancelled"),
        act.FlushOutputAudio(create.response_id),
        act.Close("client_disconnected"),
    ]
    assert s.state is SessionState.CLOSED


def test_turning_vad_off_mid_turn_and_legacy_item_created():
    clock = ManualClock()
    s = RealtimeSession(SessionOptions(emit_item_created=True), clock=clock)
    s.start()
    s.take_events()
    append(s, HELLO[: 24000 * 2])  # speech started, not stopped
    assert types(s.take_events()) == ["input_audio_buffer.speech_started"]
    send(s, {"type": "session.update", "session": MANUAL})
    assert types(s.take_events()) == ["session.updated"]
    append(s, HELLO[24000 * 2 :])
    assert s.take_events() == []  # no VAD any more
    send(s, {"type": "input_audio_buffer.commit"})
    assert types(s.take_events()) == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.created",
        "conversation.item.done",
    ]


def test_retained_user_audio_is_bounded():
    from streaming.conversation import Conversation, Item

    conv = Conversation(max_items=3, max_retained_audio_ms=1500)
    for i in range(3):
        conv.add(Item(id=f"i{i}", role="user", status="completed", parts=[], audio=np.zeros(24000, np.int16)))
    assert [item.audio is not None for item in conv] == [False, False, True]
    with pytest.raises(Exception, match="maximum of 3 items"):
        conv.add(Item(id="i3", role="user", status="completed", parts=[]))


def test_a_turn_longer_than_the_buffer_is_split_not_refused():
    s, _ = make(limits=SessionLimits(max_input_buffer_ms=1500))
    speech = np.concatenate([HELLO[14400:67200]] * 2)  # 4.4 s of speech without a pause long enough
    append(s, np.concatenate([SILENCE_1S, speech, SILENCE_1S]))
    events = s.take_events()
    assert not errors(events)
    stops = [e for e in events if e.type == "input_audio_buffer.speech_stopped"]
    assert len(stops) >= 3
    audio = [a for a in s.take_actions() if isinstance(a, act.AppendUserAudio)]
    assert all(len(a.pcm) <= 1500 * 24 for a in audio)
    assert sum(len(a.pcm) for a in audio) >= len(speech)  # nothing of the speech was dropped
