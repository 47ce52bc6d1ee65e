"""The browser demo against the real server, end to end: the in-process server (tiny model on the
CPU) on loopback, the demo page in headless Chromium, a recorded utterance as the microphone.

Over WebRTC and over WebSocket the page connects, the server's VAD hears the utterance, the agent
answers, and the page shows the agent's transcript entry and a first-audio latency row, with no
console errors. Screenshots and the demo's latency figures go to artifacts/ (git-ignored).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streaming.audio import resample, write_wav
from tests.agent.lm.test_tokenizer import _UNREADABLE
from tests.streaming import realtime_client as rc
from tests.web.browser import ARTIFACTS, Chromium, chromium, require_browser

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

MIC_RATE = 48_000
MIC_SECONDS = 15  # Chromium loops the file: one utterance, then a long silence for the answer
ANSWERED = """(transport) => {
    const d = window.mimoDemo;
    // the random weights' transcript may hold no readable character: then the entry shows "(speech)"
    const agent = d.transcript.find((e) => e.role === "assistant" && e.final);
    const turn = d.latencies.find((t) => t.vadToPlayedMs !== null && t.micToPlayedMs !== null);
    // WebSocket: the page's stats (refreshed every 500 ms from the player) have counted played audio;
    // asserting it at the first played sample raced that refresh on a busy machine
    const drained = transport === "websocket"
        ? d.audio.msPlayed > 0
        : (d.eventCounts["output_audio_buffer.stopped"] ?? 0) > 0;
    const heard = (d.eventCounts["conversation.item.input_audio_transcription.completed"] ?? 0) > 0;
    return Boolean(agent && turn && drained && heard);
}"""


def _mic_wav(path: Path) -> Path:
    """The recorded question (600 ms silence, 2.3 s speech, 1 s silence), silence-padded, at 48 kHz."""
    speech = np.frombuffer(rc.wav_pcm16("speech_hello_padded.wav"), np.int16)
    pcm = np.zeros(MIC_SECONDS * 24_000, np.int16)
    pcm[: len(speech)] = speech
    write_wav(path, resample(pcm, 24_000, MIC_RATE), MIC_RATE)
    return path


@pytest.fixture(scope="module")
def live() -> Iterator:
    require_browser()  # skip (or fail in CI) before paying for a server
    from tests.streaming.live_server import start_server

    server = start_server("--max-sessions", "2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, live) -> Iterator[Chromium]:
    wav = _mic_wav(tmp_path_factory.mktemp("mic") / "question.wav")
    with chromium(mic_wav=wav, timeout_s=45) as chrome:
        yield chrome


def _settled(live, timeout_s: float = 15.0) -> int:
    deadline = time.monotonic() + timeout_s
    while live.engine.active_sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    return live.engine.active_sessions


@pytest.mark.parametrize("transport", ["webrtc", "websocket"])
def test_the_demo_holds_a_spoken_turn(browser: Chromium, live, transport: str) -> None:
    assert _settled(live) == 0
    with browser.open_page(f"{live.url}/") as page:
        p = page.page
        p.check(f"[data-testid=transport-{transport}]", force=True)
        p.click("[data-testid=connect-button]")
        p.wait_for_function(ANSWERED, arg=transport)
        demo = p.evaluate("""() => {
            const d = window.mimoDemo;
            return {state: d.state, transcript: d.transcript, latencies: d.latencies, errors: d.errors,
                    audio: d.audio, counts: d.eventCounts};
        }""")
        page.screenshot(f"demo-e2e-{transport}.png")
        assert page.problems == [] and demo["errors"] == []

        state = demo["state"]
        assert state["status"] == "connected" and state["transport"] == transport
        label = "WebRTC" if transport == "webrtc" else "WebSocket"
        assert p.locator("[data-testid=status]").inner_text() == f"Connected · {label}"
        counts = demo["counts"]
        if transport == "webrtc":
            assert state["callId"].startswith("rtc_")
            assert counts["output_audio_buffer.started"] >= 1 and "response.output_audio.delta" not in counts
            assert demo["audio"]["packetsReceived"] > 0
        else:
            assert state["callId"] is None
            assert counts["response.output_audio.delta"] >= 1 and demo["audio"]["msPlayed"] > 0
        for kind in ("session.created", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "response.created", "response.done", "client.playback_started",
                     "conversation.item.input_audio_transcription.completed"):
            assert counts.get(kind, 0) >= 1, kind

        user = [e for e in demo["transcript"] if e["role"] == "user"]
        agent = [e for e in demo["transcript"] if e["role"] == "assistant"]
        assert user and user[0]["final"] and agent and agent[0]["final"]
        assert agent[0]["text"] or agent[0]["placeholder"]
        shown = p.locator("[data-testid=transcript]").inner_text()
        assert not _UNREADABLE.search(shown), repr(shown)  # no special tokens, control or stray bytes
        assert p.locator("[data-testid=transcript] .bubble.assistant").count() >= 1

        turn = demo["latencies"][0]
        # the mic anchor precedes the VAD's by the VAD's silence window
        assert 0 < turn["vadToReceivedMs"] < turn["micToReceivedMs"]
        assert 0 < turn["vadToPlayedMs"] < turn["micToPlayedMs"]
        if transport == "websocket":  # the page plays what it received; over WebRTC, the event
            # (data channel) and the audio (media track) travel separately and either may come first
            assert turn["vadToReceivedMs"] <= turn["vadToPlayedMs"]
        first_row = p.locator("[data-testid=latency-table] tbody tr").first.inner_text()
        assert first_row.split()[0] == "1" and first_row.count("ms") == 4
        assert "median wait heard" in p.locator("[data-testid=latency-summary]").inner_text()
        figures = {k: round(turn[k]) for k in ("vadToReceivedMs", "vadToPlayedMs", "micToReceivedMs", "micToPlayedMs")}
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / f"demo-latency-{transport}.json").write_text(json.dumps(figures, indent=1) + "\n")
        print(f"\n{transport} first-audio latency (demo figures): {figures}")

        p.click("[data-testid=disconnect-button]")
        p.wait_for_function("window.mimoDemo.state.status === 'idle'")
        assert page.problems == []
    assert _settled(live) == 0, "the server freed the session once the page hung up"


@pytest.mark.parametrize("transport", ["webrtc", "websocket"])
def test_the_interrupt_button_stops_the_agent(browser: Chromium, live, transport: str) -> None:
    assert _settled(live) == 0
    with browser.open_page(f"{live.url}/") as page:
        p = page.page
        p.check(f"[data-testid=transport-{transport}]", force=True)
        p.click("[data-testid=connect-button]")
        p.wait_for_function("window.mimoDemo.state.connected")
        # a 32 s answer, so that it is still going when the button is pressed
        p.evaluate("window.mimoDemo.client.updateSession({max_output_tokens: 200, mimo: {min_output_tokens: 200}})")
        p.wait_for_function("window.mimoDemo.latencies.some((t) => t.playedAt !== null)")  # the agent is audible
        p.click("[data-testid=interrupt-button]")
        p.wait_for_function("window.mimoDemo.transcript.some((e) => e.role === 'assistant' && e.interrupted)")
        p.wait_for_function("(window.mimoDemo.eventCounts['response.done'] ?? 0) > 0")
        counts = p.evaluate("window.mimoDemo.eventCounts")
        page.screenshot(f"demo-interrupted-{transport}.png")
        assert page.problems == [] and p.evaluate("window.mimoDemo.errors") == []
        assert counts["response.done"] == 1
        if transport == "webrtc":  # the server's playout buffer was cleared, not drained
            assert counts["output_audio_buffer.cleared"] == 1 and "output_audio_buffer.stopped" not in counts
        else:  # the page stopped playing and told the server what was heard
            assert counts["client.interrupted"] == 1 and counts["conversation.item.truncated"] == 1
        bubble = p.locator("[data-testid=transcript] .bubble.assistant.interrupted")
        assert bubble.count() == 1
        assert bubble.locator(".text").inner_text().strip(), "words heard so far, or the (speech) placeholder"
        p.click("[data-testid=disconnect-button]")
        p.wait_for_function("window.mimoDemo.state.status === 'idle'")
    assert _settled(live) == 0
