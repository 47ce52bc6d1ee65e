"""Runs the JavaScript SDK's tests (`node --test`, Node's built-in runner) so that the project's one
test command covers them. One pytest test per test file, so a failure names the file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
JS_TESTS = sorted((REPO_ROOT / "tests" / "web" / "sdk").glob("*.test.mjs"))
NODE_TIMEOUT_S = 120


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the JavaScript SDK tests need Node.js >= 20", pytrace=False)
    return node


def test_js_test_files_exist() -> None:
    names = {p.name for p in JS_TESTS}
    assert {"protocol.test.mjs", "client.test.mjs", "fixtures.test.mjs"} <= names, names


@pytest.mark.parametrize("test_file", JS_TESTS, ids=[p.name for p in JS_TESTS])
def test_js_sdk(test_file: Path) -> None:
    result = subprocess.run(
        [_node(), "--test", "--test-reporter=spec", str(test_file)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
    )
    assert result.returncode == 0, f"node --test {test_file.name} failed:\n{result.stdout}\n{result.stderr}"
    # Guard against a runner that found nothing to run.
    assert "ℹ pass 0" not in result.stdout, result.stdout
    assert "ℹ fail 0" in result.stdout, result.stdout


def test_every_web_script_parses() -> None:
    """`node --check` on every script of the page and the SDK, worklets and browser-only modules
    included (the node tests import only the modules that run outside a browser)."""
    scripts = sorted((REPO_ROOT / "web").rglob("*.js"))
    assert len(scripts) >= 15, scripts
    for script in scripts:
        result = subprocess.run([_node(), "--check", str(script)], capture_output=True, text=True,
                                timeout=NODE_TIMEOUT_S)
        assert result.returncode == 0, f"{script.relative_to(REPO_ROOT)}: {result.stderr}"
