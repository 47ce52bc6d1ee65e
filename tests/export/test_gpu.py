"""CUDA and TensorRT providers: the same codes and audio as PyTorch, with IO binding on the device.

These need an NVIDIA GPU and onnxruntime-gpu; on a CPU-only machine they are skipped with the
reason shown. They load the tiny preset on the GPU in fp32 and export it there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.lm.sampling import SamplingBatch, SamplingParams

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)")


def _trt_available() -> bool:
    from export.runtime import available_providers

    return "tensorrt" in available_providers()


@pytest.fixture(scope="module")
def gpu_runtime():
    from agent.runtime import load_runtime

    return load_runtime(preset="tiny", device="cuda", dtype="fp32")


@pytest.fixture(scope="module")
def gpu_export(gpu_runtime, tmp_path_factory):
    from export.exporter import export_all
    from export.manifest import runtime_sources

    out = tmp_path_factory.mktemp("onnx-gpu")
    # the graphs are traced on the CPU (the exporter's device) from the GPU model's weights
    lm, codec = gpu_runtime.lm.to("cpu"), gpu_runtime.codec.to("cpu")
    try:
        export_all(lm, codec, out, runtime_sources(gpu_runtime), report=lambda line: None)
    finally:
        gpu_runtime.lm.to("cuda"), gpu_runtime.codec.to("cuda")
    return out


def _check_backend(runtime, export_dir, providers: str, **options) -> None:
    from agent.codec.streaming import stream_decode
    from export.runtime import onnx_backend

    backend = onnx_backend(runtime, export_dir, providers=providers, **options)
    decode_patch, codec = backend.decode_patch, backend.codec
    h = torch.randn(4, runtime.lm.config.hidden_size, device="cuda")
    params = SamplingBatch.from_params([SamplingParams(0.9, top_p=0.95)] * 4, "cuda")
    gens = [torch.Generator(device="cuda").manual_seed(i) for i in range(4)]
    gens2 = [torch.Generator(device="cuda").manual_seed(i) for i in range(4)]
    codes = decode_patch(h, params, gens)
    assert codes.device.type == "cuda"  # IO binding: the result stays on the device
    assert torch.equal(codes, runtime.lm.decode_patch(h, params, gens2))
    frames = torch.randint(0, 128, (48, 8))
    want, _ = stream_decode(runtime.codec, frames, runtime.codec.new_decode_stream().schedule)
    got, _ = stream_decode(codec, frames, codec.new_decode_stream().schedule)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


@pytest.mark.cuda
@needs_cuda
def test_cuda_provider_matches_pytorch(gpu_runtime, gpu_export):
    _check_backend(gpu_runtime, gpu_export, "cuda")


@pytest.mark.tensorrt
@needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not _trt_available(),
                    reason="needs the TensorRT execution provider and a CUDA device")
def test_tensorrt_provider_matches_pytorch(gpu_runtime, gpu_export, tmp_path):
    _check_backend(gpu_runtime, gpu_export, "tensorrt,cuda", trt_cache_dir=str(tmp_path / "trt"))
    assert any((tmp_path / "trt").iterdir())  # engines were cached
