"""A page on another origin uses the server from a browser, as a web app would: its own server
mints an ephemeral client secret with the API key, and the page (served by a plain static server
on another port, so another origin) imports the SDK from the voice server's ``/sdk/`` and places a
WebRTC call with the secret. Allowed with ``--cors-origin``; refused by the browser for an origin
that is not on the list. Headless Chromium against the real server on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from tests.web.browser import chromium, require_browser, static_server

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

API_KEY = "sk-cross-origin-test"
INSTRUCTIONS = "You are the cross-origin test agent."
PAGE = """<!doctype html>
<meta charset="utf-8">
<title>another origin</title>
<script type="module">
const params = new URLSearchParams(location.search);
const server = params.get("server");
window.outcome = null;
try {
  const { connect } = await import(`${server}/sdk/index.js`);
  const client = await connect({ url: server, apiKey: params.get("key"), transport: "webrtc", microphone: false });
  client.createResponse({ max_output_tokens: 6 });
  const done = await client.waitFor("response.done", { timeoutMs: 60000 });
  window.outcome = { ok: true, callId: client.callId, instructions: client.session.instructions,
                     status: done.response.status };
  client.close();
} catch (error) {
  window.outcome = { ok: false, error: String(error) };
}
</script>
"""


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(allowed origin, other origin): two static servers of the page, on two ports."""
    require_browser()
    root: Path = tmp_path_factory.mktemp("app")
    (root / "index.html").write_text(PAGE)
    with static_server(root) as allowed, static_server(root) as other:
        yield allowed, other


@pytest.fixture(scope="module")
def live(pages):
    from tests.streaming.live_server import start_server

    server = start_server("--max-sessions", "2", "--api-key", API_KEY, "--cors-origin", pages[0])
    yield server
    server.stop()


def _mint(live) -> str:
    """The web app's own server: a client secret whose session carries the instructions."""
    body = {"expires_after": {"anchor": "created_at", "seconds": 60},
            "session": {"type": "realtime", "instructions": INSTRUCTIONS,
                        "audio": {"input": {"turn_detection": None}}}}
    response = httpx.post(f"{live.url}/v1/realtime/client_secrets", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    response.raise_for_status()
    return response.json()["value"]


def _outcome(origin: str, live) -> dict:
    url = f"{origin}/index.html?" + urlencode({"server": live.url, "key": _mint(live)})
    with chromium(timeout_s=60) as chrome, chrome.open_page(url) as page:
        page.page.wait_for_function("() => window.outcome !== null", timeout=90_000)
        return json.loads(page.page.evaluate("() => JSON.stringify(window.outcome)"))


def _settled(live, timeout_s: float = 15.0) -> int:
    deadline = time.monotonic() + timeout_s
    while live.engine.active_sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    return live.engine.active_sessions


def test_a_page_on_an_allowed_origin_imports_the_sdk_and_places_a_call(pages, live) -> None:
    outcome = _outcome(pages[0], live)
    assert outcome["ok"], outcome
    assert outcome["callId"].startswith("rtc_") and outcome["instructions"] == INSTRUCTIONS
    assert outcome["status"] in ("completed", "incomplete")
    assert _settled(live) == 0


def test_a_page_on_another_origin_is_refused_by_the_browser(pages, live) -> None:
    outcome = _outcome(pages[1], live)
    assert not outcome["ok"] and "import" in outcome["error"].lower(), outcome
    assert live.engine.active_sessions == 0
