"""``mimo-agent bench-onnx`` runs end to end and prints its table (figures are not asserted)."""

from __future__ import annotations

import argparse

import pytest

from export import bench

pytestmark = pytest.mark.timeout(600)


def test_bench_prints_every_graph(export_dir, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser, "bench-onnx")
    args = parser.parse_args(["--export-dir", str(export_dir), "--batches", "1", "--reps", "1"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = {row.split("|")[1].strip() for row in rows}
    assert names == {"patch encoder", "backbone step (64 positions of history)",
                     "backbone step (1024 positions of history)", "patch-decoder step (1 of 11)",
                     "patch decoder, 11 steps (speech sampling)", "patch decoder, 11 steps (greedy)",
                     "codec encoder (2 s of mel)", "codec decode chunk (1 patch per stream)"}
    for row in rows:
        torch_ms, ort_ms = (float(cell) for cell in row.split("|")[3:5])
        assert torch_ms > 0 and ort_ms > 0
    assert "peak RSS" in out and "load average" in out
