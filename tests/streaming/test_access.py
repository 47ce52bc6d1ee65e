"""Access from browsers, as OpenAI's Realtime API allows it: ephemeral client secrets minted by an
application server with the real API key (``POST /v1/realtime/client_secrets``, through the
official SDK), used by the client on either transport and refused once expired; and CORS for an
explicit allow-list of origins (``--cors-origin``). A real server on loopback with an API key."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import websockets
from openai import AsyncOpenAI, AuthenticationError
from openai.types.realtime.client_secret_create_response import ClientSecretCreateResponse

from tests.streaming import realtime_client as rc
from tests.streaming import rtc_client as rtc
from tests.streaming.live_server import start_server

pytestmark = pytest.mark.timeout(120)

API_KEY = "sk-test-0123456789"
ORIGIN = "http://app.example.test:8080"
SESSION = {"type": "realtime", "instructions": "You are a terse guide.", "output_modalities": ["text"],
           "audio": {"input": {"turn_detection": None}}}


@pytest.fixture(scope="module")
def server():
    live = start_server("--max-sessions", "2", "--api-key", API_KEY, "--cors-origin", ORIGIN,
                        "--cors-origin", "https://other.example.test")
    yield live
    live.stop()


def sdk(server, key: str = API_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.url + "/v1", api_key=key)


async def _mint(server, **params) -> tuple[dict, str]:
    """A client secret through the official SDK; returns (raw JSON, value)."""
    response = await sdk(server).realtime.client_secrets.with_raw_response.create(**params)
    raw = json.loads(response.text)
    ClientSecretCreateResponse.model_validate(raw, strict=True)
    return raw, raw["value"]


async def test_client_secret_opens_sessions_with_its_configuration_on_both_transports(server):
    before = time.time()
    raw, key = await _mint(server, expires_after={"anchor": "created_at", "seconds": 120}, session=SESSION)
    assert key.startswith("ek_") and before + 119 <= raw["expires_at"] <= time.time() + 121
    assert raw["session"]["instructions"] == SESSION["instructions"] and raw["session"]["output_modalities"] == ["text"]

    # WebSocket, as Bearer (the official SDK with the secret as its key) ...
    async with sdk(server, key).realtime.connect(model="mimo") as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        assert created.session.instructions == SESSION["instructions"] and created.session.output_modalities == ["text"]
    # ... and as the browser subprotocol
    ws = await websockets.connect(server.ws_url, subprotocols=["realtime", f"openai-insecure-api-key.{key}"])
    try:
        created = await rc.recv(ws)
        assert created["session"]["instructions"] == SESSION["instructions"]
    finally:
        await ws.close()
    # WebRTC: the raw SDP offer with the secret as Bearer; the secret's session applies to the call
    call = await rtc.place_call(server.url, headers={"Authorization": f"Bearer {key}"})
    try:
        assert call.log[0]["session"]["instructions"] == SESSION["instructions"]
        assert call.log[0]["session"]["audio"]["input"]["turn_detection"] is None
    finally:
        await call.close()
    # a secret opens sessions, it does not mint secrets
    with pytest.raises(AuthenticationError):
        await sdk(server, key).realtime.client_secrets.create()


async def test_client_secret_is_refused_once_expired(server):
    _, key = await _mint(server, expires_after={"anchor": "created_at", "seconds": 10})
    store = server.app.state.client_secrets
    real_clock = store.clock
    store.clock = lambda: real_clock() + 11  # ten seconds later
    try:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.ws_url, additional_headers={"Authorization": f"Bearer {key}"})
        assert refused.value.response.status_code == 401
        assert "expired" in json.loads(refused.value.response.body)["error"]["message"]
        pc, _ = await rtc.make_offer()
        try:
            offer = await rtc.post_offer(server.url, pc.localDescription.sdp,
                                         headers={"Authorization": f"Bearer {key}"})
        finally:
            await pc.close()
        assert offer.status_code == 401 and "expired" in offer.json()["error"]["message"]
    finally:
        store.clock = real_clock
    for bad in ("ek_unknown", "wrong-key"):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.ws_url, additional_headers={"Authorization": f"Bearer {bad}"})
        assert refused.value.response.status_code == 401


async def test_get_realtime_says_whether_a_key_opens_a_session(server):
    """What a browser cannot learn from a refused WebSocket handshake, asked over plain HTTP with
    the same key: 401 with the reason (the key wrong, missing or expired), or 200; and a page on an
    allowed origin may ask (CORS, with the Authorization header)."""
    _, secret = await _mint(server, expires_after={"anchor": "created_at", "seconds": 10})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        for key in (API_KEY, secret):
            ok = await http.get("/v1/realtime", headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200 and ok.json()["object"] == "realtime.access", ok.text
            assert ok.json()["websocket"] == server.ws_url
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = await http.get("/v1/realtime", headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        store = server.app.state.client_secrets
        real_clock = store.clock
        store.clock = lambda: real_clock() + 11
        try:
            expired = await http.get("/v1/realtime", headers={"Authorization": f"Bearer {secret}"})
        finally:
            store.clock = real_clock
        assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]
        preflight = await http.options("/v1/realtime", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN


async def test_client_secret_requests_are_checked(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await http.post("/v1/realtime/client_secrets", json={})).status_code == 401  # no API key
        auth = {"Authorization": f"Bearer {API_KEY}"}
        cases = [
            ({"expires_after": {"anchor": "created_at", "seconds": 5}}, "expires_after.seconds"),
            ({"expires_after": {"anchor": "expires_at", "seconds": 60}}, "expires_after.anchor"),
            ({"session": {"type": "realtime", "output_modalities": ["smell"]}}, "session.output_modalities[0]"),
            ({"session": {"type": "realtime", "audio": {"output": {"speed": 9}}}}, "session.audio.output.speed"),
            ({"sessions": {}}, "sessions"),
        ]
        for body, param in cases:
            response = await http.post("/v1/realtime/client_secrets", json=body, headers=auth)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["param"] == param, response.text
        response = await http.post("/v1/realtime/client_secrets", content=b"{", headers=auth)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
        minted = (await http.post("/v1/realtime/client_secrets", headers=auth)).json()  # no body: defaults
        assert 599 <= minted["expires_at"] - time.time() <= 601


async def test_cors_for_the_allowed_origins_only(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        for path in ("/v1/realtime/calls", "/v1/realtime/client_secrets"):
            answer = await http.options(path, headers=preflight)
            assert answer.status_code == 200, answer.text
            assert answer.headers["access-control-allow-origin"] == ORIGIN
            assert "POST" in answer.headers["access-control-allow-methods"]
            assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        refused = await http.options("/v1/realtime/calls", headers={**preflight, "Origin": "https://evil.test"})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        sdk_module = await http.get("/sdk/index.js", headers={"Origin": ORIGIN})
        assert sdk_module.status_code == 200 and sdk_module.headers["access-control-allow-origin"] == ORIGIN
        plain = await http.get("/sdk/index.js", headers={"Origin": "https://evil.test"})
        assert "access-control-allow-origin" not in plain.headers
    # the WebRTC exchange from that origin: the answer's Location (the call id) is readable
    pc, _ = await rtc.make_offer()
    try:
        answer = await rtc.post_offer(server.url, pc.localDescription.sdp,
                                      headers={"Authorization": f"Bearer {API_KEY}", "Origin": ORIGIN})
        assert answer.status_code == 201
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        assert "location" in answer.headers["access-control-expose-headers"].lower()
        async with httpx.AsyncClient(base_url=server.url) as http:
            await http.delete(answer.headers["location"], headers={"Authorization": f"Bearer {API_KEY}"})
    finally:
        await pc.close()


@pytest.mark.parametrize("origin", ["app.example.test", "http://app.example.test/path", "ftp://x.test"])
def test_cors_origin_option_refuses_what_is_not_an_origin(origin, capsys):
    from tests.streaming.live_server import serve_args

    with pytest.raises(SystemExit):
        serve_args("--cors-origin", origin)
    assert "is not an origin" in capsys.readouterr().err
