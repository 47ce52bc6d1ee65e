"""The exported graphs: well-formed, described by the manifest, equal to PyTorch, reproducible."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from export.exporter import GRAPH_NAMES, RTOL, export_all, graph_defs, validate_graph
from export.manifest import FORMAT, MANIFEST_VERSION, file_sha256, read_manifest, runtime_sources

pytestmark = pytest.mark.timeout(600)


def test_manifest_describes_every_graph(export_dir, runtime):
    manifest = read_manifest(export_dir)
    assert (manifest.format, manifest.version, manifest.dtype) == (FORMAT, MANIFEST_VERSION, "float32")
    assert sorted(manifest.graphs) == sorted(GRAPH_NAMES)
    assert manifest.sources == runtime_sources(runtime)
    assert manifest.sources["lm"].kind == "preset" and manifest.sources["lm"].name == "tiny"
    raw = json.loads((export_dir / "manifest.json").read_text())
    assert raw["package_version"] and raw["tools"]["onnxruntime"]
    for name, spec in manifest.graphs.items():
        path = export_dir / spec.file
        assert file_sha256(path) == spec.sha256
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs], name
        assert [o.name for o in model.graph.output] == [t.name for t in spec.outputs], name
        for data_file, size in spec.data.items():  # weights live outside the graph
            assert (export_dir / data_file).stat().st_size == size > 0
        assert spec.validation["max_error"], name  # validated at export


def test_dynamic_axes_are_symbolic(export_dir, runtime):
    graphs = read_manifest(export_dir).graphs
    shape = {(g, t.name): t.shape for g, spec in graphs.items() for t in spec.inputs + spec.outputs}
    hidden, local = runtime.lm.config.hidden_size, runtime.lm.config.local_dim
    assert shape["patch_decoder", "h"] == ["batch", hidden]
    assert shape["patch_decoder", "codes"] == ["batch", 4, 8]
    assert shape["patch_decoder", "all_greedy"] == []
    assert shape["patch_decoder_step", "x"] == ["batch", local]
    cfg = runtime.lm.config
    assert shape["backbone_step", "past_k"] == [cfg.num_hidden_layers, "batch", cfg.num_key_value_heads, "span",
                                                 cfg.head_dim]
    assert shape["backbone_step", "hidden"] == ["batch", hidden]
    assert shape["patch_encoder", "codes"] == ["patches", 4, 8]
    assert shape["codec_encoder", "mel"] == ["batch", "mel_frames", 128]
    chunk = {name: dims for (g, name), dims in shape.items() if g == "codec_decoder_chunk"}
    assert chunk["codes"] == ["batch", "tokens", 8]
    assert chunk["past_key_0"][0] == "batch" and chunk["past_key_0"][2] == "past_frames"
    assert all(isinstance(d, str) for d in chunk["spectrum_real"][::2])  # batch and window length


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graph_matches_pytorch_on_fresh_inputs(export_dir, runtime, name):
    """Each graph against the PyTorch path itself (``embed_patches``, ``local_step``,
    ``decode_patch``, ``AudioEncoder.encode``, the chunk module), on inputs the export never saw."""
    gdef = graph_defs(runtime.lm, runtime.codec, [name])[0]
    spec = read_manifest(export_dir).graphs[name]
    result = validate_graph(gdef, export_dir / spec.file, seed=20251125)
    floats = {t.name for t in spec.outputs if t.dtype.startswith("float")}
    assert set(result["max_error"]) == {t.name for t in spec.outputs}
    for output, error in result["max_error"].items():
        if output in floats:
            assert error < RTOL, (output, error)
        else:
            assert error == 0, (output, error)  # codes and lengths: exact


def test_reexport_gives_the_same_bytes(export_dir, runtime, tmp_path):
    """Deterministic export: the same graph and weights files, byte for byte (no paths, no times)."""
    names = ["patch_encoder", "patch_decoder_step", "codec_encoder"]
    again = export_all(runtime.lm, runtime.codec, tmp_path, runtime_sources(runtime), names=names,
                       validate=False, report=lambda line: None)
    first = read_manifest(export_dir)
    for name in names:
        assert again.graphs[name].sha256 == first.graphs[name].sha256, name
        for data_file in again.graphs[name].data:
            assert (tmp_path / data_file).read_bytes() == (export_dir / data_file).read_bytes(), data_file


def test_validation_catches_a_wrong_graph(export_dir, runtime):
    """The validation can fail: the step graph run one position off from what PyTorch was asked."""
    gdef = graph_defs(runtime.lm, runtime.codec, ["patch_decoder_step"])[0]
    cases = gdef.cases

    def off_by_one(g):
        shifted = cases(g)
        for inputs, _ in shifted:
            inputs["step"] = np.asarray((inputs["step"] + 1) % runtime.lm.config.local_steps)
        return shifted

    gdef.cases = off_by_one
    result = validate_graph(gdef, export_dir / "patch_decoder_step.onnx")
    assert result["max_error"]["hidden"] > 1e-2


def test_only_fp32_weights_are_exported(tmp_path):
    from agent.codec import load_audio_tokenizer
    from export.exporter import ExportError
    from export.manifest import Source

    tok = load_audio_tokenizer(None, preset="tiny", dtype="bf16", device="cpu")
    with pytest.raises(ExportError, match=r"fp32 weights, not torch\.bfloat16"):
        export_all(None, tok, tmp_path, {"codec": Source("preset", "tiny", "", "")}, report=lambda line: None)
    assert not (tmp_path / "manifest.json").exists()
