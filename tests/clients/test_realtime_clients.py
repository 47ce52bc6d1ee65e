"""Realtime clients people use, each running its own code against the live server (see harness.py):
the official ``openai`` SDK, Pipecat's OpenAI Realtime service, LiveKit Agents' OpenAI realtime
plugin, openai-agents-js's ``RealtimeSession`` in Node, and this project's SDK installed on its own."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest

from tests.clients.harness import (
    DRIVERS,
    ROOT,
    check_report,
    client_env,
    clients_required,
    python_of,
    run_driver,
)

pytestmark = pytest.mark.timeout(300)


def require(found: bool, what: str) -> None:
    if not found:
        if clients_required():
            pytest.fail(f"{what} is missing")
        pytest.skip(f"{what} is missing")


def test_openai_sdk(server):
    require(importlib.util.find_spec("openai") is not None, "the openai SDK (dev extra: openai[realtime])")
    report = run_driver([sys.executable, str(DRIVERS / "openai_sdk.py")], server.ws_url)
    check_report(report)
    assert report["notes"]["status"] == "cancelled", str({k: v for k, v in report.items() if k != "log"})


def test_pipecat(server):
    env = client_env("pipecat", "bin/python")
    report = run_driver([python_of(env), str(DRIVERS / "pipecat_driver.py")], server.ws_url)
    check_report(report)
    assert (report["notes"]["text_status"], report["notes"]["status"]) == ("completed", "cancelled")


def test_livekit_agents(server):
    env = client_env("livekit", "bin/python")
    report = run_driver([python_of(env), str(DRIVERS / "livekit_driver.py")], server.ws_url)
    check_report(report)
    # LiveKit reports a refused chat-context item only as a warning, and carries on without it
    assert report["notes"]["warnings"] == [], report["notes"]["warnings"]


def test_openai_agents_js(server):
    require(shutil.which("node") is not None, "node")
    env = client_env("agents-js", "node_modules/@openai/agents-realtime/package.json")
    report = run_driver(["node", str(DRIVERS / "agents_js_driver.cjs"), str(env)], server.ws_url)
    check_report(report)
    assert (report["notes"]["text_status"], report["notes"]["status"]) == ("completed", "cancelled")


def test_python_sdk_installed_alone(server, tmp_path):
    """``clients/python`` installs the SDK without the server's dependencies, into a fresh
    environment, and it plays the same scenario from there."""
    venv, wheels = tmp_path / "venv", tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # the wheel is built with our setuptools (no isolated build env to fetch); its dependencies
    # come from the index into the fresh environment
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT / "clients" / "python")], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([*pip, "--python", python_of(venv), "install", *map(str, wheels.glob("*.whl"))], check=True)
    # isolated (-I) and away from the checkout, so only the venv's own distributions are listed
    # (from the repository root, the server's editable egg-info would be found through the cwd)
    installed = subprocess.run(
        [python_of(venv), "-I", "-c", "import importlib.metadata as m; print(*sorted(m.packages_distributions()))"],
        capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert "mimo_realtime" in installed
    assert not {"torch", "aiortc", "onnxruntime", "matplotlib", "streaming", "agent"} & set(installed), installed
    report = run_driver([python_of(venv), str(DRIVERS / "mimo_sdk.py")], server.ws_url)
    check_report(report)
    assert report["notes"]["status"] == "cancelled" and report["notes"]["truncated_ms"] > 0
    assert report["notes"]["torch_importable"] is False
