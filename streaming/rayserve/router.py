"""The request router: slot-aware for new sessions, exact for requests that name a call.

It runs inside Ray Serve's proxy (one per node), so its load figures are the replicas' own
(``record_routing_stats``: sessions, slots, session openings received), refreshed every
``request_routing_stats_period_s``, plus the openings this router sent since that a report does
not show yet. A new session goes to the replica with the most free slots; full replicas come last
rather than never, because a request Serve cannot place waits forever: the least-loaded full
replica refuses it at once with ``server_busy``, which is the answer the client should get.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from streaming.rayserve.routes import RequestKind, call_replica, classify

log = logging.getLogger(__name__)


def request_scope(pending_request: PendingRequest | None) -> dict[str, Any]:
    """The ASGI scope of an HTTP request from Serve's proxy ({} for anything else)."""
    if pending_request is None or not pending_request.args:
        return {}
    arg = pending_request.args[0]
    if isinstance(arg, bytes):  # the proxy pickles its StreamingHTTPRequest itself, to skip Ray's serializer
        try:
            arg = pickle.loads(arg)
        except Exception:
            return {}
    scope = getattr(arg, "_asgi_scope", None)
    return scope if isinstance(scope, dict) else {}


class SlotRouter(FIFOMixin, RequestRouter):
    """Fewest sessions first among replicas with a free slot; a call's follow-ups to its replica."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._unreported: dict[ReplicaID, int] = {}  # openings sent that the replica's stats do not show yet
        self._opened_seen: dict[ReplicaID, int] = {}  # the replica's "opened" counter at its last report

    def _load(self, replica: RunningReplica) -> tuple[bool, int, int]:
        """(full, estimated sessions, reported sessions): the sort key, least loaded first."""
        stats = replica.routing_stats or {}
        rid = replica.replica_id
        opened = stats.get("opened")
        if opened is not None:
            seen = self._opened_seen.get(rid, 0)  # a replica counts from 0: openings sent before its first report
            if opened > seen:  # the report now includes that many more openings
                self._unreported[rid] = max(0, self._unreported.get(rid, 0) - (opened - seen))
            self._opened_seen[rid] = opened
        reported = int(stats.get("sessions", 0))
        estimated = reported + self._unreported.get(rid, 0)
        slots = stats.get("slots")
        return (slots is not None and estimated >= slots), estimated, reported

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kind, call_id = classify(request_scope(pending_request))
        if kind is RequestKind.CALL and call_id:
            owner = call_replica(call_id)
            named = [r for r in candidate_replicas if r.replica_id.unique_id == owner]
            if named:
                return [named]
            # the replica is gone (or the id is not one of ours): any replica answers call_not_found
        ranked = sorted(candidate_replicas, key=self._load)
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        if classify(request_scope(pending_request))[0] is RequestKind.OPEN:
            self._unreported[replica_id] = self._unreported.get(replica_id, 0) + 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._unreported.pop(replica_id, None)
        self._opened_seen.pop(replica_id, None)
