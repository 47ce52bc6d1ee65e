"""Semantic end to end: the built-in trained model (``--preset tiny-speech``) gives the right answer
to a spoken question through the real server, over WebSocket and WebRTC, judged on its text
channel and, independently, by the recognizer on its audio; after a barge-in the next answer is
still right; a follow-up that needs the previous answer shows memory across turns.

Questions are spoken at test time by held-out voices (never heard in training) with the Debian
synthesisers ``.ci/run`` installs. Each answer is a word or two the recognizer hears reliably in
the agent's voice (its ceiling: ``mimo-agent bench-quality``).

These tests check the serving pipeline (template, delay pattern, streaming seams, cache rollback,
memory) with the model's meaning as the probe, so they ask questions the model gets right offline
(``mimo-agent dialogue --greedy``) in voices it hears well; how often it is right on held-out
voices, including the ones it hears worst (festival ked_diphone, flite rms), is the benchmark's
figure (BENCHMARKS.md), not these tests'."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent.quality.bench import Speaker, domain_answers
from agent.quality.recognize import Recognizer, normalize
from streaming.client import connect
from tests.agent.train.conftest import require_voices
from tests.streaming import rtc_client as rtc
from tests.streaming.live_server import start_server

pytestmark = pytest.mark.timeout(180)

#: (held-out voice, question, the answer) spoken over WebSocket
QUESTIONS = [
    ("espeak-ng:en-gb-scotland+steph", "What is three plus four?", "seven"),
    ("espeak-ng:en-us+m6", "What comes after eleven?", "twelve"),
    ("espeak-ng:en-gb-x-rp+f4", "What is nine minus two?", "seven"),
    ("espeak-ng:en-us+m6", "Repeat after me: garden.", "garden"),
]
#: greedy on both channels: the answer is the model's most likely one, the same whatever session
#: (and so sampler seed) a test gets, so a wrong answer is the pipeline's or the model's, not luck's
GREEDY = {"sampling": {"text": {"temperature": 0}, "speech": {"temperature": 0}}}
MANUAL = {"audio": {"input": {"turn_detection": None}}, "mimo": GREEDY}
#: a first answer that runs on (no stop before 200 patches: 32 s), so the user can talk over it
LONG_ANSWER = {"max_output_tokens": 200, "mimo": {"min_output_tokens": 200}}
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server():
    live = start_server("--preset", "tiny-speech", "--max-sessions", "4")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def speak():
    require_voices()
    return Speaker()


@pytest.fixture(scope="module")
def recognizer():
    return Recognizer(phrases=domain_answers())


def padded(audio: np.ndarray, seconds: float = 1.0) -> np.ndarray:
    """The question followed by silence, so the server's VAD ends the turn (24 kHz pcm16, the microphone's)."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    return np.concatenate([pcm, np.zeros(int(24000 * seconds), np.int16)])


async def turn(client, audio: np.ndarray):
    await client.send_audio(audio)
    await client.commit()
    await client.create_response()
    return await client.collect_response(timeout=TIMEOUT_S)


def check_answer(result, expected: str, recognizer: Recognizer) -> None:
    """The answer is right on the text channel and in the speech, as the recognizer hears it."""
    assert result.status == "completed", result.status_details
    assert normalize(result.transcript) == expected, result.transcript
    assert recognizer.transcribe(result.audio) == expected


@pytest.mark.parametrize(("voice", "question", "expected"), QUESTIONS)
async def test_a_spoken_question_gets_the_right_spoken_answer(server, speak, recognizer, voice, question, expected):
    async with await connect(server.ws_url, **MANUAL) as client:
        result = await turn(client, speak(voice, question))
    check_answer(result, expected, recognizer)


async def test_a_follow_up_needs_the_previous_answer(server, speak, recognizer):
    """"And plus one more?" means nothing alone: the model answers it from the turn before."""
    voice = "espeak-ng:en-gb-x-rp+f4"
    async with await connect(server.ws_url, **MANUAL) as client:
        check_answer(await turn(client, speak(voice, "What is two plus three?")), "five", recognizer)
        check_answer(await turn(client, speak(voice, "And plus one more?")), "six", recognizer)
        check_answer(await turn(client, speak(voice, "And minus one?")), "five", recognizer)


async def test_after_a_barge_in_the_next_answer_is_still_right(server, speak, recognizer):
    """The first answer is cut where the listener stopped hearing it (the cache rolls back to
    that point); the next question is answered as if nothing was wrong."""
    voice = "espeak-ng:en-us+m6"
    async with await connect(server.ws_url, **MANUAL) as client:
        first_audio = client.wait_for("response.output_audio.delta")
        await client.send_audio(speak(voice, "Good morning, how are you?"))
        await client.commit()
        await client.create_response()
        await asyncio.wait_for(first_audio, TIMEOUT_S)
        truncated = client.wait_for("conversation.item.truncated")
        await client.interrupt(audio_end_ms=160)
        await client.collect_response(timeout=TIMEOUT_S)
        assert 0 < (await asyncio.wait_for(truncated, TIMEOUT_S)).audio_end_ms <= 160
        check_answer(await turn(client, speak(voice, "What is six minus one?")), "five", recognizer)


async def answered_over_webrtc(call, recognizer: Recognizer, events: list | None = None) -> tuple[dict, str]:
    """The next response's done event and what the recognizer hears on the agent's track while it
    plays (the events read on the way are added to ``events``)."""
    events = [] if events is None else events
    started = await call.until("output_audio_buffer.started", timeout=TIMEOUT_S, events=events)
    stopped = await call.until("output_audio_buffer.stopped", timeout=TIMEOUT_S, events=events)
    done = next(e for e in events if e["type"] == "response.done" and e["response"]["id"] == started["response_id"])
    await asyncio.sleep(0.3)  # frames in flight
    pcm, rate = rtc.played(call.frames, started["_at"], stopped["_at"] + 0.3)
    return done, recognizer.transcribe(pcm, sample_rate=rate)


def transcript_of(done: dict) -> str:
    return normalize(" ".join(c.get("transcript") or "" for item in done["response"]["output"]
                              for c in item.get("content", [])))


async def test_a_spoken_question_over_webrtc_gets_the_right_spoken_answer(server, speak, recognizer):
    """Server VAD ends the turn from the microphone track; the answer plays on the agent's track."""
    call = await rtc.place_call(server.url, session={"type": "realtime", "mimo": GREEDY})
    try:
        call.mic.say(padded(speak("espeak-ng:en-us+m6", "What is three plus four?")))
        done, heard = await answered_over_webrtc(call, recognizer)
    finally:
        await call.close()
    assert done["response"]["status"] == "completed"
    assert transcript_of(done) == "seven" and heard == "seven"


async def test_barge_in_over_webrtc_then_the_next_answer_is_right(server, speak, recognizer):
    """The user asks a new question over the agent's answer: VAD cuts the answer (held long, so
    that it is still playing), the item keeps what the track played, and the new question gets
    the right answer."""
    vad = {"type": "server_vad", "create_response": False, "interrupt_response": True}
    call = await rtc.place_call(server.url, session={"type": "realtime", "audio": {"input": {"turn_detection": vad}},
                                                                "mimo": GREEDY})
    events: list[dict] = []
    try:
        call.mic.say(padded(speak("espeak-ng:en-gb-x-rp+f4", "Good morning, how are you?")))
        await call.until("input_audio_buffer.committed", timeout=TIMEOUT_S, events=events)
        call.send({"type": "response.create", "response": LONG_ANSWER})
        started = await call.until("output_audio_buffer.started", timeout=TIMEOUT_S, events=events)
        call.mic.say(padded(speak("espeak-ng:en-gb-x-rp+f4", "What is six minus one?")))
        await call.until("input_audio_buffer.speech_started", timeout=TIMEOUT_S, events=events)
        await call.until("input_audio_buffer.committed", timeout=TIMEOUT_S, events=events)
        call.send({"type": "response.create"})
        done, heard = await answered_over_webrtc(call, recognizer, events)
    finally:
        await call.close()
    cut = next(e for e in events if e["type"] == "response.done" and e["response"]["id"] == started["response_id"])
    assert cut["response"]["status"] == "cancelled"
    assert cut["response"]["status_details"]["reason"] == "turn_detected"
    # the cut answer keeps what the track played
    truncated = next(e for e in events if e["type"] == "conversation.item.truncated")
    assert truncated["item_id"] == cut["response"]["output"][0]["id"]
    assert 0 < truncated["audio_end_ms"] < cut["response"]["mimo"]["audio_ms"]
    assert done["response"]["status"] == "completed"
    assert transcript_of(done) == "five" and heard == "five"
