"""ONNX export of the hot paths and ONNX Runtime runners (CPU, CUDA, TensorRT).

    mimo-agent export --out DIR --preset tiny            # or --model M --tokenizer T
    mimo-agent serve --backend onnx --export-dir DIR [--providers tensorrt,cuda,cpu]
    mimo-agent bench-onnx --export-dir DIR               # ONNX Runtime vs PyTorch, side by side

- :mod:`export.graphs`: the exported computations as pure modules (state in, state out).
- :mod:`export.exporter`: ``torch.onnx.export``, ``onnx.checker``, validation against PyTorch.
- :mod:`export.manifest`: ``manifest.json``, source and weights fingerprints.
- :mod:`export.runtime`: sessions and providers, IO binding, ``onnx_backend`` (the server's
  drop-in ``decode_patch`` and codec), ``onnx_patch_encoder``.
- :mod:`export.codec`: the codec on ONNX Runtime (encoder graph, streaming chunk graph).
- :mod:`export.cli`, :mod:`export.bench`: the ``export`` and ``bench-onnx`` commands.
"""

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
