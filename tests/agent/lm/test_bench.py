"""`mimo-agent bench-lm` runs and reports every configuration (figures are not asserted)."""

from __future__ import annotations

from streaming.cli import main


def test_bench_lm_prints_the_table(capsys) -> None:
    args = ["bench-lm", "--batch", "1,2", "--context", "4,8", "--steps", "1", "--repeats", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [tuple(r.split("|")[1:3]) for r in rows] == [
        (" 1 ", " 4 "),
        (" 1 ", " 8 "),
        (" 2 ", " 4 "),
        (" 2 ", " 8 "),
    ]
    assert "context 8 vs 4" in out and "batch 2 vs 1" in out and "peak RSS" in out


def test_bench_lm_kv_read_prints_reads_against_attended(capsys) -> None:
    assert main(["bench-lm", "--kv-read"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    ratios = {(r[1].strip(), r[2].strip()): float(r[6]) for r in rows}
    assert ratios[("8 scattered", "graphs")] > 2  # gathered: copied, then read
    assert all(ratio == 1.0 for (_, path), ratio in ratios.items() if path == "compiled")
