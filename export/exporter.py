"""Export the hot paths to ONNX, check each graph, validate it against PyTorch, write the manifest.

``export_all(lm, codec, out_dir, sources)`` exports every graph of :mod:`export.graphs` with
``torch.onnx.export`` (the dynamo exporter: ``torch.cond`` becomes ONNX ``If`` and shapes stay
symbolic; the TorchScript exporter fails on these graphs, at the vocoder's complex spectrum
first), weights as external data, runs ``onnx.checker`` on each file, then runs it
on ONNX Runtime's CPU provider with fresh random inputs of other sizes than the export examples and
compares with the PyTorch path itself (``embed_patches``, ``local_step``, ``decode_patch``,
``AudioEncoder.encode``; the codec chunk against its module, and the whole streaming decode against
``decode_streams`` by the tests). A graph whose error exceeds the tolerance fails the export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from agent.codec.config import LM_CODEBOOKS
from agent.lm.patch_decoder import decode_patch, local_step
from agent.lm.sampling import SamplingBatch, SamplingParams, draw_uniform

from . import graphs
from .manifest import GraphSpec, Manifest, Source, TensorSpec, file_sha256

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
#: the graphs must match PyTorch to this relative error (max |onnx - torch| / max |torch|), fp32
RTOL = 1e-4
GRAPH_NAMES = ("patch_encoder", "backbone_step", "patch_decoder_step", "patch_decoder", "codec_encoder",
               "codec_decoder_chunk")


class ExportError(RuntimeError):
    """A graph that failed to export, failed the checker or does not match PyTorch."""


Case = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # (graph inputs, expected outputs)


@dataclass
class GraphDef:
    """How to export one graph and how to check it."""

    name: str
    module: nn.Module
    example: tuple  # export-time inputs (sizes >= 2 on dynamic axes: size 0/1 would be specialised)
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple
    cases: Callable[[torch.Generator], list[Case]]  # validation inputs and PyTorch's outputs
    #: per output: a function (case inputs, output array) -> the part that is defined (padding dropped)
    valid: dict[str, Callable[[dict[str, np.ndarray], np.ndarray], list[np.ndarray]]] | None = None


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _dim(name: str) -> Any:
    return torch.export.Dim(name, min=1)


# ----------------------------------------------------------------------------------------- LM graphs
def _random_codes(config, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Valid codes (..., channels), each channel's empty id included in its range."""
    return torch.stack([torch.randint(0, v, shape, generator=g) for v in config.speech_vocab_sizes], dim=-1)


def patch_encoder_def(lm: nn.Module) -> GraphDef:
    cfg = lm.config
    G = cfg.group_size
    empty = cfg.empty_token_id

    def cases(g: torch.Generator) -> list[Case]:
        out = []
        for n in (1, 5):
            codes = _random_codes(cfg, (n, G), g)
            ref = lm.embed_patches(torch.full((1, n), empty), codes[None])[0]  # speech patches
            out.append(({"codes": _np(codes)}, {"speech_embedding": _np(ref)}))
        return out

    g = torch.Generator().manual_seed(0)
    return GraphDef("patch_encoder", graphs.PatchEncoder(lm), (_random_codes(cfg, (3, G), g),),
                    ["codes"], ["speech_embedding"], ({0: _dim("patches")},), cases)


def backbone_step_def(lm: nn.Module) -> GraphDef:
    cfg = lm.config

    def case(lengths: list[int], g: torch.Generator) -> Case:
        """Rows with histories of ``lengths`` patches in a fresh cache, one ``decode_step`` for all."""
        B, span = len(lengths), max(max(lengths), 1)
        cache = lm.allocate_cache(B, span + 1)
        with torch.inference_mode():
            for b, n in enumerate(lengths):
                if n:
                    lm.prefill(cache, b, torch.randn(1, n, cfg.hidden_size, generator=g).to(lm.dtype))
            past_k, past_v = cache.k[:, :, :, :span].clone(), cache.v[:, :, :, :span].clone()
            emb = torch.randn(B, 1, cfg.hidden_size, generator=g).to(lm.dtype)
            hidden = lm.decode_step(cache, list(range(B)), emb)
        rows, pos = torch.arange(B), torch.tensor(lengths)
        inputs = {"emb": _np(emb), "pos": _np(pos), "past_k": _np(past_k), "past_v": _np(past_v)}
        return inputs, {"hidden": _np(hidden), "new_k": _np(cache.k[:, rows, :, pos].transpose(0, 1)),
                        "new_v": _np(cache.v[:, rows, :, pos].transpose(0, 1))}

    def cases(g: torch.Generator) -> list[Case]:
        return [case(lengths, g) for lengths in ([1], [6], [2, 9, 5], [0, 4])]

    g = torch.Generator().manual_seed(0)
    example = case([3, 2], g)[0]
    batch, span = _dim("batch"), _dim("span")
    return GraphDef("backbone_step", graphs.BackboneStep(lm), tuple(torch.from_numpy(example[n]) for n in example),
                    list(example), ["hidden", "new_k", "new_v"],
                    ({0: batch}, {0: batch}, {1: batch, 3: span}, {1: batch, 3: span}), cases)


def patch_decoder_step_def(lm: nn.Module) -> GraphDef:
    c = lm.local_transformer.cfg
    S = lm.config.local_steps

    def state(B: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        x = torch.randn(B, c.hidden_size, generator=g)
        k = torch.randn(c.num_layers, B, c.num_kv_heads, S, c.head_dim, generator=g)
        return x, k, torch.randn(k.shape, generator=g)

    def cases(g: torch.Generator) -> list[Case]:
        out = []
        for B, step in ((1, 0), (4, 5), (3, S - 1)):
            x, k, v = state(B, g)
            with torch.inference_mode():
                hidden, k2, v2 = local_step(lm, x[:, None].to(lm.dtype), step, k.clone(), v.clone())
            out.append(({"x": _np(x), "step": np.array(step, np.int64), "k_cache": _np(k), "v_cache": _np(v)},
                        {"hidden": _np(hidden), "k_cache_out": _np(k2), "v_cache_out": _np(v2)}))
        return out

    x, k, v = state(2, torch.Generator().manual_seed(0))
    batch = _dim("batch")
    return GraphDef("patch_decoder_step", graphs.PatchDecoderStep(lm), (x, torch.tensor(3), k, v),
                    ["x", "step", "k_cache", "v_cache"], ["hidden", "k_cache_out", "v_cache_out"],
                    ({0: batch}, None, {1: batch}, {1: batch}), cases)


def sampling_inputs(params: SamplingBatch, uniform: torch.Tensor | None, B: int, shape: tuple[int, ...]
                    ) -> dict[str, np.ndarray]:
    """The patch decoder graph's sampling inputs for a :class:`SamplingBatch` (zeros as noise when greedy)."""
    if uniform is None:
        uniform = torch.zeros(B, *shape)
    return {
        "uniform": _np(uniform.float()), "temperature": _np(params.temperature.float()),
        "top_k": _np(params.top_k.long()), "top_p": _np(params.top_p.float()), "greedy": _np(params.greedy),
        "all_greedy": np.array(params.all_greedy), "any_filter": np.array(params.any_filter),
    }


PATCH_DECODER_INPUTS = ["h", "uniform", "temperature", "top_k", "top_p", "greedy", "all_greedy", "any_filter"]


def patch_decoder_def(lm: nn.Module) -> GraphDef:
    sched = lm.schedule
    shape = (sched.num_codes,)  # one uniform number per code
    hidden = lm.config.hidden_size
    settings = {
        "greedy": [SamplingParams(greedy=True)] * 3,
        "official": [SamplingParams(0.9, top_p=0.95), SamplingParams(greedy=True), SamplingParams(0.6, top_k=50),
                     SamplingParams(1.3, top_k=20, top_p=0.8)],
        "temperature": [SamplingParams(0.8), SamplingParams(1.0)],
    }

    def cases(g: torch.Generator) -> list[Case]:
        out = []
        for i, rows in enumerate(settings.values()):
            B = len(rows)
            h = torch.randn(B, hidden, generator=g)
            params = SamplingBatch.from_params(rows)
            seeds = [1000 * i + b for b in range(B)]
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            with torch.inference_mode():
                codes = decode_patch(lm, h.to(lm.dtype), params, gens)
            uniform = None
            if not params.all_greedy:
                uniform = draw_uniform([torch.Generator().manual_seed(s) for s in seeds], B, shape, h.device)
            out.append(({"h": _np(h), **sampling_inputs(params, uniform, B, shape)}, {"codes": _np(codes)}))
        return out

    B = 2
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(B, hidden, generator=g), torch.rand(B, *shape, generator=g), torch.ones(B),
               torch.zeros(B, dtype=torch.int64), torch.ones(B), torch.zeros(B, dtype=torch.bool),
               torch.tensor(False), torch.tensor(True))
    batch = _dim("batch")
    dyn = ({0: batch}, {0: batch}, {0: batch}, {0: batch}, {0: batch}, {0: batch}, None, None)
    return GraphDef("patch_decoder", graphs.PatchDecoder(lm), example, PATCH_DECODER_INPUTS, ["codes"], dyn, cases)


# ------------------------------------------------------------------------------------- codec graphs
def codec_encoder_def(tok: nn.Module, n_q: int = LM_CODEBOOKS) -> GraphDef:
    n_mels = tok.config.n_mels

    def cases(g: torch.Generator) -> list[Case]:
        out = []
        for lengths in ([57, 20, 41], [10]):
            mel = torch.randn(len(lengths), max(lengths), n_mels, generator=g) * 2 - 4
            lens = torch.tensor(lengths)
            expected = tok.encoder.encode(mel, lens, n_q)
            len25 = tok.encoder.output_lengths(lens)[1]
            codes = torch.zeros(len(lengths), int(len25.max()), n_q, dtype=torch.int64)
            for b, c in enumerate(expected):
                codes[b, : c.shape[0]] = c
            out.append(({"mel": _np(mel), "mel_frames": _np(lens)}, {"codes": _np(codes), "tokens": _np(len25)}))
        return out

    def valid_codes(inputs: dict[str, np.ndarray], codes: np.ndarray) -> list[np.ndarray]:
        len25 = (((inputs["mel_frames"] + 1) // 2) + 1) // 2
        return [codes[b, :n] for b, n in enumerate(len25)]

    g = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 40, n_mels, generator=g), torch.tensor([40, 33]))
    batch, frames = _dim("batch"), _dim("mel_frames")
    return GraphDef("codec_encoder", graphs.CodecEncoder(tok, n_q), example, ["mel", "mel_frames"],
                    ["codes", "tokens"], ({0: batch, 1: frames}, {0: batch}), cases,
                    valid={"codes": valid_codes})


def chunk_input_names(layers: int) -> list[str]:
    names = ["codes", "new_tokens", "past_frames", "moments1", "moments2", "keep_moments1", "keep_moments2",
             "prev_hidden", "left_mel", "window_index", "window_frames", "spectrum_index"]
    for i in range(layers):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


def chunk_output_names(layers: int) -> list[str]:
    names = ["spectrum_real", "spectrum_imag", "mel", "moments1_out", "moments2_out", "last_hidden"]
    for i in range(layers):
        names += [f"new_key_{i}", f"new_value_{i}"]
    return names


def _random_moments(frames: list[int], channels: int, g: torch.Generator) -> torch.Tensor:
    """(count, sum, sum of squares) of random frames, fp64 (zeros for a row with none)."""
    rows = []
    for n in frames:
        y = (torch.randn(n, channels, generator=g) * 0.7 + 0.1).double()
        rows.append(torch.stack([torch.tensor(float(n * channels), dtype=torch.float64), y.sum(), y.square().sum()]))
    return torch.stack(rows)


def chunk_inputs(tok: nn.Module, new: list[int], past: list[int], left: list[int], g: torch.Generator,
                 keep: tuple[list[bool], list[bool]] | None = None, spectrum: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """Random but consistent inputs of the codec chunk graph for rows with ``new`` tokens, ``past``
    cached 50 Hz frames and ``left`` frames of mel context (the window: those, then the new
    frames); the spectrum of the last ``spectrum`` frames of each window (default: whole windows)."""
    cfg = tok.config
    B, N, P, Tl = len(new), max(new), max(past), max(left)
    H, D = cfg.decoder_attention_heads, cfg.d_model // cfg.decoder_attention_heads
    codes = torch.stack([torch.randint(0, cfg.codebook_size[q], (B, N), generator=g) for q in range(LM_CODEBOOKS)], -1)
    keep1, keep2 = keep or ([False] * B, [False] * B)
    window = torch.tensor(left) + 4 * torch.tensor(new)
    W = int(window.max())
    j = torch.arange(W)[None, :]
    lefts = torch.tensor(left)[:, None]
    K = spectrum or W
    inputs = {
        "codes": codes, "new_tokens": torch.tensor(new), "past_frames": torch.tensor(past),
        "moments1": _random_moments(past, cfg.d_model, g),
        "moments2": _random_moments([2 * p for p in past], cfg.n_mels, g),
        # distinct tensors: the exporter would take one tensor passed twice for a single input
        "keep_moments1": torch.tensor(keep1), "keep_moments2": torch.tensor(keep2),
        "prev_hidden": torch.randn(B, cfg.d_model, generator=g) * torch.tensor([p > 0 for p in past])[:, None],
        "left_mel": torch.randn(B, Tl, cfg.n_mels, generator=g),
        "window_index": torch.where(j < lefts, j, Tl + j - lefts),  # left context, then the new frames
        "window_frames": window,
        "spectrum_index": window[:, None] - K + torch.arange(K)[None, :],  # right-aligned
    }
    for i in range(cfg.decoder_layers):
        inputs[f"past_key_{i}"] = torch.randn(B, H, P, D, generator=g)
        inputs[f"past_value_{i}"] = torch.randn(B, H, P, D, generator=g)
    return inputs


def codec_decoder_chunk_def(tok: nn.Module) -> GraphDef:
    module = graphs.CodecDecoderChunk(tok)
    L = tok.config.decoder_layers
    names_in, names_out = chunk_input_names(L), chunk_output_names(L)

    def cases(g: torch.Generator) -> list[Case]:
        out = []
        for new, past, left, keep, spectrum in (
            ([4, 0, 2], [6, 0, 3], [8, 0, 5], ([False, False, True], [True, False, False]), None),
            ([4], [0], [0], None, None),
            ([1, 3], [40, 2], [30, 1], ([True, False], [False, True]), 9),
        ):
            inputs = chunk_inputs(tok, new, past, left, g, keep, spectrum)
            with torch.no_grad():
                expected = module(*[inputs[n] for n in names_in])
            out.append(({n: _np(t) for n, t in inputs.items()},
                        {n: _np(t) for n, t in zip(names_out, expected, strict=True)}))
        return out

    def rows(length: Callable[[dict[str, np.ndarray], int], int], axis: int):
        def valid(inputs: dict[str, np.ndarray], array: np.ndarray) -> list[np.ndarray]:
            return [np.take(array[b], range(length(inputs, b)), axis=axis - 1) for b in range(array.shape[0])]
        return valid

    def spectrum_columns(inputs: dict[str, np.ndarray], array: np.ndarray) -> list[np.ndarray]:
        index = inputs["spectrum_index"]  # frames before the window (index < 0) are undefined
        return [array[b][:, index[b] >= 0] for b in range(array.shape[0])]

    valid = {"spectrum_real": spectrum_columns, "spectrum_imag": spectrum_columns,
             "mel": rows(lambda i, b: int(4 * i["new_tokens"][b]), 1)}
    for i in range(L):
        for kind in ("key", "value"):
            valid[f"new_{kind}_{i}"] = rows(lambda i, b: int(2 * i["new_tokens"][b]), 2)

    example = chunk_inputs(tok, [3, 2], [4, 2], [5, 3], torch.Generator().manual_seed(0),
                           keep=([False, True], [True, False]), spectrum=6)
    batch, tokens, past, left = _dim("batch"), _dim("tokens"), _dim("past_frames"), _dim("left_frames")
    spectrum = _dim("spectrum_frames")
    window = _dim("window_frames")
    dyn: list[Any] = [{0: batch, 1: tokens}, {0: batch}, {0: batch}, {0: batch}, {0: batch}, {0: batch}, {0: batch},
                      {0: batch}, {0: batch, 1: left}, {0: batch, 1: window}, {0: batch}, {0: batch, 1: spectrum}]
    dyn.append(tuple({0: batch, 2: past} for _ in range(2 * L)))  # the *past varargs, one entry
    return GraphDef("codec_decoder_chunk", module, tuple(example[n] for n in names_in), names_in, names_out,
                    tuple(dyn), cases, valid=valid)


# -------------------------------------------------------------------------------------------- export
def graph_defs(lm: nn.Module | None, codec: nn.Module | None, names: list[str] | None = None) -> list[GraphDef]:
    makers = {"patch_encoder": (lm, patch_encoder_def), "backbone_step": (lm, backbone_step_def),
              "patch_decoder_step": (lm, patch_decoder_step_def),
              "patch_decoder": (lm, patch_decoder_def), "codec_encoder": (codec, codec_encoder_def),
              "codec_decoder_chunk": (codec, codec_decoder_chunk_def)}
    names = list(names or GRAPH_NAMES)
    for name in names:
        if name not in makers:
            raise ExportError(f"unknown graph {name!r}; choose from {', '.join(GRAPH_NAMES)}")
    return [makers[n][1](makers[n][0]) for n in names if makers[n][0] is not None]


def _onnx_dtype_name(elem_type: int) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        specs.append(TensorSpec(v.name, _onnx_dtype_name(t.elem_type), shape))
    return specs


def export_graph(gdef: GraphDef, out_dir: Path, opset: int = DEFAULT_OPSET) -> GraphSpec:
    """Export one graph to ``out_dir/NAME.onnx`` (+ ``.data``) and check it; no validation yet.

    The exporter's graph goes through the onnxscript optimizer (constant folding, rewrites: graphs
    2-10% faster on ONNX Runtime than without it, for about 20 s more export) and then ONNX
    Runtime's basic level (provider-independent rewrites with standard operators only), whose
    result is saved. Providers apply their own higher levels when they load it.
    """
    import onnxruntime as ort

    flat = [t for item in gdef.example for t in (item if isinstance(item, tuple) else (item,))]
    storages = [t.untyped_storage().data_ptr() for t in flat if t.numel()]
    if len(set(storages)) != len(storages):  # torch.export would fold aliased inputs into one
        raise ExportError(f"graph {gdef.name!r}: two example inputs share memory; give each its own tensor")
    path = out_dir / f"{gdef.name}.onnx"
    raw = out_dir / f".{gdef.name}.raw.onnx"
    for stale in (path, raw):
        stale.unlink(missing_ok=True)
        stale.with_name(stale.name + ".data").unlink(missing_ok=True)
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                gdef.module.eval(), gdef.example, dynamo=True, opset_version=opset,
                input_names=gdef.input_names, output_names=gdef.output_names,
                dynamic_shapes=gdef.dynamic_shapes, optimize=True, verbose=False,
            )
        except Exception as exc:
            raise ExportError(f"graph {gdef.name!r} failed to export: {exc}\n{quiet.getvalue()[-2000:]}") from exc
        _strip_metadata(program.model)
        program.save(str(raw), external_data=True)
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(path)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", path.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.log_severity_level = 3
        ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    finally:
        raw.unlink(missing_ok=True)
        raw.with_name(raw.name + ".data").unlink(missing_ok=True)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"graph {gdef.name!r} fails onnx.checker: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    foreign = {n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")}
    if foreign:
        raise ExportError(f"graph {gdef.name!r} uses non-standard operator domains {sorted(foreign)}")
    data = sorted({e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"})
    return GraphSpec(file=path.name, sha256=file_sha256(path), data={d: (out_dir / d).stat().st_size for d in data},
                     inputs=_specs(model.graph.input), outputs=_specs(model.graph.output))


def _strip_metadata(model: Any) -> None:
    """Drop the exporter's per-node metadata (source stack traces with absolute paths, FX node text):
    it makes re-exports from another checkout differ, and serves no one at run time."""
    import onnx_ir

    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        graph.metadata_props.clear()
        for node in onnx_ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.clear()
            node.doc_string = None


def validate_graph(gdef: GraphDef, path: Path, seed: int = 1234) -> dict[str, Any]:
    """Run the graph on ONNX Runtime (CPU) against PyTorch: per output the max relative error
    (floats) or the number of differing elements (integers), over fresh random cases."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    errors: dict[str, float] = {}
    cases = gdef.cases(torch.Generator().manual_seed(seed))
    for inputs, expected in cases:
        feeds = {k: v for k, v in inputs.items() if k in {i.name for i in session.get_inputs()}}
        for name, got in zip(names, session.run(names, feeds), strict=True):
            want = expected[name]
            if got.shape != want.shape:
                raise ExportError(f"graph {gdef.name!r} output {name!r}: shape {got.shape}, PyTorch gives {want.shape}")
            pick = (gdef.valid or {}).get(name)
            pairs = list(zip(pick(inputs, got), pick(inputs, want), strict=True)) if pick else [(got, want)]
            for a, b in pairs:
                if np.issubdtype(b.dtype, np.floating):
                    scale = max(float(np.abs(b).max(initial=0.0)), 1e-12)
                    err = float(np.abs(a.astype(np.float64) - b).max(initial=0.0)) / scale
                else:
                    err = float(np.count_nonzero(a != b))
                errors[name] = max(errors.get(name, 0.0), err)
    return {"cases": len(cases), "max_error": errors}


def export_all(
    lm: nn.Module | None,
    codec: nn.Module | None,
    out_dir: str | os.PathLike,
    sources: dict[str, Source],
    *,
    opset: int = DEFAULT_OPSET,
    names: list[str] | None = None,
    validate: bool = True,
    report: Callable[[str], None] = print,
) -> Manifest:
    """Export, check and validate the graphs; write ``manifest.json`` last (only when all pass)."""
    import onnxruntime
    import onnxscript

    from . import package_version

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # an interrupted export leaves no valid manifest
    dtype = next(iter((lm or codec).parameters())).dtype
    if dtype != torch.float32:
        raise ExportError(f"graphs are exported from fp32 weights, not {dtype}: load the model in fp32 (TensorRT "
                          "runs the fp32 graphs in fp16 when asked)")
    specs: dict[str, GraphSpec] = {}
    for gdef in graph_defs(lm, codec, names):
        spec = export_graph(gdef, out, opset)
        if validate:
            spec.validation = validate_graph(gdef, out / spec.file)
            worst = spec.validation["max_error"]
            shown = ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
            report(f"{gdef.name}: {shown}")
            floats = _float_outputs(spec)
            bad = {k: v for k, v in worst.items() if v > (RTOL if k in floats else 0)}
            if bad:
                raise ExportError(f"graph {gdef.name!r} does not match PyTorch: {bad} (tolerance {RTOL:g} "
                                  "relative for floats, exact for integers)")
        else:
            report(f"{gdef.name}: exported (not validated)")
        specs[gdef.name] = spec
    settings: dict[str, Any] = {}
    if lm is not None:
        sched = lm.schedule
        settings.update(patch_codes=sched.num_codes, group_size=sched.group_size, channels=len(sched.vocab_sizes),
                        local_steps=sched.steps)
    if codec is not None:
        settings.update(codec_codebooks=LM_CODEBOOKS, codec_layers=codec.config.decoder_layers)
    manifest = Manifest(
        opset=opset, dtype=str(dtype).removeprefix("torch."), package_version=package_version(),
        tools={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
               "onnxscript": onnxscript.__version__},
        sources=sources, settings=settings, graphs=specs,
    )
    manifest.write(out)
    return manifest


def _float_outputs(spec: GraphSpec) -> set[str]:
    return {t.name for t in spec.outputs if t.dtype.startswith("float")}
