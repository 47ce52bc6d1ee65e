"""A server the benchmark starts itself: ``mimo-agent serve`` as a subprocess on 127.0.0.1, on a
port it picks (``--port 0 --port-file``), stopped (SIGINT, then SIGKILL) when the run ends."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from streaming.bench.users import BenchError

START_TIMEOUT_S = 300.0
#: serve's model and engine options that ``bench --spawn`` passes on: (attribute, flag)
FORWARDED = (
    ("model", "--model"), ("tokenizer", "--tokenizer"), ("preset", "--preset"), ("device", "--device"),
    ("dtype", "--dtype"), ("max_sessions", "--max-sessions"), ("max_positions", "--max-positions"),
    ("max_batch", "--max-batch"), ("prefill_chunk", "--prefill-chunk"), ("interleave", "--interleave"),
    ("codec_first_chunk", "--codec-first-chunk"), ("codec_chunk", "--codec-chunk"), ("backend", "--backend"),
    ("export_dir", "--export-dir"), ("providers", "--providers"), ("threads", "--threads"),
    ("turn_model", "--turn-model"),
)
FORWARDED_SWITCHES = (("no_warmup", "--no-warmup"), ("cuda_graphs", "--cuda-graphs"), ("codec_prior", "--codec-prior"))
#: switches on by default, passed on only when off (``--no-...``): a server of an older tree may lack them
ONLY_OFF = ("codec_prior",)


def serve_argv(args: argparse.Namespace, **overrides: Any) -> list[str]:
    """``serve`` options equal to the benchmark's model/engine options, with ``overrides``."""
    values = {name: getattr(args, name, None) for name, _ in FORWARDED}
    values.update(overrides)
    argv: list[str] = []
    for name, flag in FORWARDED:
        if values.get(name) is not None:
            argv += [flag, str(values[name])]
    for name, flag in FORWARDED_SWITCHES:
        value = overrides.get(name, getattr(args, name, None))
        if value is True and name not in ONLY_OFF:
            argv.append(flag)
        elif value is False and name in ("cuda_graphs", *ONLY_OFF):
            argv.append(flag.replace("--", "--no-", 1))
    return argv


class SpawnedServer:
    """``with SpawnedServer(argv) as server: server.url ...``"""

    def __init__(self, serve_args: list[str], *, timeout_s: float = START_TIMEOUT_S,
                 env: dict[str, str] | None = None) -> None:
        self.serve_args = serve_args
        self.env = env  # added to this process's environment (PYTHONPATH: another source tree)
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.port = 0
        self.health: dict[str, Any] = {}
        self.peak_rss_mb: float | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="mimo-bench-")
        self._log = Path(self._dir.name) / "server.log"

    def __enter__(self) -> SpawnedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        port_file = Path(self._dir.name) / "port"
        cmd = [sys.executable, "-m", "streaming.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(port_file), "--log-level", "warning", *self.serve_args]
        with open(self._log, "wb") as log:
            # run from the tree given as PYTHONPATH: ``-m`` puts the working directory first on sys.path,
            # and a source tree there (this one) would shadow it
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env} if self.env else None,
                                         cwd=(self.env or {}).get("PYTHONPATH"))
        deadline = time.monotonic() + self.timeout_s
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"the spawned server exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"the spawned server did not listen within {self.timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.url = f"ws://127.0.0.1:{self.port}/v1/realtime"
        self.health = fetch_health(self.url)

    def rss_mb(self, key: str = "VmHWM") -> float | None:
        """The server's resident memory (Linux): its peak so far (``VmHWM``), or now (``VmRSS``)."""
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) the server has used so far (Linux)."""
        if self.proc is None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.peak_rss_mb = self.rss_mb()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self._dir.cleanup()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def http_base(url: str) -> str:
    """The server's HTTP origin from its realtime (or HTTP) URL."""
    return url.replace("wss://", "https://").replace("ws://", "http://").split("/v1/")[0].rstrip("/")


def fetch_health(url: str, api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The server's ``/healthz`` (model, device, dtype, sessions ...), from its realtime URL."""
    base = http_base(url)
    request = urllib.request.Request(base + "/healthz")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except Exception as exc:
        raise BenchError(f"cannot reach the server at {base}/healthz: {exc}") from None


def machine() -> dict[str, Any]:
    """This machine: CPU model, cores, load, GPU (if torch sees one), torch version."""
    info: dict[str, Any] = {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0]}
    with contextlib.suppress(OSError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        info["torch"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
