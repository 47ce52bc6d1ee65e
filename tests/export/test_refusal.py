"""A stale, foreign or damaged export directory is refused with an error that names the problem."""

from __future__ import annotations

import json

import pytest
import torch

from export.manifest import ExportMismatch
from export.runtime import onnx_backend, resolve_providers


def _edit_manifest(directory, change) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_other_weights_are_refused(runtime, export_copy):
    def other(data):
        data["sources"]["lm"]["weights"] = "0123456789abcdef"

    _edit_manifest(export_copy, other)
    with pytest.raises(ExportMismatch, match=r"lm graphs were exported from .*weights 0123456789abcdef.*re-export"):
        onnx_backend(runtime, export_copy)


def test_another_preset_is_refused(runtime, export_copy):
    def other(data):
        data["sources"]["codec"].update(name="mimo-audio-tokenizer", fingerprint="feedfacefeedface")

    _edit_manifest(export_copy, other)
    with pytest.raises(ExportMismatch, match=r"codec graphs .*preset 'mimo-audio-tokenizer'.*feedfacefeedface"):
        onnx_backend(runtime, export_copy)


def test_changed_weights_in_the_runtime_are_refused(runtime, export_dir):
    """The check reads the served weights: a model changed after the export no longer matches."""
    weight = runtime.lm.local_transformer.layers[0].mlp.up_proj.weight
    saved = weight.clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
        with pytest.raises(ExportMismatch, match="lm graphs"):
            onnx_backend(runtime, export_dir)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_wrong_manifest_version_is_refused(runtime, export_copy):
    _edit_manifest(export_copy, lambda data: data.update(version=0))
    with pytest.raises(ExportMismatch, match="manifest version 0"):
        onnx_backend(runtime, export_copy)


def test_foreign_manifest_is_refused(runtime, export_copy):
    _edit_manifest(export_copy, lambda data: data.update(format="someone-else"))
    with pytest.raises(ExportMismatch, match="format 'someone-else'"):
        onnx_backend(runtime, export_copy)


def test_missing_graph_is_refused(runtime, export_copy):
    (export_copy / "codec_decoder_chunk.onnx").unlink()
    with pytest.raises(ExportMismatch, match=r"graph 'codec_decoder_chunk'.*missing"):
        onnx_backend(runtime, export_copy)


def test_graph_absent_from_the_manifest_is_refused(runtime, export_copy):
    _edit_manifest(export_copy, lambda data: data["graphs"].pop("patch_decoder"))
    with pytest.raises(ExportMismatch, match="no 'patch_decoder' graph"):
        onnx_backend(runtime, export_copy)


def test_changed_graph_file_is_refused(runtime, export_copy):
    path = export_copy / "patch_decoder.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ExportMismatch, match=r"patch_decoder\.onnx differs"):
        onnx_backend(runtime, export_copy)


def test_truncated_weights_are_refused(runtime, export_copy):
    path = export_copy / "codec_encoder.onnx.data"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ExportMismatch, match=r"codec_encoder.onnx.data has \d+ bytes, the manifest says"):
        onnx_backend(runtime, export_copy)


def test_missing_manifest_or_directory_is_refused(runtime, export_copy, tmp_path):
    (export_copy / "manifest.json").unlink()
    with pytest.raises(ExportMismatch, match=r"manifest\.json is missing"):
        onnx_backend(runtime, export_copy)
    with pytest.raises(ExportMismatch, match="does not exist"):
        onnx_backend(runtime, tmp_path / "nowhere")
    with pytest.raises(ExportMismatch, match="needs --export-dir"):
        onnx_backend(runtime, None)


def test_provider_names_are_checked():
    assert resolve_providers(None, "cpu") == ("cpu",)
    assert resolve_providers("CPU", "cpu") == ("cpu",)
    with pytest.raises(ValueError, match=r"unknown ONNX Runtime provider.*'rocm'"):
        resolve_providers("rocm,cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal when no CUDA device is visible")
def test_gpu_providers_without_a_gpu_are_refused():
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        resolve_providers("tensorrt,cuda")
    assert resolve_providers("cuda,cpu") == ("cpu",)  # falls back to what can run, with a warning
