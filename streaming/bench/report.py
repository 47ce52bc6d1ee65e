"""The benchmark's output: the terminal table and the plots (latency CDFs, stage breakdown)."""

from __future__ import annotations

import json
from typing import Any

from streaming.bench.stats import METRICS, PERCENTILES, STAGES


def _row(label: str, stats: dict[str, Any], width: int = 30, digits: int = 1) -> str:
    if not stats or not stats.get("n"):
        return f"{label:<{width}} {0:>4}" + "       -" * (len(PERCENTILES) + 1)
    cells = [stats[f"p{p}"] for p in PERCENTILES] + [stats["mean"]]
    return f"{label:<{width}} {stats['n']:>4}" + "".join(f" {c:>7.{digits}f}" for c in cells)


def run_table(run: dict[str, Any]) -> str:
    """One run (a server, a number of concurrent sessions) as a block of rows."""
    s = run["summary"]
    head = (f"{run['label'] + ': ' if run['label'] else ''}{run['level']} session{'s' if run['level'] > 1 else ''}"
            f" — {s['measured_turns']} measured turns, {s['warmup_turns']} warm-up excluded, "
            f"{s['failed_turns']} failed")
    lines = [head, f"{'':<30} {'n':>4}" + "".join(f" {'p' + str(p):>7}" for p in PERCENTILES) + f" {'mean':>7}"]
    for key, label in METRICS:
        if key == "rtf":
            continue
        lines.append(_row(label, s[key]))
        if key == "server_first_audio_ms":
            for name, _, _ in STAGES:
                if name in s["stages_ms"]:
                    lines.append(_row("  " + name, s["stages_ms"][name]))
    lines.append(_row("real-time factor", s["rtf"], digits=3))
    turns = s["measured_turns"]
    lines.append(f"playback: {s['underruns']} underruns > 100 ms in {s['turns_with_underruns']}/{turns} turns, "
                 f"longest stall {s['max_gap_ms']:.0f} ms -> {'real time' if s['realtime'] else 'NOT real time'}")
    if run.get("server_cpu_s") is not None:
        lines.append(f"server CPU: {run['server_cpu_s']:.1f} s in {run['wall_s']:.1f} s "
                     f"({100 * run['server_cpu_s'] / run['wall_s']:.0f}% of one core)")
    return "\n".join(lines)


def describe(result: dict[str, Any]) -> str:
    m, server, cfg = result["machine"], result.get("server") or {}, result["config"]
    gpu = m.get("gpu") or "no GPU"
    load = f", load avg {m['load_avg_1m']} -> {m.get('load_avg_1m_end', '?')}" if "load_avg_1m" in m else ""
    model = (f"{server.get('model', '?')} (preset {server.get('preset') or '-'}, {server.get('device', '?')} "
             f"{server.get('dtype', '?')}, {server.get('threads', '?')} torch threads, "
             f"LM {server.get('lm_parameters', 0) / 1e6:.1f} M + codec {server.get('codec_parameters', 0) / 1e6:.1f} M "
             f"parameters)")
    return "\n".join([
        f"machine: {m['cpu']}, {m['cores']} cores, {gpu}, torch {m.get('torch')}, python {m['python']}{load}",
        f"model:   {model}",
        f"input:   {cfg['audio']} ({cfg['audio_s']:.2f} s, speech {cfg['speech_s']:.2f} s), {cfg['transport']}, "
        f"{'server VAD' if cfg['commit'] == 'vad' else 'manual commit'}, {cfg['chunk_ms']} ms chunks, "
        f"{cfg['turns']} turns + {cfg['warmup']} warm-up per session, start stagger {cfg['stagger']}",
    ])


def render(result: dict[str, Any]) -> str:
    parts = [describe(result)]
    parts += [run_table(run) for run in result["runs"]]
    floor = result.get("floor")
    if floor:
        parts.append(
            f"floor (in-process, same model options, median of {floor['turns']} turns): "
            f"encode {floor['encode_ms']:.1f} + prefill {floor['prefill_ms']:.1f} + {floor['steps']} steps "
            f"{floor['steps_ms']:.1f} + first codec chunk {floor['codec_ms']:.1f} = {floor['total_ms']:.1f} ms "
            f"(min {floor['min_total_ms']:.1f})")
    bb = result.get("backbone")
    if bb:
        text = (f"backbone decode step (1 session, {bb['context']} positions): {bb['backbone_step_ms']:.3f} ms; "
                f"memory-bandwidth floor {bb['weight_mb']:.1f} MB of weights / {bb['copy_bandwidth_gbs']:.1f} GB/s "
                f"copy bandwidth = {bb['bandwidth_floor_ms']:.3f} ms -> {bb['backbone_over_floor']:.1f}x; "
                f"patch decoder {bb['patch_decoder_ms']:.3f} ms")
        if "backbone_step_graphs_ms" in bb:
            text += (f"\nCUDA graphs on / off: backbone step {bb['backbone_step_graphs_ms']:.3f} / "
                     f"{bb['backbone_step_ms']:.3f} ms ({bb['backbone_graphs_over_floor']:.1f}x the floor), "
                     f"patch decoder {bb['patch_decoder_graphs_ms']:.3f} / {bb['patch_decoder_ms']:.3f} ms")
        parts.append(text)
    ratios = result.get("ratios") or {}
    for text in ratios.get("lines", []):
        parts.append(text)
    cmp = result.get("compare_batching")
    if cmp:
        parts.append(
            f"real-time sessions (no underrun, no failure): batched {cmp['batched']['realtime_sessions']}, "
            f"batching off {cmp['unbatched']['realtime_sessions']} -> {cmp['ratio_text']} "
            f"(levels tried {cmp['levels']})")
    rss = result.get("peak_rss_mb") or {}
    if rss:
        parts.append("peak RSS: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items() if v is not None))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------- plots
def plot(result: dict[str, Any], path: str) -> None:
    """Latency CDF per concurrency level (user and server clocks) and the median stage breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [r for r in result["runs"] if r["summary"]["measured_turns"]]
    fig, (ax_cdf, ax_bar) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=80)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        name = f"{run['label'] + ' ' if run['label'] else ''}{run['level']} sess."
        for key, style, what in (("user_first_audio_ms", "-", "user"), ("server_first_audio_ms", "--", "server")):
            xs = np.sort([t[key] for t in run["turns"] if t["ok"] and not t["warmup"] and t[key] is not None])
            if xs.size:
                ax_cdf.step(xs, np.arange(1, xs.size + 1) / xs.size, style, color=color, where="post",
                            label=f"{name} {what}")
    ax_cdf.set_xlabel("first audio (ms)")
    ax_cdf.set_ylabel("share of turns")
    ax_cdf.set_title("first-audio latency CDF (solid: user, dashed: server)")
    ax_cdf.grid(alpha=0.3)
    ax_cdf.legend(fontsize=7)

    segments = [name for name, _, _ in STAGES] + ["network + client"]
    seg_colors = plt.get_cmap("tab10").colors
    labels = []
    for y, run in enumerate(runs):
        s = run["summary"]
        values = [s["stages_ms"].get(n, {}).get("p50", 0.0) for n, _, _ in STAGES]
        vad = s["vad_window_ms"].get("p50", 0.0)
        rest = s["user_first_audio_ms"].get("p50", 0.0) - vad - s["server_first_audio_ms"].get("p50", 0.0)
        values.append(max(0.0, rest))
        left = 0.0
        for j, (seg, v) in enumerate(zip(segments, values, strict=True)):
            ax_bar.barh(y, v, left=left, color=seg_colors[j % len(seg_colors)], label=seg if y == 0 else None)
            left += v
        if vad:
            ax_bar.text(left, y, f"  + VAD {vad:.0f} ms", va="center", fontsize=8)
        labels.append(f"{run['label'] + ' ' if run['label'] else ''}{run['level']}")
    ax_bar.set_yticks(range(len(runs)), labels)
    ax_bar.set_ylabel("concurrent sessions")
    ax_bar.set_xlabel("ms after the commit (median of each stage)")
    ax_bar.set_title("where the server's time goes")
    ax_bar.set_xlim(0, ax_bar.get_xlim()[1] * 1.3)
    ax_bar.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, frameon=False)
    ax_bar.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def publish(text: str, result: dict[str, Any], json_path: str | None) -> None:
    """A bench's report on stdout, and its whole result as JSON where ``--json`` asks."""
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
