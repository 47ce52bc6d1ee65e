"""Prometheus metrics of one server: sessions, queue depths, step times, first-audio latency.

One registry per app (tests start many servers in one process), exposed at ``GET /metrics``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: step-time buckets (seconds): sub-millisecond GPU steps to slow CPU prefills
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: first-audio buckets (seconds)
LATENCY_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class ServerMetrics:
    """The server's metrics; ``engine_observer`` is handed to the engine as its metrics callback."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], int] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions_active = Gauge("mimo_sessions_active", "Realtime sessions connected", ["transport"], registry=r)
        self.sessions_total = Counter("mimo_sessions", "Realtime sessions opened", ["transport"], registry=r)
        self.sessions_rejected = Counter("mimo_sessions_rejected", "Sessions refused", ["reason"], registry=r)
        self.client_errors = Counter("mimo_client_errors", "error events sent to clients", ["code"], registry=r)
        self.responses = Counter("mimo_responses", "Responses finished", ["status"], registry=r)
        self.step_seconds = Histogram("mimo_engine_step_seconds", "Engine work per tick, by stage",
                                      ["stage"], buckets=STEP_BUCKETS, registry=r)
        self.step_batch = Histogram("mimo_engine_batch_size", "Sessions per batched engine step", ["stage"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.first_audio_seconds = Histogram(
            "mimo_first_audio_seconds", "Server first-audio time: commit to first audio delta sent",
            buckets=LATENCY_BUCKETS, registry=r)
        self.send_queue = Gauge("mimo_send_queue_bytes", "Bytes of events waiting in session send queues", registry=r)
        self.engine_queue = Gauge("mimo_engine_queue_jobs", "Jobs waiting for the engine thread", registry=r)
        if queue_depth is not None:
            self.engine_queue.set_function(queue_depth)

    def engine_observer(self, stage: str, seconds: float, labels: dict) -> None:
        """The engine's metrics callback (called on the engine thread; prometheus_client is thread-safe)."""
        self.step_seconds.labels(stage).observe(seconds)
        batch = labels.get("batch")
        if batch is not None:
            self.step_batch.labels(stage).observe(batch)

    def render(self) -> bytes:
        return generate_latest(self.registry)
