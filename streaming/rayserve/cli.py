"""``mimo-agent serve --ray``: the options, the builder's arguments, and the local cluster."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

log = logging.getLogger("mimo_agent.serve")

#: set before Ray starts so every Ray process inherits them
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "streaming.rayserve.proxy:middlewares",
}


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("scale-out on Ray Serve (pip install '.[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve --replicas engines behind one endpoint through Ray Serve")
    g.add_argument("--replicas", type=int, default=2, help="engines (Serve replicas), each with the options above")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto); default: start a local one for this command")
    g.add_argument("--gpus-per-replica", type=float, default=None,
                   help="default: 1 with --device cuda, or with auto when the cluster has GPUs; else 0")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved per replica (default 1)")
    g.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds a replica being removed waits for its sessions to end (default 300)")
    g.add_argument("--object-store-mb", type=int, default=128,
                   help="object store of the local cluster (default 128 MB; sessions do not use it)")


def parse_builder_args(options: dict[str, Any]) -> argparse.Namespace:
    """``build_app``'s arguments (``{"preset": "tiny", "max-sessions": 8, "ice-server": [...]}``) as
    ``serve`` options, checked by the same parser."""
    from streaming.server import add_arguments

    parser = argparse.ArgumentParser(prog="streaming.rayserve:build_app")
    add_arguments(parser, "serve")
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True or str(value).lower() == "true":
            argv.append(flag)
        elif value is False or value is None or str(value).lower() == "false":
            continue
        else:
            for item in value if isinstance(value, list) else [value]:
                argv += [flag, str(item)]
    args = parser.parse_args(argv)
    args.command = "serve"
    return args


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def drain(app_name: str, timeout_s: float) -> None:
    """Delete the application: each replica finishes its sessions, up to ``timeout_s``. SIGTERM
    (Kubernetes, systemd) drains; Ctrl-C, which also reaches the local Ray processes, does not."""
    from ray import serve

    log.info("draining: sessions may run for up to %g s", timeout_s)
    deleting = threading.Thread(target=serve.delete, args=(app_name,), daemon=True)
    deleting.start()
    deleting.join(timeout_s + 30)  # Serve kills a replica at the deadline; never wait on a broken cluster


def run_ray(args: argparse.Namespace) -> int:
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    from ray import serve

    from streaming.rayserve.replica import APP_NAME, realtime_app
    from streaming.server import write_port_file

    local = args.ray_address is None
    if args.port == 0:
        args.port = free_port(args.host)
    if local:
        ray.init(include_dashboard=False, object_store_memory=args.object_store_mb << 20, logging_level="warning")
    else:
        ray.init(address=args.ray_address, logging_level="warning")

    terminated = threading.Event()

    def stop(*_: Any) -> None:
        if not terminated.is_set():  # a second SIGTERM does not cut the drain short
            terminated.set()
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        started = time.monotonic()
        serve.run(realtime_app(args), name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d through Ray Serve: %d replicas of %d slots, ready in %.1f s",
                 args.host, args.port, args.replicas, args.max_sessions, time.monotonic() - started)
        if args.port_file:
            write_port_file(args.port_file, args.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if terminated.is_set() or not local:
            drain(APP_NAME, args.drain_timeout)
        if local:  # the cluster and every replica go with it
            ray.shutdown()
    return 0
