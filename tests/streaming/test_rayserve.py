"""Scale-out on Ray Serve, end to end: ``mimo-agent serve --ray`` starts a local Ray cluster with two
tiny CPU replicas of ``SLOTS`` session slots each; the tests talk to its one endpoint over real
WebSockets and WebRTC, kill a replica's process, and stop the cluster at the end.

The tests of this module run in order on the same cluster (each leaves every session closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray.serve  # noqa: F401  (the '.[ray]' extra, part of '.[dev]': missing, this module fails to collect)
import websockets

from streaming.rayserve.routes import call_replica
from tests.streaming import realtime_client as rc
from tests.streaming import rtc_client
from tests.streaming.helpers import ROOT

pytestmark = pytest.mark.timeout(300)

SLOTS = 2  # per replica
REPLICAS = 2
DRAIN_S = 120  # longer than any test's session: the drain test ends its session itself
START_TIMEOUT_S = 240  # cluster, controller, proxy and two replicas loading the tiny model on 2 busy cores


@dataclass
class RayServer:
    url: str
    ws_url: str
    process: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    port_file, log = tmp / "port", tmp / "serve.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streaming.cli", "serve", "--ray", "--replicas", str(REPLICAS), "--preset", "tiny",
             "--device", "cpu", "--threads", "1", "--max-sessions", str(SLOTS), "--no-warmup", "--port", "0",
             "--port-file", str(port_file), "--drain-timeout", str(DRAIN_S), "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mimo-agent serve --ray did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        port = int(port_file.read_text())
        yield RayServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/realtime", process, log)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM: the command shuts its local cluster down; if it cannot, kill it and stop Ray."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True,
                       check=False)


async def health(server: RayServer) -> dict:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        response = await http.get("/healthz")
    response.raise_for_status()
    return response.json()


async def fleet_where(server: RayServer, ok, what: str, attempts: int = 240) -> list[dict]:
    """Poll ``/healthz`` until its replica list satisfies ``ok`` (replicas report every second)."""
    replicas: list[dict] = []
    for _ in range(attempts):
        replicas = (await health(server))["replicas"]
        if ok(replicas):
            return replicas
        await asyncio.sleep(0.5)
    pytest.fail(f"the replicas never showed {what}: {replicas}")


def idle(replicas: list[dict]) -> bool:
    return len(replicas) == REPLICAS and all(r["sessions"] == 0 for r in replicas)


ADMITTED: Counter = Counter()  # WebSocket sessions the fleet admitted, by test: the metrics test sums them
SPREAD_ATTEMPTS = 30


async def spread(server: RayServer, per_replica: int, subprotocols: tuple[str, ...] = ("realtime",)) -> list:
    """``per_replica`` sessions open on every replica, as the router placed them.

    The router ranks replicas by the load figures Serve's controller collects from them
    (``record_routing_stats``) and broadcasts to the proxy, which on a loaded machine can lag the
    replicas' own reports in ``/healthz`` by seconds: a replica whose sessions just closed can still
    look busy (so new sessions pile onto another, and the extra ones are refused), and a replacement
    replica is listed a moment before the proxy routes to it. So a placement that is not even is
    closed and tried again, a bounded number of times: a router that never spreads still fails."""
    n, placed = REPLICAS * per_replica, []
    for _ in range(SPREAD_ATTEMPTS):
        sockets, firsts = [], []
        for _ in range(n):
            ws = await websockets.connect(server.ws_url + "?model=mimo-test", subprotocols=list(subprotocols),
                                          max_size=2**24)
            sockets.append(ws)
            firsts.append(await rc.recv(ws))
        for first in firsts:
            assert first["type"] == "session.created" or first["error"]["code"] == "server_busy", first
        created = sum(first["type"] == "session.created" for first in firsts)
        ADMITTED[server.process.pid] += created
        if created == n:
            replicas = await fleet_where(server, lambda rs: sum(r["sessions"] for r in rs) == n, "the sessions")
            placed = [r["sessions"] for r in replicas]
            if placed == [per_replica] * REPLICAS:
                return sockets
        else:
            placed = [first.get("error", {}).get("code") for first in firsts]
        await close_all(sockets)
        await fleet_where(server, idle, "every replica idle")
        await asyncio.sleep(1)
    pytest.fail(f"{n} sessions were never spread {per_replica} per replica: last placed {placed}")


async def close_all(sockets: list) -> None:
    for ws in sockets:
        with contextlib.suppress(Exception):
            await ws.close()


async def refused(server: RayServer) -> tuple[dict, int]:
    """A session beyond every slot: its first event and the close code."""
    async with websockets.connect(server.ws_url, subprotocols=["realtime"]) as ws:
        first = await rc.recv(ws, timeout=30)
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.recv()
        return first, ws.close_code


async def test_sessions_spread_over_replicas_and_the_extra_one_is_refused(ray_server):
    replicas = await fleet_where(ray_server, idle, "every replica idle")
    assert {r["slots"] for r in replicas} == {SLOTS}
    sockets = await spread(ray_server, SLOTS)
    try:
        event, code = await refused(ray_server)
        assert event["type"] == "error" and event["error"]["code"] == "server_busy", event
        assert code == 1013
    finally:
        await close_all(sockets)


async def test_a_client_secret_opens_sessions_on_every_replica(ray_server):
    """An ephemeral key minted by one replica opens sessions wherever the router puts them."""
    await fleet_where(ray_server, idle, "every replica idle")
    async with httpx.AsyncClient(base_url=ray_server.url, timeout=30) as http:
        minted = await http.post("/v1/realtime/client_secrets", json={"session": {"type": "realtime",
                                                                                 "instructions": "Be brief."}})
    assert minted.status_code == 200, minted.text
    key = minted.json()["value"]
    sockets = await spread(ray_server, 1, ("realtime", f"openai-insecure-api-key.{key}"))
    try:
        for ws in sockets:  # one on each replica: the key was found on both
            await rc.send(ws, {"type": "session.update", "session": {"type": "realtime"}})
            updated = await rc.until(ws, "session.updated")
            assert updated["session"]["instructions"] == "Be brief."
    finally:
        await close_all(sockets)


def registry_pids() -> list[int]:
    """The process of the fleet's client-secret registry (Ray names an actor's worker ``ray::<Class>``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::ReplicaRegistry"):
                pids.append(int(proc.name))
    return pids


async def test_a_registry_that_does_not_answer_gives_a_named_503_and_the_replica_goes_on(ray_server):
    """The registry stopped (SIGSTOP: a real registry slower than any timeout): minting a client
    secret and opening a session with a key the replica has not seen both need it, and both get a
    503 naming it, not a bare 500; the replica's event loop is not blocked while it waits
    (``/healthz`` answers); once the registry runs again, so do both."""
    await fleet_where(ray_server, idle, "every replica idle")
    pids = registry_pids()
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGSTOP)
    try:
        async with httpx.AsyncClient(base_url=ray_server.url, timeout=60) as http:
            minting = asyncio.ensure_future(http.post("/v1/realtime/client_secrets", json={}))
            await asyncio.sleep(0.5)
            for _ in range(3):  # the replicas keep serving meanwhile, whichever one is minting
                assert (await http.get("/healthz", timeout=2)).status_code == 200
            minted = await minting
        assert minted.status_code == 503, minted.text
        error = minted.json()["error"]
        assert error["code"] == "client_secrets_unavailable" and "registry" in error["message"], error
        assert minted.headers.get("retry-after"), minted.headers
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(ray_server.ws_url, subprotocols=["realtime", "openai-insecure-api-key.ek_"
                                                                      + "0" * 32])
        assert refused.value.response.status_code == 503
        assert b"client_secrets_unavailable" in refused.value.response.body
    finally:
        os.kill(pids[0], signal.SIGCONT)
    async with httpx.AsyncClient(base_url=ray_server.url, timeout=30) as http:
        again = await http.post("/v1/realtime/client_secrets", json={})
    assert again.status_code == 200, again.text


async def test_healthz_and_metrics_name_every_replica(ray_server):
    replicas = await fleet_where(ray_server, idle, "every replica idle")
    body = await health(ray_server)
    assert body["replica"] in {r["id"] for r in replicas}
    assert len({r["pid"] for r in replicas}) == REPLICAS and all(r["pid"] > 0 for r in replicas)
    # every replica's sessions, each under its own label, adding up to those the tests above opened
    # (the others' figures are as of their last report)
    ids = {r["id"] for r in replicas}
    totals: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=ray_server.url, timeout=10) as http:
        for _ in range(40):
            metrics = (await http.get("/metrics")).text
            totals = {m[0]: float(m[1]) for m in re.findall(
                r'^mimo_sessions_total\{replica="(\w+)",transport="websocket"\} (\S+)$', metrics, re.M)}
            if set(totals) == ids and sum(totals.values()) == ADMITTED[ray_server.process.pid]:
                break
            await asyncio.sleep(0.5)
    assert set(totals) == ids and all(v > 0 for v in totals.values()), metrics
    assert sum(totals.values()) == ADMITTED[ray_server.process.pid], (totals, ADMITTED)


async def _turn(ws) -> str:
    await rc.update(ws, audio={"input": {"turn_detection": None}})
    await rc.append(ws, rc.wav_pcm16("speech_yes.wav"))
    await rc.send(ws, {"type": "input_audio_buffer.commit"})
    await rc.send(ws, {"type": "response.create", "response": {"max_output_tokens": 8}})
    done = await rc.until(ws, "response.done", timeout=120)
    return done["response"]["status"]


FINISHED = {"completed", "incomplete"}  # incomplete: the 8-patch cap


async def _fate(ws) -> tuple[dict | None, int | None]:
    """The first event a session gets after its replica was killed, and its close code (None: alive)."""
    try:
        event = await rc.recv(ws, timeout=5)
    except TimeoutError:
        return None, None
    with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
        await rc.recv(ws, timeout=5)
    return event, ws.close_code


async def test_a_killed_replica_closes_only_its_sessions_and_is_replaced(ray_server):
    await fleet_where(ray_server, idle, "every replica idle")
    sockets = await spread(ray_server, SLOTS)
    try:
        victim, survivor = (await health(ray_server))["replicas"]
        os.kill(victim["pid"], signal.SIGKILL)
        fates = await asyncio.gather(*(_fate(ws) for ws in sockets))
        lost = [(event, code) for event, code in fates if code is not None]
        assert len(lost) == SLOTS, fates  # exactly the victim's sessions
        for event, code in lost:
            assert code == 1012 and event["type"] == "error" and event["error"]["code"] == "replica_failed", event
        alive = [ws for ws, (_, code) in zip(sockets, fates, strict=True) if code is None]
        done = await asyncio.gather(*(_turn(ws) for ws in alive))
        assert len(done) == SLOTS and set(done) <= FINISHED, done
    finally:
        await close_all(sockets)

    replaced = await fleet_where(
        ray_server, lambda rs: len(rs) == REPLICAS and victim["pid"] not in {r["pid"] for r in rs} and idle(rs),
        "a replacement replica")
    assert survivor["id"] in {r["id"] for r in replaced}
    sockets = await spread(ray_server, SLOTS)  # the full capacity is back
    try:
        assert await _turn(sockets[-1]) in FINISHED
    finally:
        await close_all(sockets)


async def calls_spread(server: RayServer, ids: set[str]) -> list:
    """A WebRTC call on each replica, as the router placed them (retried as :func:`spread` is)."""
    owners: Counter = Counter()
    for _ in range(SPREAD_ATTEMPTS):
        calls = [await rtc_client.place_call(server.url, mic=False) for _ in range(REPLICAS)]
        owners = Counter(call_replica(c.call_id) for c in calls)
        if set(owners) == ids:
            return calls
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            for call in calls:
                await http.delete(call.location)
        for call in calls:
            await call.close()
        await fleet_where(server, lambda rs: idle(rs) and all(r["calls"] == 0 for r in rs), "the calls ended")
        await asyncio.sleep(1)
    pytest.fail(f"{REPLICAS} calls were never spread one per replica: last placed {dict(owners)}")


async def test_webrtc_calls_name_their_replica_and_hang_up_and_sideband_reach_it(ray_server):
    replicas = await fleet_where(ray_server, idle, "every replica idle")
    calls = await calls_spread(ray_server, {r["id"] for r in replicas})  # one on each: calls count as load
    try:
        await fleet_where(ray_server, lambda rs: [r["calls"] for r in rs] == [1] * REPLICAS, "one call each")
        for call in calls:  # the sideband WebSocket joins the call on its replica
            async with websockets.connect(f"{ray_server.ws_url}?call_id={call.call_id}",
                                          subprotocols=["realtime"]) as side:
                created = await rc.recv(side)
                assert created["type"] == "session.created", created
                assert created["session"]["id"] == call.log[0]["session"]["id"]
        async with httpx.AsyncClient(base_url=ray_server.url, timeout=30) as http:
            for call in calls:
                assert (await http.delete(call.location)).status_code == 204, call.call_id
            again = await http.delete(calls[0].location)
            assert again.status_code == 404 and again.json()["error"]["code"] == "call_id_not_found"
            missing = await http.post("/v1/realtime/calls/rtc_nosuchreplica_0123/hangup")
            assert missing.status_code == 404
        await fleet_where(ray_server, lambda rs: all(r["calls"] == 0 for r in rs), "the calls ended")
    finally:
        for call in calls:
            await call.close()


async def test_sigterm_drains_the_sessions_then_stops_the_cluster(ray_server):
    """Last: SIGTERM (what Kubernetes and systemd send) lets the open sessions finish, up to
    ``--drain-timeout``, then ``mimo-agent serve --ray`` stops with the Ray processes it started."""
    await fleet_where(ray_server, idle, "every replica idle")
    ws = await rc.connect(ray_server.ws_url)
    try:
        ray_server.process.send_signal(signal.SIGTERM)
        assert await _turn(ws) in FINISHED  # the replica is draining: its session goes on
        assert ray_server.process.poll() is None  # and the command waits for it
    finally:
        await ws.close()
    await asyncio.to_thread(ray_server.process.wait, 120)
    assert ray_server.process.returncode == 0, ray_server.log.read_text()[-4000:]
