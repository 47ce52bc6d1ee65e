"""The deployment: one replica is one server (``streaming.server.build_server``: one engine, the same
routes and protocol), plus what a fleet needs: its load for the router, call ids that name it,
its peers in ``/healthz`` and ``/metrics``, an engine health check, and a drain of its WebRTC calls.

Serve counts a WebSocket session as an ongoing request for its whole life, so
``max_ongoing_requests`` is set well above the slots: a full replica must still accept the
handshake and refuse it itself (``server_busy``, close 1013; a WebRTC offer gets 503), because a
request Serve queues hangs and one past its queue gets a 500.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import ray
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray import serve
from ray.serve.config import RequestRouterConfig

from streaming.client_secrets import ClientSecret, ClientSecretStore, SecretStoreUnavailable
from streaming.metrics import ServerMetrics
from streaming.rayserve.router import SlotRouter
from streaming.rayserve.routes import RequestKind, classify, new_call_id

log = logging.getLogger(__name__)

APP_NAME = "mimo"
DEPLOYMENT_NAME = "realtime"
REGISTRY_NAMESPACE = "mimo_agent"
HEARTBEAT_S = 0.5  # replicas report to the registry this often
STALE_S = 3.0  # a replica silent this long is left out of /healthz and /metrics (it died)
STATS_PERIOD_S = 0.5  # record_routing_stats period: how fresh the router's load figures are
REGISTRY_TIMEOUT_S = 5.0  # a client secret's record or look-up (milliseconds when the cluster is well)
HEADROOM_REQUESTS = 16  # ongoing requests beyond the session slots: refusals, health, metrics, the demo


@ray.remote(num_cpus=0)
class ReplicaRegistry:
    """Who is serving: each replica reports its status and metrics every ``HEARTBEAT_S`` and gets
    everyone's back. A named detached actor, one per application."""

    def __init__(self) -> None:
        self._replicas: dict[str, tuple[float, dict, bytes]] = {}
        self._secrets: dict[str, Any] = {}  # client secret value -> ClientSecret (FleetSecrets)

    def report(self, status: dict, metrics: bytes) -> list[tuple[dict, bytes]]:
        now = time.monotonic()
        self._replicas[status["id"]] = (now, status, metrics)
        for rid, (seen, _, _) in list(self._replicas.items()):
            if now - seen > STALE_S:
                del self._replicas[rid]
        return [(s, m) for _, s, m in self._replicas.values()]

    def remove(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def add_secret(self, secret: Any) -> None:
        now = time.time()
        self._secrets = {v: s for v, s in self._secrets.items() if s.expires_at > now}
        self._secrets[secret.value] = secret

    def find_secret(self, value: str) -> Any:
        return self._secrets.get(value)


def registry_name(app_name: str) -> str:
    return f"replicas:{app_name}"


def registry(app_name: str) -> Any:
    return ReplicaRegistry.options(name=registry_name(app_name), namespace=REGISTRY_NAMESPACE, lifetime="detached",
                                   get_if_exists=True).remote()


class FleetSecrets(ClientSecretStore):
    """Ephemeral client secrets shared by every replica: the one that mints a key records it in the
    registry, and a replica that does not know a key presented to it looks it up there, so a key
    opens sessions on whichever replica has a free slot. The registry is awaited (the event loop
    serves every other session meanwhile): once per minted key, and once per key new to a replica.
    A registry that does not answer within ``timeout_s`` is :class:`SecretStoreUnavailable` (503)."""

    def __init__(self, registry: Any, name: str, timeout_s: float = REGISTRY_TIMEOUT_S) -> None:
        super().__init__()
        self.registry = registry
        self.name = name  # the registry actor's, for errors
        self.timeout_s = timeout_s

    async def create(self, settings: dict[str, Any], ttl_s: int) -> ClientSecret:
        secret = self._create(settings, ttl_s)
        try:
            await self._ask(self.registry.add_secret.remote(secret), "record the new client secret")
        except SecretStoreUnavailable:
            self._secrets.pop(secret.value, None)  # never handed out
            raise
        return secret

    async def check(self, value: str) -> ClientSecret:
        try:
            return self._check(value)
        except LookupError:
            found = await self._ask(self.registry.find_secret.remote(value), "look the client secret up")
            if found is None:
                raise
            self._secrets[found.value] = found  # known here from now on; the expiry is checked as usual
            return self._check(value)

    async def _ask(self, ref: Any, what: str) -> Any:
        try:
            return await asyncio.wait_for(ref, self.timeout_s)
        except (TimeoutError, ray.exceptions.RayError) as exc:
            problem = f"did not answer in {self.timeout_s:g} s" if isinstance(exc, TimeoutError) else f"failed: {exc}"
            raise SecretStoreUnavailable(f"The fleet's client-secret registry (the Ray actor {self.name!r}) "
                                         f"{problem}, so this replica could not {what}; try again shortly.") from exc


class FleetMetrics(ServerMetrics):
    """This replica's metrics; ``/metrics`` renders every live replica's, each sample labelled
    ``replica`` (the others' as of their last report, at most ``HEARTBEAT_S`` old)."""

    def __init__(self, replica_id: str) -> None:
        super().__init__()
        self.replica_id = replica_id
        self.peers: dict[str, bytes] = {}  # replica id -> its last rendered metrics

    def own(self) -> bytes:
        return super().render()

    def render(self) -> bytes:
        return generate_latest(_Labelled({**self.peers, self.replica_id: self.own()}))


class _Labelled:
    """A collector re-exposing several replicas' expositions as one, with a ``replica`` label."""

    def __init__(self, texts: dict[str, bytes]) -> None:
        self.texts = texts

    def collect(self) -> Any:
        families: dict[str, Any] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text.decode()):
                labelled = [Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                            for s in family.samples]
                if family.name in families:
                    families[family.name].samples.extend(labelled)
                else:
                    family.samples = labelled
                    families[family.name] = family
        yield from families.values()


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class RealtimeReplica:
    """One engine behind Ray Serve (see the module docstring)."""

    async def __init__(self, args: argparse.Namespace) -> None:
        from streaming.server import build_server

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.node = ray.util.get_node_ip_address()
        self.opened = 0  # session openings received (admitted or refused): lets the router net out its own
        self.metrics = FleetMetrics(self.replica_id)
        self.server = build_server(args, self.metrics)
        self.server.state.new_call_id = lambda: new_call_id(self.replica_id)
        self.server.state.health_extras.append(self._fleet)
        self.registry = registry(context.app_name)
        self.server.state.client_secrets = FleetSecrets(self.registry, registry_name(context.app_name))
        self.peers: list[dict] = []
        self.serving = False  # Serve routes to this replica: set by the first record_routing_stats call
        self._heartbeat = asyncio.get_running_loop().create_task(self._report_forever())
        log.info("replica %s (pid %d) serving %s with %d slots", self.replica_id, os.getpid(),
                 self.server.state.config.model_name, self.slots)

    def __serve_build_asgi_app__(self) -> Any:
        app = self.server

        async def counted(scope: dict, receive: Any, send: Any) -> None:
            """Counts a session opening once it is decided (its first message sent: the handshake
            accepted, refused or the answer's status), just before the session joins ``bridges``."""
            if classify(scope)[0] is not RequestKind.OPEN:
                await app(scope, receive, send)
                return
            decided = False

            async def send_counted(message: dict) -> None:
                nonlocal decided
                await send(message)
                if not decided:
                    decided = True
                    self.opened += 1

            try:
                await app(scope, receive, send_counted)
            finally:
                if not decided:
                    self.opened += 1

        return counted

    @property
    def slots(self) -> int:
        return self.server.state.engine.config.max_sessions

    def status(self) -> dict:
        state = self.server.state
        # sessions: the engine's slots in use, what admission goes by (a closed session's slot is freed
        # by the engine thread a moment after its connection is gone)
        return {"id": self.replica_id, "pid": os.getpid(), "node": self.node,
                "sessions": max(len(state.bridges), state.engine.active_sessions),
                "calls": len(getattr(state, "calls", ())), "slots": self.slots, "opened": self.opened}

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's hook: the load the router ranks replicas by (:mod:`streaming.rayserve.router`)."""
        # the controller asks running replicas only; its broadcast of them to the proxies may still be on
        # its way, so for a moment after this a replica can be listed that no router sends sessions to
        self.serving = True
        status = self.status()
        return {k: status[k] for k in ("sessions", "slots", "opened")}

    def check_health(self) -> None:
        """Serve's hook: a replica whose engine thread died is replaced."""
        thread = getattr(self.server.state.engine, "_thread", None)
        if thread is None or not thread.is_alive():
            raise RuntimeError("the engine thread is not running")

    def _fleet(self) -> dict:
        own = self.status()
        others = [s for s in self.peers if s["id"] != self.replica_id]
        return {"replica": self.replica_id, "replicas": sorted([own, *others], key=lambda s: s["id"])}

    async def _report_forever(self) -> None:
        while True:
            if not self.serving:  # not listed before the proxies can route to it
                await asyncio.sleep(HEARTBEAT_S / 5)
                continue
            try:
                everyone = await self.registry.report.remote(self.status(), self.metrics.own())
                self.peers = [s for s, _ in everyone]
                self.metrics.peers = {s["id"]: m for s, m in everyone if s["id"] != self.replica_id}
            except Exception as exc:  # the registry restarting: /healthz shows this replica alone meanwhile
                log.warning("replica registry unreachable: %s", exc)
            await asyncio.sleep(HEARTBEAT_S)

    async def __del__(self) -> None:
        """Scale-down or redeploy: Serve has drained the WebSockets (ongoing requests) up to
        ``graceful_shutdown_timeout_s``; WebRTC calls are not requests, so wait for them here (Serve
        kills the replica at the same deadline)."""
        calls = getattr(self.server.state, "calls", {})
        while calls:
            await asyncio.sleep(0.5)
        self._heartbeat.cancel()
        with contextlib.suppress(Exception):
            await self.registry.remove.remote(self.replica_id)
        self.server.state.engine.stop()


def gpus_per_replica(args: argparse.Namespace) -> float:
    if args.gpus_per_replica is not None:
        return args.gpus_per_replica
    if args.device.startswith("cuda"):
        return 1
    if args.device == "auto" and ray.is_initialized():
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return 0


def realtime_app(args: argparse.Namespace) -> Any:
    """The Serve application for the parsed ``serve`` options."""
    return RealtimeReplica.options(
        num_replicas=args.replicas,
        max_ongoing_requests=2 * args.max_sessions + HEADROOM_REQUESTS,
        graceful_shutdown_timeout_s=args.drain_timeout,
        graceful_shutdown_wait_loop_s=1.0,
        health_check_period_s=2.0,
        ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": gpus_per_replica(args)},
        request_router_config=RequestRouterConfig(request_router_class=SlotRouter,
                                                  request_routing_stats_period_s=STATS_PERIOD_S,
                                                  request_routing_stats_timeout_s=5.0),
    ).bind(args)
