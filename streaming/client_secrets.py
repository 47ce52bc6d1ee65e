"""Ephemeral client secrets, as OpenAI mints them: ``POST /v1/realtime/client_secrets``.

An application server (holding the real API key) asks for a short-lived key and hands it to a
browser, which then connects with it instead of the API key: ``Authorization: Bearer ek_...`` on
``POST /v1/realtime/calls`` (WebRTC) or on the WebSocket, or the ``openai-insecure-api-key.ek_...``
subprotocol. The request may carry ``expires_after: {"anchor": "created_at", "seconds": 10..7200}``
(default 600) and a ``session`` object (validated like a ``session.update``): every session the key
opens starts with that configuration, as OpenAI does. The answer is OpenAI's ``{"value":
"ek_...", "expires_at": ..., "session": {...}}``. A key opens any number of sessions until it
expires; after that it is refused (401, naming the expiry); sessions it opened go on.

Secrets live in memory (a restart forgets them), at most ``MAX_LIVE_SECRETS`` unexpired at once.
Creating one needs the server's API key when one is configured; an ephemeral key cannot mint more.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, ValidationError

from streaming import protocol as p
from streaming.config import fully_set, merge_client_session
from streaming.protocol.base import StrictModel
from streaming.session import RealtimeSession, SessionOptions

PATH = "/v1/realtime/client_secrets"
PREFIX = "ek_"
DEFAULT_TTL_S = 600
MIN_TTL_S, MAX_TTL_S = 10, 7200
MAX_LIVE_SECRETS = 10_000
MAX_BODY_BYTES = 1 << 20  # a session object with a 20 s voice prompt is about 1 MB of base64


@dataclass(frozen=True)
class ClientSecret:
    value: str
    expires_at: int  # epoch seconds
    settings: dict[str, Any]  # the session settings every session it opens starts from


class SecretStoreUnavailable(RuntimeError):
    """The store that holds the client secrets did not answer (a fleet's shared registry): the key
    cannot be minted or checked now; the client should try again (503)."""


RETRY_AFTER_S = 1  # what a 503 from an unavailable store asks the client to wait


class ClientSecretStore:
    """The server's own secrets, in memory. Async because a fleet's store (``FleetSecrets``) asks a
    shared registry; this one answers at once."""

    def __init__(self, clock: Callable[[], float] = time.time, max_live: int = MAX_LIVE_SECRETS) -> None:
        self.clock = clock  # wall clock (epoch seconds); tests move it
        self.max_live = max_live
        self._secrets: dict[str, ClientSecret] = {}

    async def create(self, settings: dict[str, Any], ttl_s: int) -> ClientSecret:
        return self._create(settings, ttl_s)

    async def check(self, value: str) -> ClientSecret:
        """The live secret ``value``; ``LookupError`` naming the problem otherwise."""
        return self._check(value)

    def _create(self, settings: dict[str, Any], ttl_s: int) -> ClientSecret:
        now = self.clock()
        self._secrets = {v: s for v, s in self._secrets.items() if s.expires_at > now}
        if len(self._secrets) >= self.max_live:
            raise OverflowError(f"{self.max_live} client secrets are live; wait for some to expire")
        secret = ClientSecret(PREFIX + secrets.token_hex(16), int(now + ttl_s), settings)
        self._secrets[secret.value] = secret
        return secret

    def _check(self, value: str) -> ClientSecret:
        secret = next((s for v, s in self._secrets.items() if hmac.compare_digest(v, value)), None)
        if secret is None:
            raise LookupError("Unknown client secret: it was not issued by this server (or the server restarted).")
        if self.clock() >= secret.expires_at:
            raise LookupError(f"The client secret expired at {secret.expires_at} (epoch seconds): ask the "
                              "application server for a new one.")
        return secret


class ExpiresAfter(StrictModel):
    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(default=DEFAULT_TTL_S, ge=MIN_TTL_S, le=MAX_TTL_S)


class ClientSecretRequest(StrictModel):
    expires_after: ExpiresAfter | None = None
    session: dict[str, Any] | None = None


def error_response(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    error = {"type": "invalid_request_error" if status < 500 else "server_error", "code": code,
             "message": message, "param": param}
    return JSONResponse({"error": error}, status_code=status)


def unavailable_response(message: str) -> JSONResponse:
    response = error_response(503, "client_secrets_unavailable", message)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def add_client_secret_routes(app: FastAPI) -> None:
    app.state.client_secrets = ClientSecretStore()

    @app.post(PATH)
    async def create_client_secret(request: Request) -> Response:
        return await _create(app, request)


async def _create(app: FastAPI, request: Request) -> Response:
    from streaming.app import _unauthorized, authorized

    config = app.state.config
    if not authorized(config.api_key, request.headers, []):  # the real key only, never an ephemeral one
        return _unauthorized()
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        return error_response(413, "request_too_large", f"Body of {len(body)} bytes; at most {MAX_BODY_BYTES}.")
    try:
        req = ClientSecretRequest.model_validate(p.decode_json(body) if body.strip() else {})
        settings = merge_client_session(config.session_defaults, req.session)
        session = RealtimeSession(SessionOptions(limits=config.limits))  # what the sessions it opens show
        session.start(settings, model=config.model_name)
    except (p.ProtocolError, ValidationError) as exc:
        # request fields, then the session object alone (ProtocolError), then its combinations
        err = exc if isinstance(exc, p.ProtocolError) else p.error_from_validation(
            exc, prefix="session" if exc.title == "SessionConfig" else "")
        return error_response(400, err.code.value, err.message, err.param)
    ttl = (req.expires_after or ExpiresAfter()).seconds
    try:
        secret = await app.state.client_secrets.create(settings, ttl)
    except OverflowError as exc:
        return error_response(429, "too_many_client_secrets", str(exc))
    except SecretStoreUnavailable as exc:
        return unavailable_response(str(exc))
    wire = fully_set(session.config).model_dump(mode="json")
    return JSONResponse({"value": secret.value, "expires_at": secret.expires_at, "session": wire})
