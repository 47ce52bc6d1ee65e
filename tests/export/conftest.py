"""One export of the tiny preset per test session (the export takes about a minute on one core)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from agent.runtime import load_runtime
from export.exporter import export_all
from export.manifest import runtime_sources


@pytest.fixture(scope="session")
def runtime():
    """The tiny preset, fp32 on the CPU, as the server loads it."""
    torch.set_num_threads(1)
    return load_runtime(preset="tiny", device="cpu")


@pytest.fixture(scope="session")
def export_dir(runtime, tmp_path_factory) -> Path:
    """A complete, validated export of the tiny preset (read-only: copy it to tamper with it)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export_all(runtime.lm, runtime.codec, out, runtime_sources(runtime), report=lambda line: None)
    return out


@pytest.fixture
def export_copy(export_dir, tmp_path) -> Path:
    """A private copy of the export, free to be damaged."""
    return Path(shutil.copytree(export_dir, tmp_path / "copy"))
