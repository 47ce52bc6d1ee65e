"""``mimo-agent bench``: its pure parts (speech detection, continuity, percentiles), its errors, and
short real runs against a spawned tiny server and an in-process one, checked through the JSON."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from streaming.bench import floor_input
from streaming.bench.stats import Continuity, TurnRecord, percentiles, summarize
from streaming.bench.users import DEFAULT_AUDIO, BenchError, b64_samples, load_utterance
from streaming.cli import main
from tests.streaming.helpers import DATA
from tests.streaming.live_server import start_server

RATE = 24_000


# ------------------------------------------------------------------------------------ pure parts
def test_the_packaged_utterance_is_the_test_speech() -> None:
    assert DEFAULT_AUDIO.read_bytes() == (DATA / "speech_hello_padded.wav").read_bytes()


def test_speech_span_is_found_by_energy() -> None:
    utt = load_utterance(DATA / "speech_hello_padded.wav")  # 600 ms silence, 2.27 s speech, 1000 ms silence
    assert utt.duration_s == pytest.approx(3.87, abs=0.01)
    assert utt.speech_start / RATE == pytest.approx(0.6, abs=0.03)
    assert utt.speech_end / RATE == pytest.approx(0.6 + 2.27, abs=0.03)
    vad = floor_input(utt, "vad")  # 300 ms before the speech, the 500 ms silence window after
    assert len(vad) == utt.speech_end - utt.speech_start + 800 * 24
    assert len(floor_input(utt, "manual")) == utt.speech_end


def test_bad_audio_is_refused_clearly(tmp_path) -> None:
    with pytest.raises(BenchError, match="no such file"):
        load_utterance(tmp_path / "missing.wav")
    silent = tmp_path / "silent.wav"
    from streaming.audio import write_wav

    write_wav(silent, np.zeros(RATE, np.int16))
    with pytest.raises(BenchError, match="no speech found"):
        load_utterance(silent)


def test_b64_samples_counts_without_decoding() -> None:
    for n in (0, 1, 2, 3, 480, 2641):
        payload = base64.b64encode(np.zeros(n, np.int16).tobytes()).decode()
        assert b64_samples(payload) == n


def test_continuity_counts_stalls_over_100_ms() -> None:
    chunk = RATE // 10  # 100 ms
    arrivals = [(0.0, chunk), (0.05, chunk), (0.2, chunk), (0.45, chunk), (0.5, chunk)]
    c = Continuity.of(arrivals)
    # plays 0-0.1, 0.1-0.2 (0.05 early), 0.2-0.3 on time, then waits 0.15 s for 0.45: one underrun
    assert c.underruns == 1
    assert c.max_gap_ms == pytest.approx(150)
    assert c.stall_ms == pytest.approx(150)
    assert c.play_end == pytest.approx(0.65)
    assert Continuity.of([(0.0, chunk), (0.19, chunk)]).underruns == 0  # a 90 ms gap is not audible


def test_percentiles_are_ordered_and_ignore_missing() -> None:
    s = percentiles([5.0, None, 1.0, 3.0, 2.0, 4.0])
    assert s["n"] == 5 and s["p50"] == 3.0 and s["max"] == 5.0
    assert s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert percentiles([]) == {"n": 0}


def test_summary_counts_warmup_and_failed_turns_apart() -> None:
    def turn(k: int, warmup: bool, status: str, first: float | None) -> TurnRecord:
        r = TurnRecord(level=1, session=0, turn=k, warmup=warmup, status=status, t_speech_end=1.0,
                       t_speech_stopped=1.5, t_commit=1.5, t_first_audio=first)
        if first is not None:
            r.audio_chunks, r.audio_samples, r.t_last_audio = [(first, 2400)], 2400, first
            r.server_timings = {"server_first_audio_ms": 100.0, "prefill_ms": 10.0, "prefill_done_ms": 40.0,
                                "first_text_ms": 45.0, "first_speech_patch_ms": 80.0, "first_audio_ms": 95.0}
        return r

    records = [turn(0, True, "completed", 2.0), turn(1, False, "completed", 2.1),
               turn(2, False, "incomplete", 2.2), turn(3, False, "timeout", None)]
    s = summarize(records)
    assert (s["turns"], s["warmup_turns"], s["measured_turns"], s["failed_turns"]) == (4, 1, 2, 1)
    assert s["user_first_audio_ms"]["n"] == 2 and s["user_first_audio_ms"]["p50"] == pytest.approx(1150)
    assert s["vad_window_ms"]["p50"] == pytest.approx(500)
    stages = s["stages_ms"]
    assert stages["encode + wait"]["p50"] == 30 and stages["prefill"]["p50"] == 10
    assert stages["first codec chunk"]["p50"] == 15 and stages["hand-off + send"]["p50"] == 5
    assert not s["realtime"]  # a failed turn


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("argv", "message"), [
    ([], "give --url URL"),
    (["--url", "ws://127.0.0.1:9/v1/realtime", "--compare-batching"], "use it with --spawn"),
    (["--spawn", "--sessions", "1,x"], "comma-separated list"),
    (["--spawn", "--sessions", "0"], "positive session counts"),
    (["--spawn", "--gap", "2,1"], "0 <= MIN <= MAX"),
    (["--url", "ws://127.0.0.1:9/v1/realtime"], "cannot reach the server"),
])
def test_bad_arguments_fail_with_a_clear_message(argv, message, capsys) -> None:
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_webrtc_transport_needs_the_server_side(capsys) -> None:
    import importlib.util

    code = main(["bench", "--url", "ws://127.0.0.1:9/v1/realtime", "--transport", "webrtc"])
    err = capsys.readouterr().err
    if importlib.util.find_spec("streaming.webrtc") is None:
        assert code == 2 and "needs the server's WebRTC transport" in err
    else:
        assert code == 2 and "cannot reach the server" in err


# -------------------------------------------------------------------------------------- real runs
def _check_run(run: dict, level: int, turns: int, warmup: int) -> None:
    assert run["level"] == level
    records = run["turns"]
    assert sorted((t["session"], t["turn"]) for t in records) == [
        (s, k) for s in range(level) for k in range(warmup + turns)]  # every turn accounted for
    assert sum(t["warmup"] for t in records) == level * warmup
    s = run["summary"]
    assert s["measured_turns"] == level * turns and s["failed_turns"] == 0 and s["warmup_turns"] == level * warmup
    for t in records:
        assert t["ok"], t
        assert 0 < t["server_first_audio_ms"] < t["user_first_audio_ms"]
        assert t["audio_ms"] > 0 and t["audio_chunks"] and t["rtf"] > 0
        assert max(n for _, n in t["audio_chunks"]) <= 4800  # codec passes of several patches leave as 200 ms deltas
        assert all(v >= 0 for v in t["stages_ms"].values()), t["stages_ms"]
        assert 0 < t["server_timings"]["first_audio_cpu_ms"] < 10 * t["server_first_audio_ms"]
        assert t["t_speech_end"] <= t["t_commit"] <= t["t_first_audio"] <= t["t_last_audio"] <= t["t_done"]
    for key in ("user_first_audio_ms", "server_first_audio_ms"):
        p = s[key]
        assert p["n"] == level * turns and 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["max"]


def test_bench_against_a_spawned_server(tmp_path, capsys) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--spawn", "--preset", "tiny", "--sessions", "2", "--turns", "2", "--warmup", "1", "--audio",
                 str(DATA / "speech_yes.wav"), "--response-tokens", "10", "--gap", "0.1,0.2", "--floor",
                 "--json", str(out), "--plot", str(png), "--no-progress", "--no-warmup"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    assert result["server"]["model"] == "mimo-audio-tiny" and result["machine"]["cores"] >= 1
    (run,) = result["runs"]
    _check_run(run, level=2, turns=2, warmup=1)
    for t in run["turns"]:
        assert t["vad_window_ms"] > 0 and t["user_first_audio_ms"] > t["vad_window_ms"]
        assert t["server_timings"]["speech_patches"] + t["server_timings"]["text_patches"] == 10
    assert run["server_cpu_s"] > 0
    floor = result["floor"]
    assert floor["turns"] == 8 and floor["total_ms"] > 0 and floor["cpu_ms"] > 0 and floor["steps"] >= 1
    assert floor["total_ms"] == pytest.approx(
        floor["encode_ms"] + floor["prefill_ms"] + floor["steps_ms"] + floor["codec_ms"], rel=0.5)
    bb = result["backbone"]  # the decode step against the memory-bandwidth floor
    assert bb["weight_mb"] > 0 and bb["copy_bandwidth_gbs"] > 0
    assert bb["backbone_step_ms"] > bb["bandwidth_floor_ms"] > 0
    assert "backbone_step_graphs_ms" not in bb  # CUDA only
    assert "2 sessions — 4 measured turns, 2 warm-up excluded, 0 failed" in printed and "floor (in-process" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_manual_commit_against_a_running_server(tmp_path, capsys) -> None:
    server = start_server("--max-sessions", "2")
    try:
        out = tmp_path / "bench.json"
        code = main(["bench", "--url", server.ws_url, "--commit", "manual", "--turns", "2", "--warmup", "0",
                     "--audio", str(DATA / "speech_yes.wav"), "--response-tokens", "9", "--gap", "0,0",
                     "--json", str(out), "--no-progress"])
    finally:
        server.stop()
    assert code == 0, capsys.readouterr().out
    (run,) = json.loads(out.read_text())["runs"]
    _check_run(run, level=1, turns=2, warmup=0)
    for t in run["turns"]:
        assert t["vad_window_ms"] is None and t["t_speech_stopped"] is None  # no VAD: the client committed


def test_bench_over_webrtc(tmp_path, capsys) -> None:
    server = start_server("--max-sessions", "2")
    try:
        out = tmp_path / "bench.json"
        code = main(["bench", "--url", server.ws_url, "--transport", "webrtc", "--turns", "1", "--warmup", "0",
                     "--audio", str(DATA / "speech_yes.wav"), "--response-tokens", "9", "--gap", "0,0",
                     "--json", str(out), "--no-progress"])
    finally:
        server.stop()
    assert code == 0, capsys.readouterr()
    (run,) = json.loads(out.read_text())["runs"]
    (turn,) = run["turns"]
    assert turn["ok"], turn
    # the agent's voice came on the media track: 20 ms frames (480 samples at 24 kHz), after the commit
    assert {n for _, n in turn["audio_chunks"]} == {480}
    assert 0 < turn["server_first_audio_ms"] < turn["user_first_audio_ms"]
    assert turn["vad_window_ms"] > 0 and turn["t_commit"] < turn["t_first_audio"] < turn["t_last_audio"]
    assert turn["audio_ms"] > 500  # 6 speech patches, about 960 ms, most of it heard


def test_bench_limits_against_a_spawned_server(tmp_path, capsys) -> None:
    out = tmp_path / "limits.json"
    assert main(["bench-limits", "--body-mb", "4", "--json", str(out)]) == 0, capsys.readouterr()
    figures = json.loads(out.read_text())["after"]
    offer = figures["vanished_offer"]
    assert offer["slot_held_s"] == 0 and offer["dropped_after_s"] is not None  # no slot, then forgotten
    assert {kind: (b["status"], b["code"]) for kind, b in figures["bodies"].items()} == {
        kind: (413, "request_too_large") for kind in ("declared", "streamed", "multipart")}
    assert "vanished offer: slot held" in capsys.readouterr().out
