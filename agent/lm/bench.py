"""``mimo-agent bench-lm``: per-patch step times of the language model (prints figures).

For each batch size B and context length L, B sessions sit in B slots of a KV cache holding L
positions each, and one speech patch is generated for all of them at once, as the engine does:

- backbone step: patch embeddings of the B new patches, ``decode_step``, text logits and text
  sampling (the spoken-dialogue settings);
- patch decoder: the 11-step delayed loop with the official speech sampling settings.

Each figure is the median over ``--repeats`` rounds of ``--steps`` patches (the slots are rolled
back after every patch so the context stays at L). Rounds of all configurations are interleaved,
so the ratios compare figures measured side by side. On a CPU the CPU time of the thread is shown
too: it is what the work costs when other processes compete for the cores. Peak RSS (and peak
GPU memory) is printed at the end.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from agent.checkpoint import load_lm, parse_device, parse_dtype
from agent.lm.config import PRESET_NAMES
from agent.lm.model import MiMoAudioLM, build_preset
from agent.lm.sampling import SamplingBatch, draw_uniform, sample, task_sampling


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="checkpoint directory or hub id")
    model.add_argument(
        "--preset", choices=PRESET_NAMES, help="built-in model, random weights (default: tiny)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument(
        "--dtype", default=None, help="bf16 or fp32 (default: fp32 on CPU, bf16 on CUDA; fp16 is refused for the LM)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    parser.add_argument("--context", default="64,2048", help="comma-separated context lengths (patches)")
    parser.add_argument("--steps", type=int, default=10, help="patches per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per configuration (median reported)")
    parser.add_argument(
        "--kernels", action="store_true",
        help="count kernel launches per text and speech patch instead of timing: the model, and the real "
        "7B widths built --kernel-layers deep and scaled to full depth",
    )
    parser.add_argument(
        "--kernel-layers", type=int, default=2, help="layers per stack built for the 7B count (0: no 7B count)"
    )
    parser.add_argument("--json", action="store_true", help="with --kernels: print the counts as JSON")
    parser.add_argument(
        "--kv-read", action="store_true",
        help="print the KV positions a backbone step reads against those it attends (64 sessions of "
        "900-1,100 positions in a 2,048-position cache), on the graph path and the compiled (fused) one",
    )
    parser.add_argument(
        "--compile", action="store_true",
        help="time the engine's --compile path (torch.compile, inductor; minutes to compile on a CPU); with "
        "--kernels: also count its launches (each compiled region counts the launches in its generated code; the "
        "7B widths compile three builds)",
    )


@dataclass
class Timing:
    backbone: list[float]
    decoder: list[float]
    backbone_cpu: list[float]
    decoder_cpu: list[float]


class _Clock:
    """Wall and thread-CPU time of a block, with the device synchronised on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.thread_time()


def _setup(lm: MiMoAudioLM, batch: int, context: int, steps: int):
    cfg, device = lm.config, lm.device
    cache = lm.allocate_cache(batch + 1, context + steps + 1)  # + the scratch slot of the --compile path
    gen = torch.Generator(device=device).manual_seed(0)
    history = torch.randn(1, context, cfg.hidden_size, generator=gen, device=device).to(lm.dtype)
    lm.prefill(cache, 0, history)
    for slot in range(1, batch):
        cache.copy_slot(0, slot)
    empties = torch.tensor(cfg.speech_empty_ids, device=device)
    codes = (
        torch.rand(batch, 1, cfg.group_size, cfg.audio_channels, generator=gen, device=device) * empties
    ).long()
    text = torch.full((batch, 1), cfg.empty_token_id, device=device)
    return cache, text, codes


def _round(lm, cache, text, codes, context, steps, clock, gens_text, gens_speech, sampling, graphs=None):
    """Per-patch (backbone wall, CPU, patch decoder wall, CPU) ms of ``steps`` patches: the model's
    own functions, or ``graphs``' (:class:`agent.lm.graphs.DecodeGraphs`, the engine's --compile path)."""
    B = text.shape[0]
    slots = list(range(B))
    text_params = SamplingBatch.from_params([sampling.text] * B, lm.device)
    speech_params = SamplingBatch.from_params([sampling.speech] * B, lm.device)
    backbone = [0.0, 0.0]
    decoder = [0.0, 0.0]
    for _ in range(steps):
        w0, c0 = clock.now()
        if graphs is None:
            h = lm.decode_step(cache, slots, lm.embed_patches(text, codes))
            logits = lm.text_logits(h)
            sample(logits, text_params, draw_uniform(gens_text, B, (), lm.device))
        else:
            h = graphs.step_patches(cache, slots, text, codes)
            graphs.sample_text(h, None, text_params, gens_text)
        w1, c1 = clock.now()
        (lm if graphs is None else graphs).decode_patch(h, speech_params, gens_speech)
        w2, c2 = clock.now()
        backbone[0] += w1 - w0
        backbone[1] += c1 - c0
        decoder[0] += w2 - w1
        decoder[1] += c2 - c1
        for slot in slots:
            cache.rollback(slot, context)
    return [x / steps * 1e3 for x in (*backbone, *decoder)]


def run(args: argparse.Namespace) -> int:
    if args.kernels:
        return run_kernels(args)
    if args.kv_read:
        return run_kv_read(args)
    device, dtype, name, lm = _bench_model(args)
    batches = [int(b) for b in args.batch.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    sampling = task_sampling("spoken_dialogue")
    clock = _Clock(device)
    configs = [(b, c) for b in batches for c in contexts]
    state = {cfg: _setup(lm, *cfg, args.steps) for cfg in configs}
    compiled = {}
    if args.compile:  # the engine's --compile path: the tick's regions compiled (CUDA graphs on CUDA)
        from agent.lm.graphs import DecodeGraphs

        compiled = {(b, c): DecodeGraphs(lm, state[(b, c)][0], max_batch=b, scratch_slot=b, compile=True)
                    for b, c in configs}
    gens = {
        b: ([torch.Generator(device=device).manual_seed(i) for i in range(b)],
            [torch.Generator(device=device).manual_seed(1000 + i) for i in range(b)])
        for b in batches
    }  # fmt: skip
    for cfg in configs:  # warm-up (and compile)
        _round(lm, *state[cfg], cfg[1], 2, clock, *gens[cfg[0]], sampling, compiled.get(cfg))
    results = {cfg: Timing([], [], [], []) for cfg in configs}
    for _ in range(args.repeats):
        for cfg in configs:
            bw, bc, dw, dc = _round(lm, *state[cfg], cfg[1], args.steps, clock, *gens[cfg[0]], sampling,
                                    compiled.get(cfg))
            r = results[cfg]
            r.backbone.append(bw), r.backbone_cpu.append(bc), r.decoder.append(dw), r.decoder_cpu.append(dc)

    med = statistics.median
    cpu = device.type == "cpu"
    threads = f", {args.threads} thread(s)" if cpu else ""
    what = f"median of {args.repeats} x {args.steps} speech patches" + (", --compile" if args.compile else "")
    print(f"bench-lm: {name}, {dtype}, {device}{threads}; {what}")
    head = "| batch | context | backbone step ms | patch decoder ms | total ms | ms per session-patch "
    head += "| x real time |"
    if cpu:
        head += " total CPU ms |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    totals, cpu_totals = {}, {}
    for (b, c), r in results.items():
        total = med(r.backbone) + med(r.decoder)
        totals[(b, c)] = total
        cpu_totals[(b, c)] = med(r.backbone_cpu) + med(r.decoder_cpu)
        row = (
            f"| {b} | {c} | {med(r.backbone):.2f} | {med(r.decoder):.2f} | {total:.2f} | {total / b:.2f} | "
            f"{160 / total:.1f} |"
        )
        if cpu:
            row += f" {med(r.backbone_cpu) + med(r.decoder_cpu):.2f} |"
        print(row)
    print()
    for label, t in [("wall", totals), ("CPU", cpu_totals)] if cpu else [("wall", totals)]:
        if len(contexts) > 1:
            lo, hi = min(contexts), max(contexts)
            ratios = ", ".join(f"batch {b}: {t[(b, hi)] / t[(b, lo)]:.2f}x" for b in batches)
            print(f"context {hi} vs {lo}, total per step ({label}): {ratios}")
        if len(batches) > 1:
            lo, hi = min(batches), max(batches)
            ratios = ", ".join(f"context {c}: {t[(hi, c)] / t[(lo, c)]:.2f}x" for c in contexts)
            print(f"batch {hi} vs {lo}, total per step ({label}): {ratios}")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = f"peak RSS {peak_rss:.0f} MiB"
    if device.type == "cuda":
        line += f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    print(line)
    return 0


def _kernel_row(label: str, lm: MiMoAudioLM, full_depth: dict[str, int] | None, built: int | None) -> dict:
    """A row of the table: eager counts of ``lm``, its stacks scaled to ``full_depth``."""
    from agent.lm.kernels import patch_kernels

    text, speech = patch_kernels(lm, full_depth)
    depth = full_depth or {"model": lm.config.num_hidden_layers, "local_transformer": lm.config.local_layers}
    return {
        "model": label,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
        "layers_built": built,
        "kernels_per_text_patch": text.total,
        "kernels_per_speech_patch": speech.total,
        "backbone_per_layer": round(text.stacks["model"] / depth["model"]),
        "patch_decoder_per_layer_step": round(
            speech.stacks["local_transformer"] / (depth["local_transformer"] * lm.config.local_steps)),
        "outside_layers_speech": speech.other,
        "top_ops_speech": dict(speech.ops.most_common(8)),
    }


def _compiled_counts(lm: MiMoAudioLM) -> dict:
    """``--compile``: kernels of a text and a speech patch on the engine's compiled path: per region
    (the launches of inductor's code) and outside them (eager work between regions)."""
    from agent.lm.kernels import patch_kernels

    text, speech = patch_kernels(lm, compile=True)
    return {"kernels_per_text_patch": text.total, "kernels_per_speech_patch": speech.total,
            "regions_speech": dict(speech.regions), "outside_regions_text": text.other,
            "outside_regions_speech": speech.other}


def _compiled_7b(build: Callable[[dict[str, int]], tuple[MiMoAudioLM, dict[str, int]]]) -> dict:
    """The compiled counts at the 7B widths, from builds one layer deep and two layers deep in one
    stack at a time: a compiled region runs every layer of its stacks with the same code, so its
    launches grow by a fixed number per layer; each region is extrapolated to the full depths."""
    one = {"model": 1, "local_transformer": 1, "input_local_transformer": 1}
    lm, full = build(one)
    base = _compiled_counts(lm)
    del lm
    per_layer = {}
    for stacks, region in ((("model",), "step"), (("local_transformer", "input_local_transformer"), None)):
        deeper = {**one, **dict.fromkeys(stacks, 2)}
        counts = _compiled_counts(build(deeper)[0])["regions_speech"]
        if region == "step":
            per_layer["model"] = counts["step"] - base["regions_speech"]["step"]
        else:  # the patch encoder is in the step region, the patch decoder is its own
            per_layer["input_local_transformer"] = counts["step"] - base["regions_speech"]["step"]
            per_layer["local_transformer"] = counts["patch"] - base["regions_speech"]["patch"]
    regions = dict(base["regions_speech"])
    regions["step"] += per_layer["model"] * (full["model"] - 1) + per_layer["input_local_transformer"] * (
        full["input_local_transformer"] - 1)
    regions["patch"] += per_layer["local_transformer"] * (full["local_transformer"] - 1)
    text = base["outside_regions_text"] + regions["step"] + regions["text"]
    return {"kernels_per_text_patch": text,
            "kernels_per_speech_patch": base["outside_regions_speech"] + sum(regions.values()),
            "regions_speech": regions, "outside_regions_text": base["outside_regions_text"],
            "outside_regions_speech": base["outside_regions_speech"], "per_layer": per_layer}


def _build_7b(device: torch.device) -> Callable[[int | dict[str, int]], tuple[MiMoAudioLM, dict[str, int]]]:
    """A builder of the real 7B widths, each stack as deep as asked, in bf16 (the real model's
    serving dtype, on a CPU too, so the casts it runs are counted), and the stacks' full depths."""
    from agent.lm.config import preset
    from agent.lm.kernels import shallow
    from agent.lm.model import empty_model

    big = preset("mimo-audio-7b")

    def build(depth: int | dict[str, int]) -> tuple[MiMoAudioLM, dict[str, int]]:
        config, full = shallow(big.config, depth)
        lm = empty_model(config, torch.bfloat16, device)
        with torch.no_grad():  # the count does not depend on the values: zeros are quicker than random
            for p in lm.parameters():
                p.zero_()
        return lm, full

    return build


def _bench_model(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, str, MiMoAudioLM]:
    """The device, dtype, name and LM that ``--device/--dtype/--model/--preset/--threads`` ask for."""
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.set_num_threads(args.threads)
    if args.model:
        return device, dtype, args.model, load_lm(args.model, dtype, device)[0]
    name = args.preset or "tiny"
    return device, dtype, name, build_preset(name, dtype, device)[0]


def run_kernels(args: argparse.Namespace) -> int:
    """``--kernels``: kernel launches per patch of the model and of the 7B widths (module ``kernels``)."""
    import json

    device, _, name, lm = _bench_model(args)
    compile = getattr(args, "compile", False)
    rows = [_kernel_row(name, lm, None, None)]
    if compile:
        rows[0]["compiled"] = _compiled_counts(lm)
    del lm
    if args.kernel_layers > 0:
        build = _build_7b(device)
        lm, full = build(args.kernel_layers)
        rows.append(_kernel_row("mimo-audio-7b widths", lm, full, args.kernel_layers))
        del lm
        if compile:
            rows[1]["compiled"] = _compiled_7b(build)
    if args.json:
        print(json.dumps({**rows[0], "scaled_7b": rows[1] if len(rows) > 1 else None}, indent=2))
        return 0
    print(f"bench-lm --kernels: kernels per patch (batch 1, context 64, spoken-dialogue sampling), {device}")
    print("| model | dtype | layers built | per text patch | per speech patch | backbone per layer "
          "| patch decoder per layer-step | speech patch outside layers |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        built = r["layers_built"] or "all"
        print(f"| {r['model']} | {r['dtype']} | {built} | {r['kernels_per_text_patch']} | "
              f"{r['kernels_per_speech_patch']} | {r['backbone_per_layer']} | {r['patch_decoder_per_layer_step']} | "
              f"{r['outside_layers_speech']} |")
    if compile:
        print()
        print("--compile (inductor; a compiled region's launches counted in its generated code):")
        print("| model | per text patch | per speech patch | encoder + backbone step | text head + sampler "
              "| patch decoder | outside the regions |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            c = r["compiled"]
            regions = c["regions_speech"]
            print(f"| {r['model']} | {c['kernels_per_text_patch']} | {c['kernels_per_speech_patch']} | "
                  f"{regions['step']} | {regions['text']} | {regions['patch']} | {c['outside_regions_speech']} |")
    print()
    for r in rows:
        print(f"{r['model']}: most launched in a speech patch: "
              + ", ".join(f"{op} {n}" for op, n in r["top_ops_speech"].items()))
    return 0


def run_kv_read(args: argparse.Namespace) -> int:
    """``--kv-read``: :meth:`agent.lm.graphs.DecodeGraphs.kv_read` for a few batches of a full
    cache, on the graph path (in place over a window of slots, or gathered) and the compiled one
    (each row reads its own slot in the fused kernel). Host lengths only: nothing runs."""
    import random

    from agent.lm.graphs import DecodeGraphs

    _, _, name, lm = _bench_model(args)
    sessions, positions = 64, 2048
    cache = lm.allocate_cache(sessions + 1, positions)  # + the scratch slot
    rng = random.Random(0)
    for slot in range(sessions):
        cache.host_lengths[slot] = rng.randint(900, 1100)
    batches = {"all 64": list(range(64)), "slots 0-15": list(range(16)), "8 scattered": list(range(0, 64, 8)),
               "1 (slot 40)": [40], "1 (slot 0)": [0]}
    print(f"bench-lm --kv-read: {name}, {sessions} sessions of 900-1,100 positions, a {positions}-position cache")
    print("| rows stepping | path | layout (rows) | read | attended | read / attended |")
    print("|---|---|---|---|---|---|")
    for compile in (False, True):
        graphs = DecodeGraphs(lm, cache, max_batch=sessions, scratch_slot=sessions, capture=False, compile=compile)
        for label, slots in batches.items():
            in_place, rows, _ = graphs.layout(slots)
            read, attended = graphs.kv_read(slots)
            layout = "fused, in place" if graphs.fused else "in place" if in_place else "gathered"
            path = "compiled" if compile else "graphs"
            print(f"| {label} | {path} | {layout} ({rows}) | {read:,} | {attended:,} | {read / attended:.2f} |")
    return 0
