"""The demo page on a machine without a microphone, against the real server: it connects without
one and the conversation goes on in text; a reconnect is marked in the transcript."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.agent.lm.test_tokenizer import _UNREADABLE
from tests.web.browser import Chromium, chromium
from tests.web.conftest import KEY
from tests.web.test_demo_first_impression import READ, _set_key

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    with chromium(microphone=False, timeout_s=45) as chrome:
        yield chrome


@pytest.mark.parametrize("transport", ["websocket", "webrtc"])
def test_typing_needs_no_microphone_and_a_new_connection_is_marked(browser: Chromium, keyed_live,
                                                                  transport: str) -> None:
    """This browser has no microphone: the page connects without one and the conversation goes on
    in text; after a reconnect the transcript says where the new connection starts, as the
    latency table starts afresh."""
    with browser.open_page(f"{keyed_live.url}/") as page:
        p = page.page
        p.check(f"[data-testid=transport-{transport}]", force=True)
        _set_key(p, KEY)
        assert p.locator("[data-testid=text-input]").is_enabled()  # typing connects when idle
        for turn in (1, 2):
            p.fill("[data-testid=text-input]", f"hello number {turn}")
            p.click("[data-testid=send-text]")
            p.wait_for_function("(n) => window.mimoDemo.transcript.filter((e) => e.role === 'assistant' && e.final)"
                                ".length >= n", arg=turn)
            if turn == 1:
                assert p.evaluate("window.mimoDemo.state.microphone") is False
                assert "type your messages" in p.locator("[data-testid=mic-state]").inner_text()
                assert p.locator("[data-testid=mic-mute]").is_disabled()
                p.click("[data-testid=disconnect-button]")
                p.wait_for_function("window.mimoDemo.state.status === 'idle'")
        demo = p.evaluate(READ)
        roles = [e["role"] for e in demo["transcript"]]
        assert roles == ["user", "assistant", "separator", "user", "assistant"], roles
        assert [e["text"] for e in demo["transcript"] if e["role"] == "user"] == ["hello number 1", "hello number 2"]
        separator = p.locator("[data-testid=transcript-separator]")
        assert separator.count() == 1 and "New connection" in separator.inner_text()
        assert demo["errors"] == [] and page.problems == []
        shown = p.locator("[data-testid=transcript]").inner_text()  # the random weights' answers: readable
        assert not _UNREADABLE.search(shown), repr(shown)
        p.click("[data-testid=disconnect-button]")
