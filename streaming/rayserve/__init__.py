"""Many engines behind one endpoint on Ray Serve: ``mimo-agent serve --ray --replicas N``, or
``serve run streaming.rayserve:build_app`` / a KubeRay ``RayService`` with that import path.

Each replica is one server exactly as ``mimo-agent serve`` builds it (one engine on one device, the
same routes and protocol) wrapped by ``@serve.ingress``. Ray Serve carries each WebSocket to one
replica for its whole life; what it does not do for this workload is added here:

* :mod:`.router`: a request router that sends a new session to the replica with the most free
  slots, as the replicas report them (WebRTC calls included, which Serve does not count), and a
  request naming a call (hang-up, the sideband WebSocket) to the replica that holds it;
* :mod:`.replica`: the deployment; a full replica refuses at once with the server's own
  ``server_busy`` (Serve's queue would hang or answer 500), replicas publish their load, list
  each other in ``/healthz`` and ``/metrics`` and share ephemeral client secrets through a small
  registry actor;
* :mod:`.proxy`: a middleware in Serve's HTTP proxy that ends a WebSocket whose replica died with an
  ``error`` event and close code 1012 instead of a dropped connection;
* :mod:`.cli`: the ``--ray`` options, the local cluster, the drain on SIGTERM;
* :mod:`.probe`: times ``server_busy`` with every slot taken (BENCHMARKS.md).

Ray is an optional dependency (``pip install ".[ray]"``); nothing here imports it until used.
"""

from __future__ import annotations

from typing import Any


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder (``serve run streaming.rayserve:build_app preset=tiny replicas=2``;
    KubeRay's ``serveConfigV2`` ``args``): the keys are ``mimo-agent serve`` options without dashes."""
    from streaming.rayserve.cli import parse_builder_args
    from streaming.rayserve.replica import realtime_app

    return realtime_app(parse_builder_args(args))
