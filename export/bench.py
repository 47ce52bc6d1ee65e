"""``mimo-agent bench-onnx``: each exported graph on ONNX Runtime (CPU) against PyTorch eager (CPU).

Both run in this process, on the same inputs, with the same number of threads; repetitions
alternate between the two so that load from other processes hits both alike, and the figures are
medians. What is timed is what the server calls: the drop-in ``decode_patch`` (noise drawing
included) and the codec's ``decode_streams`` for the streaming chunk, the graphs themselves for the
rest. Prints a Markdown table, the machine's load and the peak RSS.

    mimo-agent bench-onnx --preset tiny --export-dir /tmp/onnx-tiny   # exports there first if empty
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--preset", choices=["tiny", "mimo-audio-7b"], default="tiny", help="model (default tiny)")
    parser.add_argument("--export-dir", help="export of the preset (made there if it has no manifest; "
                                             "default: a temporary directory)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions per backend and case (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, both backends (default 1)")
    parser.add_argument("--optimization", choices=["basic", "extended", "all"], default="all",
                        help="ONNX Runtime graph optimization level (default all)")
    parser.add_argument("--spinning", action="store_true", help="let ONNX Runtime's idle threads spin")


def _rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def interleaved(cases: dict[str, Callable[[], Any]], reps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each case, calls alternating between the cases."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(args: argparse.Namespace) -> int:
    import torch

    from agent.runtime import load_runtime

    from .exporter import export_all
    from .manifest import MANIFEST_NAME, runtime_sources
    from .runtime import SessionConfig, onnx_backend

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rss_start = _rss_mib()
    rt = load_runtime(preset=args.preset, device="cpu", dtype="fp32")
    rss_torch = _rss_mib()
    temp = None
    if args.export_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="mimo-onnx-")
        args.export_dir = temp.name
    export_dir = Path(args.export_dir)
    if not (export_dir / MANIFEST_NAME).is_file():
        print(f"exporting {rt.name} to {export_dir} ...", flush=True)
        export_all(rt.lm, rt.codec, export_dir, runtime_sources(rt), report=lambda line: None)
    options = {"threads": args.threads, "optimization": args.optimization, "spinning": args.spinning}
    backend = onnx_backend(rt, export_dir, "cpu", **options)
    config = SessionConfig(**options)
    rss_ort = _rss_mib()

    load_before = _load()
    print(f"# ONNX Runtime {_ort_version()} (CPU, optimization {args.optimization}) vs PyTorch {torch.__version__} "
          f"eager (CPU), {args.threads} thread(s) each, preset {args.preset}, fp32")
    print(f"# {platform.processor() or platform.machine()}; load average {load_before}; "
          f"medians of {args.reps} interleaved repetitions")
    print()
    print("| graph | batch | PyTorch ms | ONNX Runtime ms | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name, batch, torch_fn, ort_fn in _cases(rt, export_dir, config, backend, batches):
        medians = interleaved({"torch": torch_fn, "ort": ort_fn}, args.reps)
        t, o = medians["torch"] * 1e3, medians["ort"] * 1e3
        print(f"| {name} | {batch} | {t:.2f} | {o:.2f} | {t / o:.2f}x |", flush=True)
    print()
    print(f"# load average after: {_load()}")
    print(f"# peak RSS: {rss_start:.0f} MiB at start, {rss_torch:.0f} MiB with the PyTorch model, "
          f"{rss_ort:.0f} MiB with the ONNX Runtime sessions too, {_rss_mib():.0f} MiB at the end")
    if temp is not None:
        temp.cleanup()
    return 0


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _cases(rt, export_dir: Path, config, backend, batches: list[int]):
    """(graph, batch, PyTorch call, ONNX Runtime call) for every graph and batch size."""
    import torch

    from agent.lm.patch_decoder import local_step, new_local_cache
    from agent.lm.sampling import SamplingBatch, SamplingParams

    from .exporter import _random_codes
    from .runtime import GraphRunner, OnnxBackboneStep

    lm, tok = rt.lm, rt.codec
    cfg = lm.config
    encoder = GraphRunner(export_dir / "patch_encoder.onnx", config)
    step = GraphRunner(export_dir / "patch_decoder_step.onnx", config)
    decode_patch, codec = backend.decode_patch, backend.codec
    mel_encoder = codec.encoder
    g = torch.Generator().manual_seed(0)
    for B in batches:
        codes = _random_codes(cfg, (B, cfg.group_size), g)
        text = torch.full((B, 1), cfg.empty_token_id)
        yield ("patch encoder", B, lambda c=codes, t=text: lm.embed_patches(t, c[:, None]),
               lambda c=codes: encoder({"codes": c}))
    for B in batches:
        x = torch.randn(B, cfg.local_dim, generator=g)
        k, v = new_local_cache(lm, B)
        k.normal_(generator=g), v.normal_(generator=g)
        feeds = {"x": x, "step": torch.tensor(5), "k_cache": k, "v_cache": v}

        def torch_step(x=x, k=k, v=v):
            with torch.inference_mode():
                return local_step(lm, x[:, None], 5, k, v)

        yield "patch-decoder step (1 of 11)", B, torch_step, lambda f=feeds: step(f)
    graph_step = OnnxBackboneStep(GraphRunner(export_dir / "backbone_step.onnx", config), lm, max_rows=None)
    for context in (64, 1024):
        for B in batches:  # the graph at every size (the server falls back to PyTorch past MAX_ROWS)
            yield (f"backbone step ({context} positions of history)", B,
                   *_backbone_cases(lm, graph_step, B, context, g))
    for label, params in (("speech sampling", SamplingParams(0.9, top_p=0.95)),
                          ("greedy", SamplingParams(greedy=True))):
        for B in batches:
            h = torch.randn(B, cfg.hidden_size, generator=g)
            batch = SamplingBatch.from_params([params] * B)
            gens = [torch.Generator().manual_seed(i) for i in range(B)]
            yield (f"patch decoder, 11 steps ({label})", B, lambda h=h, b=batch, s=gens: lm.decode_patch(h, b, s),
                   lambda h=h, b=batch, s=gens: decode_patch(h, b, s))
    for B in batches:
        mel = torch.randn(B, 200, tok.config.n_mels, generator=g) * 2 - 4  # 2 s of audio per row
        lengths = torch.full((B,), 200)
        yield ("codec encoder (2 s of mel)", B, lambda m=mel, n=lengths: tok.encoder.encode(m, n, 8),
               lambda m=mel, n=lengths: mel_encoder({"mel": m, "mel_frames": n}))
    for B in batches:
        yield ("codec decode chunk (1 patch per stream)", B, *_stream_cases(tok, codec, B, g))


def _backbone_cases(lm, onnx_step, B: int, context: int, g):
    """One decode step for B sessions of ``context`` patches each, on the server's slotted cache
    (``decode_step``'s contract: write, advance), rolled back after each call."""
    import torch

    cache = lm.allocate_cache(B, context + 1)
    with torch.inference_mode():
        for b in range(B):
            lm.prefill(cache, b, torch.randn(1, context, lm.config.hidden_size, generator=g))
    emb = torch.randn(B, 1, lm.config.hidden_size, generator=g)

    def stepper(decode_step):
        def run():
            with torch.inference_mode():
                h = decode_step(cache, list(range(B)), emb)
            for b in range(B):
                cache.rollback(b, context)
            return h
        return run

    return stepper(lm.decode_step), stepper(onnx_step)


def _stream_cases(tok, codec, B: int, g):
    """Steady-state streaming decode: B streams past their first second (full 50-token left
    context), each call feeding one patch (4 tokens) to every stream: one chunk pass."""
    import torch

    from agent.codec.config import LM_CODEBOOKS

    def feeder(backend):
        streams = [backend.new_decode_stream() for _ in range(B)]
        codes = torch.stack([torch.randint(0, 128, (1500 * 4,), generator=g) for _ in range(LM_CODEBOOKS)], dim=1)
        state = {"at": 0}

        def feed():
            i = state["at"]
            if i + 4 > 1400:  # stay inside one 60 s segment: start again
                for s in streams:
                    backend.finish_stream(s)
                streams[:] = [backend.new_decode_stream() for _ in range(B)]
                i = 0
            state["at"] = i + 4
            return backend.decode_streams([(s, codes[i : i + 4]) for s in streams])

        for _ in range(15):  # fill the left context
            feed()
        return feed

    return feeder(tok), feeder(codec)
