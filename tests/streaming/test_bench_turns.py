"""``mimo-agent bench-turns``: the material (spliced holds, labels), false cut-in counting on
constructed cases, the metrics parser, and a --quick run against a real server on loopback
(structure and counts, not timings)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from streaming.bench import turns as T
from streaming.bench.users import BenchError, load_utterance
from streaming.cli import main
from tests.streaming.helpers import DATA
from tests.streaming.live_server import start_server

REAL = DATA / "real_speech_en_m.wav"


def test_holds_are_spliced_at_quiet_points_and_labelled_on_the_turns_clock() -> None:
    utt = load_utterance(REAL)
    points = T.hold_points(utt)
    assert len(points) >= 3
    assert all(utt.speech_start + T.EDGE_MS * 24 <= p * 240 <= utt.speech_end - T.EDGE_MS * 24 for p in points)
    assert all(b - a >= T.MIN_GAP_MS // 10 for a, b in itertools.pairwise(points))
    pauses = [200, 450, 700]
    turns = T.build_turns([utt], pauses)
    assert len(turns) == len(pauses)
    seen = {}
    for turn in turns:
        assert len(turn.holds) == len(points)
        assert len(turn.pcm) == utt.speech_end + sum(ms for _, ms in turn.holds) * 24
        assert turn.speech_end_ms == utt.speech_end // 24 + sum(ms for _, ms in turn.holds)
        shift = 0
        for (start, ms), p in zip(turn.holds, points, strict=True):
            assert start == p * 10 + shift  # the original point, moved by the pauses before it
            silence = turn.pcm[start * 24 : (start + ms) * 24].astype(np.float32) / 32768
            assert np.sqrt(np.mean(silence**2)) < 10 ** (-50 / 20)  # room tone: below -50 dBFS
            seen.setdefault(p, set()).add(ms)
            shift += ms
    assert all(s == set(pauses) for s in seen.values())  # every point meets every length once


def test_false_cut_ins_are_counted_per_hold() -> None:
    turn = T.Turn("x", np.zeros(48000, np.int16), ((1000, 300), (2000, 600)), speech_end_ms=3000)
    # a stop inside the second hold (the window filled after 500 ms of it), none in the first
    assert T.count_cuts(turn, [2500, 3500]) == ([False, True], 3500)
    # on the server's clock the turn began 10 s in; a stop just after a hold still came from it
    assert T.count_cuts(turn, [11000 + 300 + T.CUT_SLACK_MS, 13800], offset_ms=10_000) == ([True, False], 13800)
    assert T.count_cuts(turn, [11000 + 300 + T.CUT_SLACK_MS + 20], offset_ms=10_000) == ([False, False], None)
    assert T.count_cuts(turn, [900]) == ([False, False], None)  # before the hold: not a cut-in at it


def test_held_out_rules_are_chosen_without_the_recording_they_are_reported_on() -> None:
    """Two recordings; a quick rule that cuts into a's hold and a slow one that never cuts. For b the
    rule is chosen on a (the slow one); for a it is chosen on b, where the quick one looks clean, and
    a's cut-in is then reported: the plain sweep's choice (the slow one, on all turns) would hide it."""
    turns = [T.Turn(name, np.zeros(24000, np.int16), ((1000, 600),), speech_end_ms=3000) for name in ("a", "b")]
    per_rule = {("server_vad", "500"): [([True], 3500), ([False], 3500)],
                ("server_vad", "1000"): [([False], 4000), ([False], 4000)]}
    rows = [T._rule_row("server_vad", int(rule), turns, results, [600]) for (_, rule), results in per_rule.items()]
    assert T.at_budget(rows, None)["server_vad"]["rule"] == 1000
    out = T.held_out(turns, rows, per_rule, [600])["server_vad"]
    assert out["chosen"] == {"a": 500, "b": 1000}
    assert out["false_cut_in"] == 0.5 and out["detect_ms"]["p50"] == 750


def test_a_falling_threshold_ends_a_turn_on_a_later_lower_score() -> None:
    from streaming.vad import VadConfig

    cfg = VadConfig(end_threshold=0.98, end_threshold_slope=1.0, rescore_ms=100)
    assert cfg.threshold_after(200) == cfg.threshold_after(100) == 0.98
    assert cfg.threshold_after(300) == pytest.approx(1 / (1 + np.exp(1 - np.log(49))))
    assert cfg.threshold_after(800) < cfg.threshold_after(400) < cfg.threshold_after(300)
    with pytest.raises(ValueError, match="falling"):
        VadConfig(end_threshold=1.0, end_threshold_slope=1.0)
    assert [r for r, _ in T._rules("semantic_vad:slope", [], [0.98, 1.0], [800], [0.0, 2.0])] == [
        {"threshold": 0.98, "silence_ms": 800}, {"threshold": 0.98, "silence_ms": 800, "slope": 2.0},
        {"threshold": 1.0, "silence_ms": 800}]
    ((rule, cfg),) = T._rules("semantic_vad", [], [0.99], [800], candidates=[100])
    assert rule == {"threshold": 0.99, "silence_ms": 800, "candidate_ms": 100} and cfg.candidate_ms == 100
    assert T._rule(rule) == "p>=0.99 at 100 ms, 800 ms"
    with pytest.raises(BenchError, match="--families"):
        T._rules("semantic_vad:nope", [], [0.9], [800])


def test_wasted_patches_come_from_the_speculation_counters_or_are_absent() -> None:
    text = ("# TYPE mimo_speculative_wasted_patches_total counter\n"
            "mimo_speculative_wasted_patches_total 12.0\n"
            "mimo_speculative_wasted_patches_created 1.7e9\n"
            "mimo_patches_total 400\n")
    assert T.wasted_patches(text) == 12.0
    assert T.wasted_patches("mimo_patches_total 400\n") is None


def test_engine_cpu_comes_from_its_counter_or_is_absent() -> None:
    assert T.engine_cpu_s("mimo_engine_cpu_seconds_total 2.5\nmimo_engine_cpu_seconds_created 1.7e9\n") == 2.5
    assert T.engine_cpu_s("mimo_patches_total 400\n") is None


def test_configurations_are_parsed_or_refused() -> None:
    assert T.parse_config("server_vad") == {"label": "server_vad", "turn_detection": {"type": "server_vad"},
                                            "vad": None}
    c = T.parse_config("semantic_vad:high:silero")
    assert c["turn_detection"] == {"type": "semantic_vad", "eagerness": "high"} and c["vad"] == "silero"
    for bad in ("semantic_vad:eager", "vad", "server_vad:high"):
        with pytest.raises(BenchError, match="--configs"):
            T.parse_config(bad)


def test_quick_run_against_a_real_server(tmp_path, capsys) -> None:
    server = start_server("--max-sessions", "2")
    try:
        out = tmp_path / "turns.json"
        code = main(["bench-turns", "--url", server.ws_url, "--quick", "--json", str(out)])
    finally:
        server.stop()
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    assert result["config"]["pauses_ms"] == [250, 900]
    assert [r["label"] for r in result["live"]] == ["server_vad", "semantic_vad:auto"]
    n_holds = sum(len(t["holds"]) for t in result["material"])
    for run in result["live"]:
        assert run["turns"] == run["answered"] == 2 and run["holds"] == n_holds
        # the constructed case: OpenAI's 500 ms window cuts into every 900 ms hold and no 250 ms one;
        # semantic_vad's 800 ms window too (the model never ends a turn on these mid-sentence points)
        assert run["false_cut_in_by_pause_ms"] == {"250": 0.0, "900": 1.0}
        assert run["false_cut_ins"] == n_holds // 2
        # serve speculates by default: the answers it started at candidate ends and dropped are counted
        assert run["user_first_audio_ms"]["n"] == 2 and run["wasted_speculative_patches_per_turn"] >= 0
        assert run["engine_cpu_ms_per_turn"] > 0
        for rec in run["records"]:
            assert rec["cuts"] == [ms == 900 for _, ms in rec["holds"]] and rec["end_stop_ms"] is not None
    rules = {(r["family"], json.dumps(r["rule"])): r for r in result["sweep"]["rules"]}
    assert rules[("server_vad", "500")]["false_cut_in_by_pause_ms"] == {"250": 0.0, "900": 1.0}
    assert rules[("server_vad", "1000")]["false_cut_in"] == 0.0
    assert rules[("server_vad", "1000")]["detect_ms"]["p50"] == pytest.approx(1000, abs=40)
    assert result["at_budget"]["server_vad"]["rule"] == 1000
    assert len(result["targets"]) == 4 and all("meets" in t for t in result["targets"])
    assert "false cut-ins" in printed and "target (issue 13)" in printed
