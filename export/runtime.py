"""Serve the exported graphs on ONNX Runtime: sessions, providers, and the engine's drop-ins.

``onnx_backend(runtime, export_dir, providers=None) -> OnnxBackend`` is what ``mimo-agent serve
--backend onnx`` calls. Its drop-ins have the model's signatures: ``embed_patches`` (the patch
encoder graph for speech patches, the embedding table for text), ``decode_step`` (the backbone step
graph; the slotted KV cache stays a torch tensor), ``decode_patch`` (the fused patch-decoder
graph); ``codec`` has the engine's codec interface (``encode_batch``, ``new_decode_stream``,
``decode_streams``, ``finish_stream``) with the encoder graph and the streaming-decoder chunk graph
(:mod:`export.codec`). The backbone's prefill stays on PyTorch.

Providers are tried in the order asked (``tensorrt,cuda,cpu``); by default TensorRT, CUDA, CPU
when the model runs on a CUDA device, else the CPU. On a GPU provider, inputs and outputs are bound
to torch's device memory (IO binding, torch's CUDA stream shared with ONNX Runtime), so nothing
crosses to the host. On the CPU, tensors pass as numpy views of torch's memory (no copies).

Before anything runs, the export directory is checked against the served model (manifest format
and version, graph files and weights, source and weights fingerprints): a stale or foreign export
is refused with :class:`ExportMismatch` naming what differs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agent.lm.host import to_device
from agent.lm.model import decode_slots
from agent.lm.sampling import SamplingBatch, SamplingParams, draw_uniform

from .manifest import ExportMismatch, Manifest, Source, check_graph_files, read_manifest, runtime_sources

log = logging.getLogger(__name__)

#: short provider names -> ONNX Runtime execution providers, in the default order of preference
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
#: the graphs the server needs
SERVING_GRAPHS = ("patch_encoder", "backbone_step", "patch_decoder", "codec_encoder", "codec_decoder_chunk")

_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(double)": torch.float64, "tensor(float16)": torch.float16,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}


@dataclass
class SessionConfig:
    """How sessions are built. ``threads=None``: torch's intra-op thread count."""

    providers: tuple[str, ...] = ("cpu",)
    device_id: int = 0
    threads: int | None = None
    optimization: str = "all"  # basic, extended, all (ONNX Runtime graph optimization level)
    trt_cache_dir: str | None = None  # TensorRT engine cache (building an engine takes minutes)
    trt_fp16: bool = False
    spinning: bool = False  # let idle intra-op threads spin (lower latency, burns CPU between calls)

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] in ("tensorrt", "cuda")


def available_providers() -> list[str]:
    """Short names of the providers that can run here: compiled into ONNX Runtime and, for CUDA and
    TensorRT, with a CUDA device visible."""
    import onnxruntime as ort

    compiled = set(ort.get_available_providers())
    gpu = torch.cuda.is_available()
    return [name for name, ep in PROVIDERS.items() if ep in compiled and (name == "cpu" or gpu)]


def resolve_providers(requested: str | Sequence[str] | None, device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The providers to use, best first. ``requested`` (``"tensorrt,cuda,cpu"`` or a list) must name
    known providers; the unavailable ones are dropped with a warning, and an error names them if
    none is left. ``None``: TensorRT, CUDA, CPU when ``device`` is CUDA, else the CPU."""
    have = available_providers()
    if requested is None:
        wanted = list(PROVIDERS) if torch.device(device).type == "cuda" else ["cpu"]
    else:
        wanted = [p.strip().lower() for p in (requested.split(",") if isinstance(requested, str) else requested)]
        wanted = [p for p in wanted if p]
        unknown = [p for p in wanted if p not in PROVIDERS]
        if unknown or not wanted:
            raise ValueError(f"unknown ONNX Runtime provider(s) {unknown or requested!r}; choose from "
                             f"{', '.join(PROVIDERS)}")
    usable = [p for p in wanted if p in have]
    missing = [p for p in wanted if p not in have]
    if not usable:
        raise RuntimeError(f"none of the requested ONNX Runtime providers ({', '.join(wanted)}) can run here; "
                           f"available: {', '.join(have)}" + (" (no CUDA device is visible)" if not
                                                                torch.cuda.is_available() else ""))
    if missing and requested is not None:
        log.warning("ONNX Runtime providers %s are not available here; using %s", missing, usable)
    return tuple(usable)


def make_session(path: str | os.PathLike, config: SessionConfig) -> Any:
    """An ``InferenceSession`` for one graph with ``config``'s providers and options."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[config.optimization]
    options.intra_op_num_threads = config.threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spinning else "0")
    options.log_severity_level = 3
    providers: list[Any] = []
    for name in config.providers:
        if name == "tensorrt":
            trt = {"device_id": config.device_id, "trt_fp16_enable": config.trt_fp16}
            if config.trt_cache_dir:
                Path(config.trt_cache_dir).mkdir(parents=True, exist_ok=True)
                trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=config.trt_cache_dir,
                           trt_timing_cache_enable=True, trt_timing_cache_path=config.trt_cache_dir)
            providers.append((PROVIDERS[name], trt))
        elif name == "cuda":
            cuda: dict[str, Any] = {"device_id": config.device_id}
            if torch.cuda.is_available():  # one stream with torch: bound tensors need no extra sync
                cuda["user_compute_stream"] = str(torch.cuda.current_stream(config.device_id).cuda_stream)
            providers.append((PROVIDERS[name], cuda))
        else:
            providers.append(PROVIDERS[name])
    session = ort.InferenceSession(str(path), options, providers=providers)
    got = session.get_providers()
    if PROVIDERS[config.providers[0]] not in got:
        raise RuntimeError(f"{Path(path).name}: ONNX Runtime did not start {PROVIDERS[config.providers[0]]} "
                           f"(running on {', '.join(got)})")
    return session


class GraphRunner:
    """One graph on one session: torch tensors in, torch tensors out, on the model's device.

    CPU: inputs are passed as numpy views of the tensors and outputs come back as tensors sharing
    ONNX Runtime's buffers. GPU (``config.on_gpu``): inputs and outputs are bound to device memory
    with IO binding; output shapes are given by the caller (``shapes``) so torch allocates them.
    """

    def __init__(self, path: str | os.PathLike, config: SessionConfig) -> None:
        self.path = Path(path)
        self.config = config
        self.session = make_session(path, config)
        self.inputs = {i.name: _TORCH_DTYPES[i.type] for i in self.session.get_inputs()}
        self.outputs = {o.name: _TORCH_DTYPES[o.type] for o in self.session.get_outputs()}
        self.output_names = list(self.outputs)

    def __call__(
        self, feeds: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]] | None = None
    ) -> dict[str, torch.Tensor]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"{self.path.name}: missing inputs {sorted(missing)}")
        feeds = {n: t.to(self.inputs[n]).contiguous() for n, t in feeds.items() if n in self.inputs}
        if self.config.on_gpu:
            return self._run_bound(feeds, shapes)
        outputs = self.session.run(self.output_names, {n: t.cpu().numpy() for n, t in feeds.items()})
        return {n: torch.from_numpy(a) for n, a in zip(self.output_names, outputs, strict=True)}

    def _run_bound(self, feeds: dict[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]] | None):
        """IO binding on the GPU: ONNX Runtime reads and writes torch's device tensors in place."""
        import onnxruntime as ort

        device = torch.device("cuda", self.config.device_id)
        binding = self.session.io_binding()
        for name, tensor in feeds.items():
            tensor = tensor.to(device)
            feeds[name] = tensor  # keep it alive until the run ends
            if tensor.numel() == 0:  # no memory to point at (a new stream's empty KV cache)
                empty = ort.OrtValue.ortvalue_from_shape_and_type(tuple(tensor.shape), _np_dtype(tensor.dtype), "cuda",
                                                                  self.config.device_id)
                binding.bind_ortvalue_input(name, empty)
                continue
            binding.bind_input(name, "cuda", self.config.device_id, _np_dtype(tensor.dtype), tuple(tensor.shape),
                               tensor.data_ptr())
        results: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            if shapes is not None and name in shapes:
                out = torch.empty(shapes[name], dtype=self.outputs[name], device=device)
                results[name] = out
                binding.bind_output(name, "cuda", self.config.device_id, _np_dtype(out.dtype), tuple(out.shape),
                                    out.data_ptr())
            else:
                binding.bind_output(name, "cuda", self.config.device_id)
        self.session.run_with_iobinding(binding)
        unbound = [n for n in self.output_names if n not in results]
        if unbound:  # shapes the caller could not know: copied back through the host
            values = dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))
            for name in unbound:
                results[name] = torch.from_numpy(values[name]).to(device)
        return results


def _np_dtype(dtype: torch.dtype) -> Any:
    return torch.empty(0, dtype=dtype).numpy().dtype


# ------------------------------------------------------------------------------------ patch decoder
class OnnxPatchDecoder:
    """``decode_patch(h (B, hidden), speech_sampling, generators) -> codes (B, 4, 8)`` on ONNX Runtime.

    The noise is drawn exactly as ``agent.lm.patch_decoder.decode_patch`` draws it (one uniform
    number per code, a patch's worth at once from each row's generator), so seeded sessions get
    the same codes on either backend.
    """

    def __init__(self, runner: GraphRunner, settings: Mapping[str, Any]) -> None:
        self.runner = runner
        self.noise_shape = (int(settings["patch_codes"]),)  # one uniform number per code
        self.codes_shape = (int(settings["group_size"]), int(settings["channels"]))
        self._zeros: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(
        self,
        h: torch.Tensor,
        speech_sampling: SamplingBatch | SamplingParams | Sequence[SamplingParams] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> torch.Tensor:
        B, _ = h.shape
        params = SamplingBatch.coerce(speech_sampling, B, h.device)
        if params.all_greedy:  # the graph ignores the noise; any tensor of the right shape will do
            key = (B, h.device)
            if key not in self._zeros:
                self._zeros[key] = torch.zeros(B, *self.noise_shape, device=h.device)
            uniform = self._zeros[key]
        else:
            uniform = draw_uniform(generators, B, self.noise_shape, h.device)
        feeds = {
            "h": h, "uniform": uniform, "temperature": params.temperature, "top_k": params.top_k,
            "top_p": params.top_p, "greedy": params.greedy,
            "all_greedy": torch.tensor(params.all_greedy), "any_filter": torch.tensor(params.any_filter),
        }
        codes = self.runner(feeds, {"codes": (B, *self.codes_shape)})["codes"]
        return codes.to(h.device)


# --------------------------------------------------------------------------------------- backbone
class OnnxBackboneStep:
    """``decode_step(cache, slots, emb (B, 1, hidden)) -> (B, hidden)`` on the ``backbone_step`` graph,
    with ``MiMoAudioLM.decode_step``'s contract: each row written at its slot's next position, the
    lengths advanced. The slotted cache stays a torch tensor: the rows' histories are gathered
    (one copy of the longest row's span) for the graph, and its new keys and values written back.

    That copy is what PyTorch's step avoids (it attends over a view of the cache), so the graph
    wins only while the gathered history is small: on a CPU, 1.5-2.3x at up to 1024 positions for
    one session or 64 for eight, and 0.7-0.9x at 1024 positions for four to eight sessions
    (``mimo-agent bench-onnx``). Steps whose rows x span exceed ``max_rows`` therefore run
    ``fallback`` (the model's own ``decode_step``) instead; ``max_rows=None`` always uses the graph.
    """

    #: rows x span up to which the graph beats PyTorch's view-based step on a CPU (bench-onnx)
    MAX_ROWS = 2048

    def __init__(self, runner: GraphRunner, lm: Any, max_rows: int | None = MAX_ROWS) -> None:
        self.runner = runner
        self.fallback = lm.decode_step
        self.max_rows = max_rows
        self.graph_steps = self.fallback_steps = 0  # how often each path ran
        cfg = lm.config
        self.new_shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        self.hidden_size = cfg.hidden_size

    @torch.no_grad()
    def __call__(self, cache: Any, slots: torch.Tensor | Sequence[int], emb: torch.Tensor) -> torch.Tensor:
        slot_list = decode_slots(emb, slots)
        B = len(slot_list)
        span = max(1, max(cache.length(s) for s in slot_list))  # positions past a row's length are masked
        if self.max_rows is not None and B * span > self.max_rows:
            self.fallback_steps += 1
            return self.fallback(cache, slot_list, emb)
        self.graph_steps += 1
        cache.reserve(slot_list, 1)
        slots_dev = to_device(slot_list, cache.device)
        pos = cache.lengths.index_select(0, slots_dev)  # (B,)
        L, Hkv, d = self.new_shape
        past_k, past_v = cache.k[:, slots_dev, :, :span], cache.v[:, slots_dev, :, :span]  # gathered copies
        out = self.runner(
            {"emb": emb, "pos": pos, "past_k": past_k, "past_v": past_v},
            {"hidden": (B, self.hidden_size), "new_k": (L, B, Hkv, d), "new_v": (L, B, Hkv, d)},
        )
        # advanced indices on dims 1 and 3 put the rows first: (B, L, Hkv, d)
        cache.k[:, slots_dev, :, pos] = out["new_k"].to(cache.device, cache.k.dtype).transpose(0, 1)
        cache.v[:, slots_dev, :, pos] = out["new_v"].to(cache.device, cache.v.dtype).transpose(0, 1)
        cache.advance(slot_list, slots_dev, 1)
        return out["hidden"].to(device=emb.device, dtype=emb.dtype)


class OnnxPatchEncoder:
    """``embed_patches(text_ids (B, P), codes (B, P, 4, 8)) -> (B, P, hidden)`` with the speech
    patches' embeddings from the ``patch_encoder`` graph and the text patches' from the model's
    embedding table (a lookup), combined as ``agent.lm.patch_encoder.embed_patches`` does."""

    def __init__(self, runner: GraphRunner, lm: Any) -> None:
        self.runner = runner
        self.lm = lm

    @torch.no_grad()
    def __call__(self, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        cfg = self.lm.config
        B, P = text_ids.shape
        G, C = cfg.group_size, cfg.audio_channels
        if codes.shape != (B, P, G, C):
            raise ValueError(f"codes must have shape (B, P, {G}, {C}) = {(B, P, G, C)}, got {tuple(codes.shape)}")
        is_speech = (text_ids == cfg.empty_token_id).unsqueeze(-1)  # (B, P, 1)
        text = self.lm.model.embed_tokens(text_ids).masked_fill(is_speech, 0.0)  # (B, P, hidden)
        flat = codes.reshape(B * P, G, C)  # each patch on its own
        speech = self.runner({"codes": flat}, {"speech_embedding": (B * P, cfg.hidden_size)})["speech_embedding"]
        speech = speech.to(device=text.device, dtype=text.dtype).view(B, P, -1) * is_speech  # (B, P, hidden)
        return text + speech


# ---------------------------------------------------------------------------------------- backend
def verify_sources(manifest: Manifest, runtime: Any, export_dir: str | os.PathLike) -> None:
    """Refuse an export made from other weights than the runtime's (:class:`ExportMismatch`)."""
    for part, have in runtime_sources(runtime).items():
        made = manifest.sources.get(part)
        if made is None:
            raise ExportMismatch(f"{export_dir} has no {part} graphs (its manifest lists no {part} source)")
        presets_differ = made.kind == have.kind == "preset" and made.fingerprint != have.fingerprint
        if presets_differ or made.weights != have.weights:
            raise ExportMismatch(
                f"{export_dir} is stale or foreign: its {part} graphs were exported from {_describe(made)}, "
                f"but the server runs {_describe(have)}; re-export with `mimo-agent export`"
            )


def _describe(source: Source) -> str:
    fingerprint = f"fingerprint {source.fingerprint}, " if source.fingerprint else ""
    return f"{source.kind} {source.name!r} ({fingerprint}weights {source.weights})"


def session_config(runtime: Any, providers: str | Sequence[str] | None = None, **options: Any) -> SessionConfig:
    """A :class:`SessionConfig` for ``runtime``'s device; ``options`` override its fields."""
    device = torch.device(runtime.device)
    names = resolve_providers(providers, device)
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    config = SessionConfig(providers=names, device_id=index, **options)
    if config.on_gpu and device.type != "cuda":
        raise RuntimeError(f"ONNX Runtime provider {names[0]} needs the model on a CUDA device, not {device}: "
                           "serve with --device cuda, or use --providers cpu")
    if not config.on_gpu and device.type == "cuda":
        raise RuntimeError(f"the model runs on {device} but the ONNX Runtime providers are {', '.join(names)}: "
                           "ask for --providers cuda (or tensorrt)")
    return config


@dataclass
class OnnxBackend:
    """The engine's drop-ins on ONNX Runtime: ``Engine(..., codec=backend.codec, **backend.engine_kwargs())``."""

    embed_patches: OnnxPatchEncoder
    decode_step: OnnxBackboneStep
    decode_patch: OnnxPatchDecoder
    codec: Any  # export.codec.OnnxCodec

    def engine_kwargs(self) -> dict[str, Any]:
        return {"embed_patches": self.embed_patches, "decode_step": self.decode_step, "decode_patch": self.decode_patch}


def onnx_backend(
    runtime: Any, export_dir: str | os.PathLike | None, providers: str | Sequence[str] | None = None, **options: Any
) -> OnnxBackend:
    """The serving graphs of ``export_dir`` on ONNX Runtime for ``runtime`` (an ``agent.runtime.Runtime``).

    ``export_dir`` holds a ``mimo-agent export`` of the same weights; ``providers`` as
    :func:`resolve_providers`; ``options`` set :class:`SessionConfig` fields (threads, TensorRT cache,
    fp16 ...). TensorRT caches its engines in ``export_dir/tensorrt`` unless ``trt_cache_dir`` (or
    ``$MIMO_AGENT_TRT_CACHE``) says otherwise, and builds fp16 engines when ``trt_fp16`` (or
    ``$MIMO_AGENT_TRT_FP16=1``). Raises :class:`ExportMismatch` for a missing, stale or foreign export.
    """
    from .codec import OnnxCodec

    if export_dir is None:
        raise ExportMismatch("--backend onnx needs --export-dir DIR (made by `mimo-agent export --out DIR`)")
    manifest = read_manifest(export_dir)
    verify_sources(manifest, runtime, export_dir)
    paths = check_graph_files(export_dir, manifest, list(SERVING_GRAPHS))
    options.setdefault("trt_cache_dir", os.environ.get("MIMO_AGENT_TRT_CACHE") or str(Path(export_dir) / "tensorrt"))
    options.setdefault("trt_fp16", os.environ.get("MIMO_AGENT_TRT_FP16", "0") == "1")
    config = session_config(runtime, providers, **options)
    backend = OnnxBackend(
        embed_patches=OnnxPatchEncoder(GraphRunner(paths["patch_encoder"], config), runtime.lm),
        decode_step=OnnxBackboneStep(GraphRunner(paths["backbone_step"], config), runtime.lm),
        decode_patch=OnnxPatchDecoder(GraphRunner(paths["patch_decoder"], config), manifest.settings),
        codec=OnnxCodec(runtime.codec, GraphRunner(paths["codec_encoder"], config),
                        GraphRunner(paths["codec_decoder_chunk"], config), manifest.settings),
    )
    log.info("ONNX Runtime backend: %s on %s", ", ".join(SERVING_GRAPHS), ", ".join(config.providers))
    return backend
