"""Headless Chromium for the browser-demo tests.

Drives Debian's `chromium` through Playwright with a wav file as the microphone
(`--use-file-for-fake-audio-capture`, looped by Chrome) and collects what a test asserts on:
console errors, uncaught page errors and failed requests.

Used by the static self-check (`test_demo_static.py`: the page served by a plain `http.server`)
and the end-to-end tests against the real server (`test_demo_e2e.py`: `chromium(mic_wav=...)`,
open `{server_url}/`, click `[data-testid=connect-button]`, read `window.mimoDemo`).

A missing browser skips the browser tests with the reason shown, or fails them when
`MIMO_REQUIRE_BROWSER=1` (CI sets it).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
WEB_ROOT = REPO_ROOT / "web"
ARTIFACTS = REPO_ROOT / "artifacts"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    # Agent audio must start without a click in a headless run.
    "--autoplay-policy=no-user-gesture-required",
)
DEFAULT_TIMEOUT_S = 30.0


def chromium_executable() -> str | None:
    """The Chromium to drive: `$MIMO_CHROMIUM`, else `chromium` on PATH."""
    return os.environ.get("MIMO_CHROMIUM") or shutil.which("chromium")


def require_browser() -> str:
    """Chromium's path, or skip (fail under `MIMO_REQUIRE_BROWSER=1`) saying what is missing."""
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright Python package is not installed (pip install playwright)"
    executable = chromium_executable()
    if missing is None and executable is None:
        missing = "Debian's chromium is not installed (apt-get install chromium)"
    if missing is not None:
        if os.environ.get("MIMO_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required but {missing}", pytrace=False)
        pytest.skip(missing)
    return executable


def write_tone_wav(path: Path, *, rate: int = 48_000, seconds: float = 2.0, freq: float = 440.0,
                   amplitude: float = 0.3, burst_s: float = 0.5) -> Path:
    """A mono pcm16 wav of tone bursts (`burst_s` on, `burst_s` off): a microphone signal with a
    known level and known silences, for checks that need no speech."""
    t = np.arange(int(rate * seconds)) / rate
    on = (np.floor(t / burst_s) % 2) == 0
    signal = amplitude * np.sin(2 * np.pi * freq * t) * on
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(signal * 32767).astype("<i2").tobytes())
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def static_server(directory: Path = WEB_ROOT) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 at an ephemeral port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="static-server", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class BrowserPage:
    """An open page and what went wrong on it so far."""

    page: Any  # playwright.sync_api.Page
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return (
            [f"console: {m}" for m in self.console_errors]
            + [f"uncaught: {m}" for m in self.page_errors]
            + [f"request failed: {m}" for m in self.failed_requests]
        )

    def screenshot(self, name: str, *, full_page: bool = True) -> Path:
        """Save a PNG under artifacts/ (git-ignored) and return its path."""
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


@dataclass
class Chromium:
    """A running headless Chromium; open as many pages as needed (one Playwright per process)."""

    browser: Any  # playwright.sync_api.Browser
    timeout_s: float = DEFAULT_TIMEOUT_S

    @contextlib.contextmanager
    def open_page(self, url: str, *, viewport: tuple[int, int] = (1280, 900),
                  color_scheme: str = "light") -> Iterator[BrowserPage]:
        """Open `url` in a fresh context with the microphone allowed (waits for `load`)."""
        context = self.browser.new_context(
            viewport={"width": viewport[0], "height": viewport[1]},
            permissions=["microphone"],
            color_scheme=color_scheme,
        )
        try:
            context.set_default_timeout(self.timeout_s * 1000)
            page = context.new_page()
            result = BrowserPage(page)
            page.on("console", lambda m: result.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: result.page_errors.append(str(e)))
            page.on("requestfailed", lambda r: result.failed_requests.append(f"{r.url}: {r.failure}"))
            page.goto(url, wait_until="load")
            yield result
        finally:
            context.close()


@contextlib.contextmanager
def chromium(*, mic_wav: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
             microphone: bool = True) -> Iterator[Chromium]:
    """Start headless Chromium with `mic_wav` as the microphone (Chrome loops the file); with
    `microphone=False`, with no fake capture device (a machine without a microphone)."""
    from playwright.sync_api import sync_playwright

    executable = require_browser()
    args = [flag for flag in CHROMIUM_FLAGS if microphone or flag != "--use-fake-device-for-media-stream"]
    if mic_wav is not None:
        args.append(f"--use-file-for-fake-audio-capture={mic_wav}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            yield Chromium(browser, timeout_s)
        finally:
            browser.close()


@contextlib.contextmanager
def open_page(url: str, *, mic_wav: Path | None = None, **page_options: Any) -> Iterator[BrowserPage]:
    """One browser, one page: `chromium(mic_wav=...)` then `open_page(url)`."""
    with chromium(mic_wav=mic_wav) as browser, browser.open_page(url, **page_options) as page:
        yield page
