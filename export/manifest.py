"""``manifest.json`` of an export directory, and the fingerprints that tie it to its weights.

An export directory holds one ``NAME.onnx`` per graph (weights in ``NAME.onnx.data``) and a
manifest::

    {
      "format": "mimo-voice-agent/onnx", "version": 1, "package_version": "0.1.0",
      "opset": 18, "dtype": "float32",
      "tools": {"torch": "2.13.0", "onnx": "1.23.2", "onnxruntime": "1.31.1", "onnxscript": "0.7.2"},
      "sources": {
        "lm":    {"kind": "preset", "name": "tiny", "fingerprint": "<16 hex>", "weights": "<16 hex>"},
        "codec": {"kind": "checkpoint", "name": "/path/to/MiMo-Audio-Tokenizer", ...}
      },
      "settings": {"codec_codebooks": 8, "patch_codes": 32, "group_size": 4, "channels": 8, ...},
      "graphs": {
        "patch_decoder": {
          "file": "patch_decoder.onnx", "sha256": "...", "data": {"patch_decoder.onnx.data": 1234},
          "inputs":  [{"name": "h", "dtype": "float32", "shape": ["batch", 128]}, ...],
          "outputs": [{"name": "codes", "dtype": "int64", "shape": ["batch", 4, 8]}],
          "validation": {"max_rel_error": {"codes": 0.0}, ...}
        }, ...
      }
    }

Shapes are lists of ints and symbolic names. ``fingerprint`` identifies the source: for a
checkpoint :func:`agent.checkpoint.checkpoint_fingerprint` of its directory, for a preset a hash
of its name, config and seed. ``weights`` is :func:`weights_fingerprint` of the module that was
exported: a server compares it with the weights it has loaded, which is what really matters
(the runtime does not know which directory its weights came from).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "mimo-voice-agent/onnx"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ExportMismatch(RuntimeError):
    """An export directory that does not fit the model being served; the message names the mismatch."""


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, float64, int64, bool
    shape: list[int | str]  # ints and symbolic dimension names


@dataclass
class GraphSpec:
    file: str
    sha256: str  # of the .onnx file (the graph; weights are in the data files)
    data: dict[str, int]  # external data file -> size in bytes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    validation: dict[str, Any] = field(default_factory=dict)


@dataclass
class Source:
    """Where exported weights came from."""

    kind: str  # "preset" or "checkpoint"
    name: str  # preset name or checkpoint directory
    fingerprint: str
    weights: str


@dataclass
class Manifest:
    opset: int
    dtype: str
    package_version: str
    tools: dict[str, str]
    sources: dict[str, Source]
    settings: dict[str, Any]
    graphs: dict[str, GraphSpec]
    format: str = FORMAT
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        graphs = {
            name: GraphSpec(
                file=g["file"], sha256=g["sha256"], data=dict(g["data"]),
                inputs=[TensorSpec(**t) for t in g["inputs"]], outputs=[TensorSpec(**t) for t in g["outputs"]],
                validation=g.get("validation", {}),
            )
            for name, g in data["graphs"].items()
        }
        sources = {name: Source(**s) for name, s in data["sources"].items()}
        return cls(opset=data["opset"], dtype=data["dtype"], package_version=data["package_version"],
                   tools=data["tools"], sources=sources, settings=data["settings"], graphs=graphs,
                   format=data["format"], version=data["version"])


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of ``directory``; :class:`ExportMismatch` for a missing, foreign or old one."""
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        raise ExportMismatch(f"ONNX export directory {directory} does not exist; create it with `mimo-agent export`")
    if not path.is_file():
        raise ExportMismatch(f"{path} is missing: {directory} is not an ONNX export (run `mimo-agent export`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportMismatch(f"{path} is not valid JSON: {exc}") from None
    if data.get("format") != FORMAT:
        raise ExportMismatch(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("version") != MANIFEST_VERSION:
        raise ExportMismatch(
            f"{path} has manifest version {data.get('version')!r}; this runtime reads version "
            f"{MANIFEST_VERSION}: re-export with `mimo-agent export`"
        )
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise ExportMismatch(f"{path} is incomplete or malformed ({exc!r}); re-export it") from None


def check_graph_files(directory: str | Path, manifest: Manifest, names: list[str]) -> dict[str, Path]:
    """Paths of the graphs ``names``; :class:`ExportMismatch` names a graph or file that is absent,
    changed (hash of the .onnx file) or truncated (size of its weights)."""
    directory = Path(directory)
    paths = {}
    for name in names:
        spec = manifest.graphs.get(name)
        if spec is None:
            raise ExportMismatch(
                f"{directory} has no {name!r} graph (it has {', '.join(sorted(manifest.graphs)) or 'none'}); "
                "re-export with `mimo-agent export`"
            )
        path = directory / spec.file
        if not path.is_file():
            raise ExportMismatch(f"graph {name!r}: {path} is missing")
        if file_sha256(path) != spec.sha256:
            raise ExportMismatch(f"graph {name!r}: {path} differs from the one the manifest describes")
        for data_name, size in spec.data.items():
            data_path = directory / data_name
            if not data_path.is_file():
                raise ExportMismatch(f"graph {name!r}: weights file {data_path} is missing")
            if data_path.stat().st_size != size:
                raise ExportMismatch(
                    f"graph {name!r}: weights file {data_path} has {data_path.stat().st_size} bytes, "
                    f"the manifest says {size}"
                )
        paths[name] = path
    return paths


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def preset_fingerprint(name: str, config: dict[str, Any], seed: int) -> str:
    """A hash of a preset: its name, config (as official ``config.json`` fields) and weight seed."""
    text = json.dumps({"preset": name, "config": config, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: values sampled per tensor by :func:`weights_fingerprint`
FINGERPRINT_SAMPLES = 64


@torch.no_grad()
def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's parameter and buffer names, shapes and 64 evenly spaced values of each.

    Values are rounded to bf16 first, so the same weights loaded in fp32 or bf16 agree (a
    checkpoint exported in fp32 and served in bf16 on a GPU). Cheap even for 7B parameters.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        idx = torch.linspace(0, flat.numel() - 1, min(FINGERPRINT_SAMPLES, flat.numel()), device=flat.device)
        sample = flat[idx.round().long()]
        if sample.is_floating_point():
            sample = sample.float().to(torch.bfloat16).view(torch.int16)
        h.update(sample.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


#: ``load_audio_tokenizer``'s default weight seed, which ``load_runtime`` uses for codec presets
CODEC_PRESET_SEED = 0


def runtime_sources(runtime: Any, model_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None
                    ) -> dict[str, Source]:
    """The :class:`Source` of the LM and the codec of an ``agent.runtime.Runtime``.

    A part is a preset when the runtime was built from one and no checkpoint directory is given
    for it (a preset LM may run with a checkpoint tokenizer). ``model_dir``/``tokenizer_dir`` add
    the checkpoints' file fingerprints (:func:`agent.checkpoint.checkpoint_fingerprint`); without
    them a checkpoint is identified by its weights fingerprint alone (a running server does not
    know its checkpoint directory).
    """
    from agent.checkpoint import checkpoint_fingerprint
    from agent.codec.config import preset as codec_preset
    from agent.lm.config import preset as lm_preset
    from agent.runtime import CODEC_PRESET

    sources = {}
    lm_weights, codec_weights = weights_fingerprint(runtime.lm), weights_fingerprint(runtime.codec)
    if runtime.preset is not None and model_dir is None:
        p = lm_preset(runtime.preset)
        sources["lm"] = Source("preset", p.name, preset_fingerprint(p.name, p.config.to_dict(), p.seed), lm_weights)
    else:
        sources["lm"] = _checkpoint_source(model_dir, runtime.name, lm_weights, checkpoint_fingerprint)
    codec_name = CODEC_PRESET.get(runtime.preset or "")
    codec_config = runtime.codec.config.to_dict()
    if codec_name is not None and tokenizer_dir is None and codec_config == codec_preset(codec_name).to_dict():
        fingerprint = preset_fingerprint(codec_name, codec_config, CODEC_PRESET_SEED)
        sources["codec"] = Source("preset", codec_name, fingerprint, codec_weights)
    else:
        sources["codec"] = _checkpoint_source(tokenizer_dir, "audio tokenizer", codec_weights, checkpoint_fingerprint)
    return sources


def _checkpoint_source(directory, fallback_name: str, weights: str, fingerprint_of) -> Source:
    if directory is None:
        return Source("checkpoint", fallback_name, "", weights)
    return Source("checkpoint", str(Path(directory).resolve()), fingerprint_of(directory), weights)
