"""What a new user meets on the demo page, against the real server: which model it runs and what
to expect of it, example prompts from a model card, a refused key said as such (not as a server
that is down), a server that went away named as such (not a worklet)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.web.browser import Chromium, chromium
from tests.web.conftest import KEY

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

READ = """() => {
    const d = window.mimoDemo;
    return {state: d.state, model: d.model, transcript: d.transcript, errors: d.errors, latencies: d.latencies};
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    """A machine with a microphone (Chromium's fake capture device); one Playwright per process,
    so the machine without one is in test_demo_without_microphone.py."""
    with chromium(timeout_s=45) as chrome:
        yield chrome


def _set_key(p, key: str | None) -> None:
    """The API key field (inside the collapsed "Server" section)."""
    p.evaluate("(key) => { document.querySelector('[data-testid=api-key]').value = key; }", key or "")


def _connect(p, transport: str, key: str | None = None) -> None:
    p.check(f"[data-testid=transport-{transport}]", force=True)
    _set_key(p, key)
    p.click("[data-testid=connect-button]")


def test_the_page_says_the_model_has_random_weights(browser: Chromium, keyed_live) -> None:
    with browser.open_page(f"{keyed_live.url}/") as page:
        p = page.page
        p.wait_for_function("window.mimoDemo.model !== null")
        notice = p.locator("[data-testid=model-notice]")
        assert notice.get_attribute("data-weights") == "random"
        assert notice.inner_text().startswith("mimo-audio-tiny has random weights: ")
        assert "noise" in notice.inner_text()
        assert p.locator("[data-testid=example-prompt]").count() == 0
        assert p.locator("[data-testid=examples]").is_hidden()
        assert page.problems == []


@pytest.mark.parametrize("transport", ["websocket", "webrtc"])
def test_a_missing_or_wrong_key_is_a_401_not_a_server_down(browser: Chromium, keyed_live, transport: str) -> None:
    with browser.open_page(f"{keyed_live.url}/") as page:
        p = page.page
        for key, said in ((None, "connection without an API key"), ("wrong", "API key")):
            before = len(p.evaluate("window.mimoDemo.errors"))
            _connect(p, transport, key)
            p.wait_for_function(f"window.mimoDemo.errors.length > {before} && window.mimoDemo.state.status === 'idle'")
            error = p.evaluate("window.mimoDemo.errors").pop()
            assert error["source"] == "connection" and error["code"] == "invalid_api_key", error
            assert error["message"].startswith(f"the server refused the {said} (HTTP 401 invalid_api_key): "
                                               "Missing or invalid API key"), error
        assert "invalid_api_key: the server refused" in p.locator("[data-testid=errors] li").first.inner_text()
        _connect(p, transport, KEY)  # the right key connects
        p.wait_for_function("window.mimoDemo.state.status === 'connected'")
        p.click("[data-testid=disconnect-button]")


@pytest.mark.parametrize("transport", ["websocket", "webrtc"])
def test_a_server_that_went_away_is_named_not_the_worklet(browser: Chromium, transport: str) -> None:
    """The page was loaded, then the server stopped: Connect says nothing answers at its address
    (it used to report that `capture-worklet.js` could not be loaded)."""
    from tests.streaming.live_server import start_server

    server = start_server("--max-sessions", "1")
    try:
        with browser.open_page(f"{server.url}/") as page:
            p = page.page
            p.wait_for_function("window.mimoDemo.model !== null")
            server.stop()
            server = None
            _connect(p, transport)
            p.wait_for_function("window.mimoDemo.errors.length > 0 && window.mimoDemo.state.status === 'idle'")
            errors = p.evaluate("window.mimoDemo.errors")
            assert [e["code"] for e in errors] == ["server_unreachable"], errors
            assert errors[0]["message"].startswith("cannot reach the server at http://127.0.0.1:")
            assert "worklet" not in json.dumps(errors)
    finally:
        if server is not None:
            server.stop()


def test_examples_from_the_model_card_are_prompts_to_click(browser: Chromium, tmp_path) -> None:
    from tests.agent.test_model_card import save_tiny_checkpoint
    from tests.streaming.live_server import start_server

    card = {"summary": "answers questions about numbers", "examples": ["what is three plus four?", "hello"]}
    lm, codec = save_tiny_checkpoint(tmp_path, card)
    server = start_server("--model", str(lm), "--tokenizer", str(codec), "--max-sessions", "1",
                          "--interleave", "2:6", "--min-output-patches", "8")
    try:
        with browser.open_page(f"{server.url}/") as page:
            p = page.page
            p.wait_for_function("window.mimoDemo.model !== null")
            notice = p.locator("[data-testid=model-notice]")
            assert notice.get_attribute("data-weights") == "trained"
            assert notice.inner_text() == "lm: answers questions about numbers"
            examples = p.locator("[data-testid=example-prompt]")
            assert examples.all_inner_texts() == card["examples"]
            p.check("[data-testid=transport-websocket]", force=True)
            examples.first.click()  # connects, then asks
            p.wait_for_function("window.mimoDemo.transcript.some((e) => e.role === 'assistant' && e.final)")
            demo = p.evaluate(READ)
            assert [e["text"] for e in demo["transcript"] if e["role"] == "user"] == ["what is three plus four?"]
            assert demo["errors"] == [] and page.problems == []
            p.click("[data-testid=disconnect-button]")
    finally:
        server.stop()
