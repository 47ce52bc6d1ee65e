"""``mimo-agent export``: write the ONNX graphs of a checkpoint or preset, checked and validated.

    mimo-agent export --out DIR --preset tiny
    mimo-agent export --out DIR --model XiaomiMiMo/MiMo-Audio-7B-Instruct --tokenizer XiaomiMiMo/MiMo-Audio-Tokenizer

Each graph is checked with ``onnx.checker`` and compared with PyTorch on fresh random inputs; the
errors are printed, and the manifest is written only when every graph passes.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from .exporter import DEFAULT_OPSET, GRAPH_NAMES

    parser.add_argument("--out", required=True, help="export directory (created; its graphs are replaced)")
    parser.add_argument("--model", help="MiMo-Audio LM checkpoint: a local directory or a hub id")
    parser.add_argument("--tokenizer", help="MiMo-Audio-Tokenizer checkpoint: a local directory or a hub id")
    parser.add_argument("--preset", choices=["tiny", "mimo-audio-7b"],
                        help="built-in model with random weights (default: tiny, when no --model)")
    parser.add_argument("--dtype", choices=["fp32"], default="fp32",
                        help="weights and activations of the graphs: fp32 (validated on the CPU); half precision "
                             "is the provider's job (TensorRT builds fp16 engines from them: MIMO_AGENT_TRT_FP16=1)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--graphs", default=None,
                        help=f"comma-separated subset of {','.join(GRAPH_NAMES)} (default: all)")
    parser.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")


def run(args: argparse.Namespace) -> int:
    import torch

    from agent.checkpoint import resolve_checkpoint_dir
    from agent.runtime import load_runtime

    from .exporter import ExportError, export_all
    from .manifest import runtime_sources

    try:
        rt = load_runtime(args.model, args.tokenizer, args.preset, device="cpu", dtype=args.dtype)
        model_dir = resolve_checkpoint_dir(args.model) if args.model else None
        tokenizer_dir = resolve_checkpoint_dir(args.tokenizer) if args.tokenizer else None
        sources = runtime_sources(rt, model_dir, tokenizer_dir)
    except Exception as exc:  # checkpoint errors and the like: one clear line
        print(f"mimo-agent export: {exc}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.graphs.split(",")] if args.graphs else None
    t0 = time.perf_counter()
    print(f"exporting {rt.name} ({args.dtype}) to {args.out}; max relative error against PyTorch per output "
          "(integer outputs: elements that differ):")
    try:
        with torch.inference_mode(False):
            manifest = export_all(rt.lm, rt.codec, args.out, sources, opset=args.opset, names=names,
                                  validate=not args.no_validate)
    except ExportError as exc:
        print(f"mimo-agent export: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(manifest.graphs)} graphs and manifest.json to {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0
