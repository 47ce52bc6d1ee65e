"""Chaos: one real server takes well-behaved talkers and every kind of abuse at once.

The server is ``mimo-agent serve`` (tiny preset, CPU) in a subprocess on loopback, so its memory is
its own to measure. While talkers hold spoken conversations (recorded speech from ``tests/data``),
other clients disconnect mid-answer, never read, flood, send pathological JSON and oversized
messages and bodies, leave WebRTC offers unconnected, regenerate answers, and edit, truncate and
cancel behind running answers. Every abuse is bounded in count; the whole run takes about a minute.

Afterwards: every talker's responses completed with all of their audio, no slot leaked (all of them
can be taken at once again; ``/healthz`` and ``/metrics`` count no session), the server's RSS came
back within a bound of where it started, and ``/healthz`` answered throughout. Figures are printed
(``pytest -s``): RSS before, at peak and after, and the health probe's slowest answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import websockets

from streaming.bench.spawn import SpawnedServer
from tests.streaming import realtime_client as rc
from tests.streaming import rtc_client as rtc
from tests.streaming.helpers import MALFORMED_JSON

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

MAX_SESSIONS = 12  # talkers and abusers at once stay below it: nobody is refused for want of a slot
TALKERS = 3
TURNS = 3
#: the server's RSS over its level after a warm-up turn, at the end and at its peak; an unbounded send
#: queue grows by hundreds of MB under the never-reader below (and gives most of it back once closed)
RSS_GROWTH_BOUND_MB = 150
RSS_PEAK_BOUND_MB = 300
LONG = {"max_output_tokens": 200, "mimo": {"min_output_tokens": 200}}  # 32 s of speech, paced in real time
MEDIUM = {"max_output_tokens": 40, "mimo": {"min_output_tokens": 40}}  # 6.4 s
MANUAL = {"audio": {"input": {"turn_detection": None}}}
SPEECH = ("speech_hello_padded.wav", "speech_yes.wav", "speech_stop.wav")
#: error codes that mean the server failed a session it should have served
SERVER_FAULTS = {"engine_error", "server_error", "engine_unavailable"}


@dataclass
class Chaos:
    url: str  # http://127.0.0.1:PORT
    errors: Counter = field(default_factory=Counter)  # error codes the abusers received
    health: list[float] = field(default_factory=list)  # seconds each /healthz took
    health_failures: list[str] = field(default_factory=list)
    stalls_ms: list[float] = field(default_factory=list)  # talkers: how far audio fell behind playback
    durations: dict[str, float] = field(default_factory=dict)  # seconds each kind of client took

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/realtime"


def speech(name: str) -> bytes:
    return rc.wav_pcm16(name)


async def request_turn(ws, pcm: bytes, **response) -> None:
    await rc.append(ws, pcm, chunk_ms=200)
    await rc.send(ws, {"type": "input_audio_buffer.commit"})
    await rc.send(ws, {"type": "response.create", **({"response": response} if response else {})})


async def text_turn(ws, text: str, **response) -> dict:
    await rc.send(ws, {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    await rc.send(ws, {"type": "response.create", **({"response": response} if response else {})})
    return await until_done(ws)


async def until_done(ws, events: list | None = None) -> dict:
    done = await rc.until(ws, "response.done", timeout=60, events=events)
    return done["response"]


def assert_served(response: dict, what: str) -> None:
    assert response["status"] in ("completed", "incomplete"), (what, response.get("status_details"))


# ------------------------------------------------------------------------------------------------
# the well-behaved


async def talker(chaos: Chaos, index: int, turns: int) -> int:
    """Spoken turns, every event read: each response completes and carries every sample of its
    speech patches. Returns the number of turns."""
    ws = await rc.connect(chaos.ws_url)
    try:
        await rc.update(ws, **MANUAL)
        for turn in range(turns):
            await request_turn(ws, speech(SPEECH[(index + turn) % len(SPEECH)]))
            events: list[dict] = []
            arrivals: list[tuple[float, int]] = []
            while True:
                event = await rc.recv(ws, 60)
                events.append(event)
                if event["type"] == "response.output_audio.delta":
                    arrivals.append((time.monotonic(), len(base64.b64decode(event["delta"])) // 2))
                if event["type"] == "response.done":
                    break
            errors = [e for e in events if e["type"] == "error"]
            assert not errors, (index, turn, errors)
            response = events[-1]["response"]
            assert_served(response, f"talker {index} turn {turn}")
            audio = rc.audio_of(events)
            patches = response["mimo"]["timings"]["speech_patches"]
            assert patches >= 1 and len(audio) == patches * 3840 == round(response["mimo"]["audio_ms"] * 24)
            chaos.stalls_ms.append(_stall_ms(arrivals))
        return turns
    finally:
        await ws.close()


def _stall_ms(arrivals: list[tuple[float, int]]) -> float:
    """The longest a listener playing from the first delta on would have waited for audio."""
    if not arrivals:
        return 0.0
    start, played, worst = arrivals[0][0], 0, 0.0
    for at, samples in arrivals:
        worst = max(worst, at - (start + played / 24_000))
        played += samples
    return worst * 1000


async def _talkers(chaos: Chaos, turns: int = TURNS) -> list:
    """The talkers. Under abuse they run on an event loop of their own (on a thread), so that an
    abuser keeping the test's loop busy (the flood) cannot delay when their audio is seen."""
    return await asyncio.gather(*(_timed(chaos, talker(chaos, i, turns)) for i in range(TALKERS)),
                                return_exceptions=True)


async def health_probe(chaos: Chaos, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=chaos.url, timeout=20) as http:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                response = await http.get("/healthz")
                if response.status_code != 200 or response.json()["status"] != "ok":
                    chaos.health_failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
            except Exception as exc:
                chaos.health_failures.append(repr(exc))
            chaos.health.append(time.monotonic() - t0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)


# ------------------------------------------------------------------------------------------------
# the abusers


async def disconnect_mid_answer(chaos: Chaos, times: int = 4) -> None:
    """Ask for a long answer, hear its first audio, drop the TCP connection without a close."""
    for i in range(times):
        ws = await rc.connect(chaos.ws_url)
        await rc.update(ws, **MANUAL)
        await request_turn(ws, speech(SPEECH[i % len(SPEECH)]), **LONG)
        await rc.until(ws, "response.output_audio.delta", timeout=60)
        ws.transport.abort()


async def never_reads(chaos: Chaos, retrieves: int = 200) -> None:
    """Put 20 s of user audio in the conversation and ask for it back over and over (1.3 MB of JSON
    each time), and for answers, without ever reading. The server must bound what it holds."""
    ws = await websockets.connect(chaos.ws_url + "?model=mimo-test", subprotocols=["realtime"],
                                  max_size=2**24, max_queue=1)  # stops reading the socket at once
    pcm = np.frombuffer(speech("speech_hello_padded.wav"), np.int16)
    pcm = np.tile(pcm, -(-20 * 24_000 // len(pcm)))[: 20 * 24_000]
    item = {"id": "item_long_user_audio", "type": "message", "role": "user",
            "content": [{"type": "input_audio", "audio": base64.b64encode(pcm.tobytes()).decode()}]}
    try:
        await rc.send(ws, {"type": "session.update", "session": {"type": "realtime", **MANUAL}})
        await rc.send(ws, {"type": "conversation.item.create", "item": item})
        for i in range(retrieves):
            await rc.send(ws, {"type": "conversation.item.retrieve", "item_id": item["id"]})
            if i % 50 == 0:
                await rc.send(ws, {"type": "response.create", "response": LONG})
            await asyncio.sleep(0.01)
        await asyncio.sleep(2.0)  # the server sees its queue stay full
    except websockets.ConnectionClosed:
        chaos.errors["never_reader_closed"] += 1  # the server gave up on us: what a bounded queue does
    finally:
        ws.transport.abort()


async def flood(chaos: Chaos, messages: int = 4000) -> None:
    """Events faster than the rate limit, read as they come (one answer each: ``cleared``, or the
    rate limit's error); the session still answers after."""
    ws = await rc.connect(chaos.ws_url)
    try:
        await rc.update(ws, **MANUAL)

        async def read() -> None:
            for _ in range(messages):
                event = await rc.recv(ws, 60)
                if event["type"] == "error":
                    chaos.errors[event["error"]["code"]] += 1

        reader = asyncio.create_task(read())
        for _ in range(messages):
            await ws.send('{"type": "input_audio_buffer.clear"}')
        await asyncio.wait_for(reader, 60)
        await asyncio.sleep(1.0)  # the bucket refills
        assert_served(await text_turn(ws, "Are you still there?"), "flooded session")
    finally:
        await ws.close()


async def malformed(chaos: Chaos) -> None:
    """Pathological JSON and a message over the size limit: an error each, the session goes on;
    a frame over the WebSocket limit closes only its own connection."""
    ws = await rc.connect(chaos.ws_url)
    try:
        await rc.update(ws, **MANUAL)
        for name, message, _ in MALFORMED_JSON:
            await ws.send(message)
            error = await rc.until(ws, "error", timeout=60)
            assert error["error"]["code"] == "invalid_json", (name, error)
            chaos.errors["invalid_json"] += 1
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (16 * 2**20 + 8)}))
        assert (await rc.until(ws, "error", timeout=60))["error"]["code"] == "message_too_large"
        chaos.errors["message_too_large"] += 1
        await request_turn(ws, speech("speech_yes.wav"))
        assert_served(await until_done(ws), "session after malformed input")
    finally:
        await ws.close()
    ws = await rc.connect(chaos.ws_url)
    with contextlib.suppress(websockets.ConnectionClosed):
        await ws.send("x" * (33 * 2**20))  # over the server's frame limit (twice the message limit)
        await rc.recv(ws, 60)
    assert ws.close_code == 1009, ws.close_code
    chaos.errors["frame_too_large"] += 1


async def oversized_bodies(chaos: Chaos) -> None:
    """Offers far over the limit, declared or streamed, plain or multipart: 413 each."""
    huge = b"v" * (8 << 20)

    async def streamed():  # no Content-Length: chunked
        for i in range(0, len(huge), 65536):
            yield huge[i:i + 65536]

    async with httpx.AsyncClient(base_url=chaos.url, timeout=60) as http:
        for kwargs in ({"content": huge, "headers": {"Content-Type": "application/sdp"}},
                       {"files": {"sdp": (None, huge, "application/sdp")}},
                       {"content": streamed(), "headers": {"Content-Type": "application/sdp"}}):
            response = await http.post("/v1/realtime/calls", **kwargs)
            assert response.status_code == 413, response.text
            chaos.errors[response.json()["error"]["code"]] += 1
        deep = {"sdp": (None, "v=0\r\nm=audio 9 x\r\n"), "session": (None, "[" * 5000 + "]" * 5000)}
        response = await http.post("/v1/realtime/calls", files=deep)
        assert response.status_code == 400 and "nested too deeply" in response.text, response.text


async def vanished_offers(chaos: Chaos, count: int = 4) -> list:
    """WebRTC offers whose peer never connects: answered, then never applied."""
    peers = []
    for _ in range(count):
        pc, _ = await rtc.make_offer(mic=False)
        peers.append(pc)
        response = await rtc.post_offer(chaos.url, pc.localDescription.sdp)
        assert response.status_code == 201, response.text
    return peers


async def webrtc_malformed_then_vanish(chaos: Chaos) -> None:
    """Pathological JSON on the data channel, an answer, then the peer goes away mid-answer."""
    call = await rtc.place_call(chaos.url, mic=False, session={"type": "realtime", **MANUAL})
    try:
        for name, message, _ in MALFORMED_JSON:
            call.channel.send(message)
            error = await call.until("error", timeout=60)
            assert error["error"]["code"] == "invalid_json", (name, error)
        call.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}})
        call.send({"type": "response.create", "response": LONG})
        await call.until("output_audio_buffer.started", timeout=60)
    finally:
        await call.close()  # no hang-up


async def regenerate(chaos: Chaos, times: int = 3) -> None:
    """Answer, delete the answer, ask again (the prefill of the new response is empty)."""
    ws = await rc.connect(chaos.ws_url)
    try:
        await rc.update(ws, **MANUAL)
        await request_turn(ws, speech("speech_yes.wav"))
        response = await until_done(ws)
        for i in range(times):
            assert_served(response, f"regeneration {i}")
            await rc.send(ws, {"type": "conversation.item.delete", "item_id": response["output"][0]["id"]})
            await rc.until(ws, "conversation.item.deleted", timeout=60)
            await rc.send(ws, {"type": "response.create"})
            response = await until_done(ws)
        assert_served(response, "last regeneration")
    finally:
        await ws.close()


async def edit_behind(chaos: Chaos) -> None:
    """Truncate the first answer and delete the first question while the second answer runs."""
    ws = await rc.connect(chaos.ws_url)
    try:
        await rc.update(ws, **MANUAL)
        await request_turn(ws, speech("speech_hello_padded.wav"))
        events: list[dict] = []
        first = await until_done(ws, events)
        assert_served(first, "first answer")
        question = next(e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed")
        await request_turn(ws, speech("speech_stop.wav"), **MEDIUM)
        await rc.until(ws, "response.output_audio.delta", timeout=60)
        await rc.send(ws, {"type": "conversation.item.truncate", "item_id": first["output"][0]["id"],
                           "content_index": 0, "audio_end_ms": 200})
        await rc.send(ws, {"type": "conversation.item.delete", "item_id": question})
        events = []
        second = await until_done(ws, events)
        faults = [e for e in events if e["type"] == "error" and e["error"]["code"] in SERVER_FAULTS]
        assert not faults and second["status"] in ("completed", "incomplete", "cancelled"), (faults, second)
        assert_served(await text_turn(ws, "And now?"), "answer after the edits")
    finally:
        await ws.close()


async def barge_and_cancel(chaos: Chaos, times: int = 3) -> None:
    """Cancel right after asking; and interrupt a running answer as a client does on barge-in:
    cancel it and truncate it to what was heard."""
    ws = await rc.connect(chaos.ws_url)
    try:
        await rc.update(ws, **MANUAL)
        for i in range(times):
            await request_turn(ws, speech(SPEECH[i % len(SPEECH)]), **LONG)
            await rc.send(ws, {"type": "response.cancel"})  # races the response's creation
            await until_done(ws)
            await rc.send(ws, {"type": "response.create", "response": LONG})
            delta = await rc.until(ws, "response.output_audio.delta", timeout=60)
            await rc.send(ws, {"type": "response.cancel"})
            await rc.send(ws, {"type": "conversation.item.truncate", "item_id": delta["item_id"],
                               "content_index": 0, "audio_end_ms": 100})
            events: list[dict] = []
            cancelled = await until_done(ws, events)
            faults = [e for e in events if e["type"] == "error" and e["error"]["code"] in SERVER_FAULTS]
            assert not faults and cancelled["status"] in ("cancelled", "completed", "incomplete"), faults
        assert_served(await text_turn(ws, "Go on."), "answer after the interruptions")
    finally:
        await ws.close()


# ------------------------------------------------------------------------------------------------
# the run


async def _timed(chaos: Chaos, coroutine):
    t0 = time.monotonic()
    try:
        return await coroutine
    finally:
        chaos.durations[coroutine.__name__] = round(max(chaos.durations.get(coroutine.__name__, 0),
                                                        time.monotonic() - t0), 1)


async def _settled(chaos: Chaos, timeout_s: float = 60.0) -> dict:
    """/healthz once no session and no connecting call is left (bounded wait)."""
    async with httpx.AsyncClient(base_url=chaos.url, timeout=20) as http:
        deadline = time.monotonic() + timeout_s
        while True:
            health = (await http.get("/healthz")).json()
            if (health["sessions"], health["calls_connecting"]) == (0, 0) or time.monotonic() > deadline:
                return health


async def _slots_free(chaos: Chaos, tries: int = 20) -> int:
    """How many sessions can be opened at once (every slot, unless one leaked); the engine frees a
    closed session's slot on its own thread, so a refusal is retried a few times."""
    for _ in range(tries):
        opened = await asyncio.gather(*(_open(chaos) for _ in range(MAX_SESSIONS)))
        for ws in opened:
            await ws.close()
        if all(ws.created for ws in opened):
            return MAX_SESSIONS
        await asyncio.sleep(0.5)
    return sum(ws.created for ws in opened)


async def _open(chaos: Chaos):
    ws = await websockets.connect(chaos.ws_url, subprotocols=["realtime"])
    ws.created = (await rc.recv(ws))["type"] == "session.created"
    return ws


def test_chaos():
    with SpawnedServer(["--preset", "tiny", "--max-sessions", str(MAX_SESSIONS), "--no-warmup"]) as server:
        chaos = Chaos(f"http://127.0.0.1:{server.port}")
        alone = asyncio.run(_talkers(chaos, turns=1))  # the warm-up, and the talkers' stalls without abuse
        assert alone == [1] * TALKERS, alone
        stall_alone_ms, chaos.stalls_ms = max(chaos.stalls_ms), []
        rss_start = server.rss_mb("VmRSS")
        t0 = time.monotonic()
        talked, abused, end = asyncio.run(_run(chaos))
        wall_s = time.monotonic() - t0
        rss_end, rss_peak = server.rss_mb("VmRSS"), server.rss_mb()
        log_tail = server.log_tail(40)
    print(f"\nchaos: {wall_s:.0f} s; server RSS {rss_start:.0f} MB after warm-up, {rss_peak:.0f} MB at peak, "
          f"{rss_end:.0f} MB after ({rss_end - rss_start:+.0f} MB); /healthz answered {len(chaos.health)} times, "
          f"slowest {max(chaos.health) * 1000:.0f} ms; talkers' longest audio stall {max(chaos.stalls_ms):.0f} ms "
          f"({stall_alone_ms:.0f} ms without abuse); errors the abusers got {dict(chaos.errors)}; "
          f"seconds per client {chaos.durations}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    failed = {name: repr(r) for name, r in abused.items() if isinstance(r, BaseException)}
    assert talked == [TURNS] * TALKERS, (talked, log_tail)
    assert not failed, (failed, log_tail)
    assert not chaos.health_failures, chaos.health_failures
    health = end["health"]
    assert (health["sessions"], health["calls_connecting"]) == (0, 0), health
    assert end["free"] == MAX_SESSIONS, f"{MAX_SESSIONS - end['free']} session slots leaked"
    active = [line for line in end["metrics"].splitlines() if line.startswith("mimo_sessions_active{")]
    assert active and all(line.endswith(" 0.0") for line in active), active
    assert rss_end - rss_start < RSS_GROWTH_BOUND_MB, (rss_start, rss_end)
    assert rss_peak - rss_start < RSS_PEAK_BOUND_MB, (rss_start, rss_peak)


async def _run(chaos: Chaos) -> tuple[list, dict, dict]:
    """Talkers and abusers at once; then the state the server is left in."""
    stop = asyncio.Event()
    probe = asyncio.create_task(health_probe(chaos, stop))
    peers = await vanished_offers(chaos)
    abusers = [disconnect_mid_answer(chaos), never_reads(chaos), flood(chaos), malformed(chaos),
               oversized_bodies(chaos), webrtc_malformed_then_vanish(chaos), regenerate(chaos),
               edit_behind(chaos), barge_and_cancel(chaos)]
    names = [a.__name__ for a in abusers]
    try:
        talked, *abused = await asyncio.wait_for(asyncio.gather(
            asyncio.to_thread(asyncio.run, _talkers(chaos)), *(_timed(chaos, a) for a in abusers),
            return_exceptions=True), 180)
    finally:
        for pc in peers:
            await pc.close()
    health = await _settled(chaos)
    free = await _slots_free(chaos)
    stop.set()
    await probe
    async with httpx.AsyncClient(base_url=chaos.url) as http:
        metrics = (await http.get("/metrics")).text
    return talked, dict(zip(names, abused, strict=True)), {"health": health, "metrics": metrics, "free": free}
