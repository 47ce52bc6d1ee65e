"""The bench-codec command runs end to end (its figures are not asserted: it is a benchmark)."""

from __future__ import annotations

import json

from streaming.cli import main


def test_bench_codec_command_runs(tmp_path, capsys):
    out = tmp_path / "figures.json"
    skip = ["speed", "batch", "fidelity", "incremental"]
    assert main(["bench-codec", "--repeat", "1", "--clock", "cpu", "--skip", *skip, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per-chunk latency" in printed and "peak RSS" in printed
    figures = json.loads(out.read_text())
    assert figures["chunk_ms"]["median"] > 0 and figures["peak_rss_mb"] > 0
