"""Self-check of the browser demo without the realtime server: the page served by a plain static
HTTP server, in headless Chromium with a generated tone as the microphone.

Checks that the page renders without console errors, that the SDK loads, that the SDK's audio
worklets run in a real browser (capture levels, playback accounting, drop-oldest, clear), that a
server that does not answer shows up as a clear error in the page, and saves screenshots under
artifacts/. The end-to-end tests against the real server are in test_demo_e2e.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.web.browser import BrowserPage, Chromium, chromium, static_server, write_tone_wav

pytestmark = pytest.mark.browser

TESTIDS = [
    "status", "transport-webrtc", "transport-websocket", "server-url", "api-key", "ice-servers", "headphones",
    "connect-button", "disconnect-button", "mic-level", "mic-state", "mic-mute", "interrupt-button",
    "talk-button", "instructions", "turn-detection", "interleave", "text-temperature", "text-top-p",
    "speech-temperature", "speech-top-p", "voice-prompt", "apply-settings", "transcript", "text-input",
    "send-text", "latency-table", "latency-summary", "stats", "errors", "clear-errors", "clear-transcript",
]

TONE_AMPLITUDE = 0.3


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Chromium, str]]:
    """Chromium with a tone-burst microphone, and the demo served by a static server."""
    wav = write_tone_wav(tmp_path_factory.mktemp("mic") / "tone.wav", amplitude=TONE_AMPLITUDE)
    with static_server() as base, chromium(mic_wav=wav) as browser:
        yield browser, base


@pytest.fixture(scope="module")
def demo(browser: tuple[Chromium, str]) -> Iterator[tuple[BrowserPage, str]]:
    chrome, base = browser
    with chrome.open_page(f"{base}/") as page:
        yield page, base


def test_page_renders_without_errors_and_loads_the_sdk(demo: tuple[BrowserPage, str]) -> None:
    page, _ = demo
    assert page.problems == []
    hook = page.page.evaluate(
        """() => ({
            loaded: window.mimoDemo.sdkLoaded,
            connect: typeof window.mimoDemo.sdk.connect,
            client: typeof window.mimoDemo.sdk.RealtimeClient,
            state: window.mimoDemo.state,
            transcript: window.mimoDemo.transcript,
            latencies: window.mimoDemo.latencies,
            errors: window.mimoDemo.errors,
            audio: window.mimoDemo.audio,
        })"""
    )
    assert hook["loaded"] is True
    assert hook["connect"] == "function" and hook["client"] == "function"
    assert hook["state"]["status"] == "idle" and hook["state"]["connected"] is False
    assert hook["transcript"] == [] and hook["latencies"] == [] and hook["errors"] == []
    assert set(hook["audio"]) >= {"framesReceived", "framesPlayed", "msReceived", "msPlayed"}
    assert page.page.locator("[data-testid=status]").inner_text() == "Disconnected"
    for testid in TESTIDS:
        assert page.page.locator(f"[data-testid={testid}]").count() == 1, testid
    path = page.screenshot("demo.png")
    assert path.stat().st_size > 10_000


def test_headphones_option_only_for_websocket(demo: tuple[BrowserPage, str]) -> None:
    page = demo[0].page
    row = page.locator("#headphones-row")
    page.check("[data-testid=transport-websocket]", force=True)
    assert row.is_visible()
    page.check("[data-testid=transport-webrtc]", force=True)
    assert not row.is_visible()


def test_capture_worklet_measures_the_fake_microphone(demo: tuple[BrowserPage, str]) -> None:
    blocks = demo[0].page.evaluate(
        """async () => {
            const { getMicrophone, Microphone } = window.mimoDemo.sdk;
            // No browser processing (AGC would rescale the file), so the level is the file's.
            const stream = await getMicrophone({
                channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false,
            });
            const mic = await Microphone.open({ stream, ownsStream: true });
            const blocks = [];
            await new Promise((resolve) => {
                mic.onBlock = (b) => {
                    blocks.push({ n: b.samples.length, rms: b.rms, peak: b.peak, t: b.t });
                    if (blocks.length === 100) resolve();  // 2 s of 20 ms blocks
                };
            });
            mic.close();
            return { blocks, rate: mic.sampleRate };
        }"""
    )
    rate = blocks["rate"]
    assert all(b["n"] == round(rate * 0.020) for b in blocks["blocks"])
    peaks = [b["peak"] for b in blocks["blocks"]]
    rms = [b["rms"] for b in blocks["blocks"]]
    # Tone bursts of 0.5 s on and off: loud blocks at the tone's level, and silent ones.
    assert max(peaks) == pytest.approx(TONE_AMPLITUDE, rel=0.1)
    assert max(rms) == pytest.approx(TONE_AMPLITUDE / 2**0.5, rel=0.1)
    assert min(rms) < 1e-3
    times = [b["t"] for b in blocks["blocks"]]
    assert times == sorted(times)


PLAYER_SCRIPT = """async ({ seconds, jitter, clearAfterStart }) => {
    const { WorkletPlayer, protocol } = window.mimoDemo.sdk;
    const player = await WorkletPlayer.create({ jitter });
    const events = [];
    let started;
    const startedP = new Promise((r) => (started = r));
    let drained;
    const drainedP = new Promise((r) => (drained = r));
    player.onEvent = (e) => {
        events.push({ type: e.type, itemId: e.itemId ?? null, samples: e.samples ?? null });
        if (e.type === "started") started();
        if (e.type === "drained") drained();
    };
    const n = Math.round(24000 * seconds);
    const pcm = new Int16Array(n);
    for (let i = 0; i < n; i++) pcm[i] = Math.round(8000 * Math.sin((2 * Math.PI * 440 * i) / 24000));
    for (let at = 0; at < n; at += 2400) player.push(pcm.subarray(at, at + 2400), "item_a");
    let heard = null;
    if (clearAfterStart) {
        await startedP;
        await new Promise((r) => setTimeout(r, 200));
        heard = await player.clear();
    } else {
        player.endOfStream();
        await drainedP;
    }
    await new Promise((r) => setTimeout(r, 150));  // let the last stats report arrive
    const stats = player.stats;
    player.close();
    return { events, stats, heard, rate: player.context.sampleRate };
}"""


def test_playback_worklet_plays_everything_and_reports_it(demo: tuple[BrowserPage, str]) -> None:
    result = demo[0].page.evaluate(PLAYER_SCRIPT, {"seconds": 0.5, "jitter": {}, "clearAfterStart": False})
    assert result["rate"] == 24000, "the playback context runs at the wire rate"
    types = [e["type"] for e in result["events"]]
    assert types[0] == "started" and result["events"][0]["itemId"] == "item_a"
    assert "drained" in types
    stats = result["stats"]
    assert stats["receivedMs"] == pytest.approx(500)
    assert stats["playedMs"] == pytest.approx(500)
    assert stats["droppedMs"] == 0


def test_playback_worklet_drops_the_oldest_beyond_its_cap(demo: tuple[BrowserPage, str]) -> None:
    # 3 s pushed at once into a 1 s buffer: about 2 s are dropped (a little may play while the
    # pushes are still arriving), the rest plays, nothing is lost from the accounting.
    result = demo[0].page.evaluate(PLAYER_SCRIPT, {"seconds": 3.0, "jitter": {}, "clearAfterStart": False})
    stats = result["stats"]
    assert stats["receivedMs"] == pytest.approx(3000)
    assert stats["playedMs"] + stats["droppedMs"] == pytest.approx(3000)
    assert stats["droppedMs"] > 1500
    dropped_samples = sum(e["samples"] for e in result["events"] if e["type"] == "dropped")
    assert dropped_samples == round(stats["droppedMs"] * 24)


def test_playback_worklet_clear_reports_what_was_heard(demo: tuple[BrowserPage, str]) -> None:
    result = demo[0].page.evaluate(
        PLAYER_SCRIPT, {"seconds": 5.0, "jitter": {"maxBufferMs": 10_000}, "clearAfterStart": True}
    )
    heard = result["heard"]
    assert heard["itemId"] == "item_a"
    assert heard["receivedMs"] == pytest.approx(5000)
    assert 0 < heard["playedMs"] < heard["receivedMs"]
    assert heard["discardedMs"] == pytest.approx(heard["receivedMs"] - heard["playedMs"])
    assert result["stats"]["playedMs"] == pytest.approx(heard["playedMs"])


@pytest.mark.parametrize("transport", ["webrtc", "websocket"])
def test_a_server_that_does_not_speak_realtime_is_a_clear_error(
    browser: tuple[Chromium, str], transport: str
) -> None:
    chrome, base = browser
    with chrome.open_page(f"{base}/") as page:
        p = page.page
        p.check(f"[data-testid=transport-{transport}]", force=True)
        p.click("[data-testid=connect-button]")
        p.wait_for_function("window.mimoDemo.errors.length > 0 && window.mimoDemo.state.status === 'idle'")
        errors = p.evaluate("window.mimoDemo.errors")
        assert [e["source"] for e in errors] == ["connection"]
        if transport == "webrtc":
            # The static server has no POST: the SDP exchange is refused with its status.
            assert "SDP offer rejected" in errors[0]["message"] and "HTTP 501" in errors[0]["message"]
            assert "Unsupported method ('POST')" in errors[0]["message"]
            assert "<html" not in errors[0]["message"], "an HTML error page is reduced to its status text"
        else:
            assert "WebSocket connection to ws://127.0.0.1:" in errors[0]["message"]
            assert "/v1/realtime" in errors[0]["message"]
        assert p.locator("[data-testid=errors] li").count() == 1
        assert p.locator("[data-testid=connect-button]").is_enabled()
        assert p.evaluate("window.mimoDemo.client") is None
        page.screenshot(f"demo-error-{transport}.png")
