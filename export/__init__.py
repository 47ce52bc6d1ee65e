"""ONNX export of the hot paths and ONNX Runtime runners (CPU, CUDA, TensorRT)."""

from __future__ import annotations

from pathlib import Path


def package_version() -> str:
    """The installed ``mimo-voice-agent`` version, else the one in the source tree's pyproject.toml."""
    from importlib import metadata

    try:
        return metadata.version("mimo-voice-agent")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]
