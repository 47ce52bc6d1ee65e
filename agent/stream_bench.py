"""``mimo-agent bench-stream``: streaming input, by lag (prints figures).

Each recording, followed by ``--silence-ms`` of silence (what a server-VAD turn commits), is sent to
the engine in 100 ms parts as a user turn being spoken (``StreamUserAudio``); each part is encoded
and prefilled before the next comes (the engine keeps up, as on an idle server). Then the turn is
committed (``AddUserAudio``, the exact whole-turn encode) and answered (one patch). Per lag
(``EngineConfig.stream_lag_patches``; ``off``: no streaming, today's path) it reports:

- patches prefilled while the user spoke, and how many survived the commit (the prefix of them
  that the exact encode agrees with);
- commit-time work: the exact encode plus the prefill of what did not survive (the response's
  ``encode_ms`` + ``prefill_ms``), and the positions prefilled then;
- work while speaking: the streaming encodes and prefills, and the turn's total against ``off``.

Medians over ``--repeats`` runs; rounds of all lags are interleaved. With random weights (the
presets) the encoder's attention is spread over the whole turn, so far more codes change than with
trained weights: the survival figures are a floor.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import time
from pathlib import Path

import numpy as np

DEFAULT_AUDIO = sorted((Path(__file__).resolve().parents[1] / "tests" / "data").glob("speech_*.wav"))
PART = 2400  # 100 ms


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--model", help="MiMo-Audio LM checkpoint (default: the preset)")
    parser.add_argument("--tokenizer", help="MiMo-Audio-Tokenizer checkpoint (with --model)")
    parser.add_argument("--preset", default="tiny", help="built-in model, random weights (default: tiny)")
    parser.add_argument("--audio", nargs="*", default=None, help="WAV files (default: the tests' recordings)")
    parser.add_argument("--lags", nargs="*", default=["off", "0", "1", "2", "4", "8"],
                        help="stream_lag_patches values; 'off' is the whole-turn path (default: off 0 1 2 4 8)")
    parser.add_argument("--every", type=int, default=1, help="stream_every_patches (default 1)")
    parser.add_argument("--window", type=float, default=4.0, help="stream_window_s (default 4)")
    parser.add_argument("--silence-ms", type=int, default=500, help="silence after each recording (default 500)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, the median shown (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


class _Stages:
    """The engine's metrics callback: seconds per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, seconds: float, labels: dict) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def _wait(check, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the engine did not catch up")
        time.sleep(0.001)


def _turn(engine, stages: _Stages, pcm: np.ndarray, lag: int | None) -> dict:
    from agent.engine import AddUserAudio, Respond, ResponseDone, ResponseParams, StreamUserAudio
    from agent.lm.sampling import GREEDY, ChannelSampling

    events: queue.Queue = queue.Queue()
    handle = engine.open_session(events.put)
    try:
        s = engine._sessions
        _wait(lambda: handle.sid in s)
        state = s[handle.sid]
        prefilled = 0
        if lag is not None:
            for i in range(0, len(pcm), PART):
                handle.submit(StreamUserAudio("u", pcm[i:i + PART]))
                end = min(len(pcm), i + PART)
                _wait(lambda end=end: (state.provisional is not None and state.provisional.samples == end
                                       and not engine._stream_due(state) and state.provisional.synced))
            if state.provisional is None:
                raise RuntimeError("the streamed turn was dropped (see the log)")
            codes = state.provisional.codes
            prefilled = 0 if codes is None else len(codes) // engine.lm.config.group_size
        streaming = stages.take()
        handle.submit(AddUserAudio("u", pcm))
        handle.submit(Respond("r", "a", ResponseParams(audio=False, max_output_patches=1,
                                                       sampling=ChannelSampling(GREEDY, GREEDY))))
        while not isinstance(done := events.get(timeout=120), ResponseDone):
            pass
        stages.take()
        turn = next(it for it in state.items if it.item_id == "u")
        header = len(engine.renderer.open_turn([], turn.codes)) - len(turn.codes) // engine.lm.config.group_size
        t = done.timings
        return {"prefilled": prefilled, "survived": max(0, t["cached_positions"] - header),
                "patches": len(turn.codes) // engine.lm.config.group_size,
                "commit_ms": t["encode_ms"] + t.get("prefill_ms", 0.0), "encode_ms": t["encode_ms"],
                "tail_positions": t["prefill_positions"],
                "streaming_ms": 1000 * (streaming.get("stream_encode", 0.0) + streaming.get("prefill", 0.0))}
    finally:
        handle.close()


def run(args: argparse.Namespace) -> int:
    import torch

    from agent.engine import Engine, EngineConfig
    from agent.runtime import load_runtime
    from streaming.audio import pcm16_to_float32, read_wav, resample

    torch.set_num_threads(args.threads)
    rt = load_runtime(args.model, args.tokenizer, None if args.model else args.preset, device="cpu")
    turns = []
    for path in args.audio or DEFAULT_AUDIO:
        pcm, rate = read_wav(path)
        wav = pcm16_to_float32(pcm if rate == 24000 else resample(pcm, rate, 24000))
        turns.append((Path(path).name, np.concatenate([wav, np.zeros(args.silence_ms * 24, np.float32)])))
    lags = [None if lag == "off" else int(lag) for lag in args.lags]
    stages = _Stages()
    engines = {lag: Engine(rt.lm, rt.tokenizer, rt.codec,
                           EngineConfig(max_sessions=1, max_positions=1024, stream_lag_patches=lag,
                                        stream_every_patches=args.every, stream_window_s=args.window,
                                        cuda_graphs=False), metrics=stages).start() for lag in lags}
    results: dict = {lag: {name: [] for name, _ in turns} for lag in lags}
    try:
        for _ in range(args.repeats):
            for name, pcm in turns:
                for lag in lags:
                    results[lag][name].append(_turn(engines[lag], stages, pcm, lag))
    finally:
        for engine in engines.values():
            engine.stop()
    med = statistics.median
    print(f"bench-stream: {rt.name}, {args.threads} thread(s), {len(turns)} turns "
          f"(+{args.silence_ms} ms silence), medians of {args.repeats}; a streaming encode every {args.every} "
          f"patch(es) of the last {args.window:g} s")
    print(f"{'lag':>4} {'turn':<26} {'patches':>7} {'prefilled':>9} {'survived':>8} {'commit ms':>9} "
          f"{'(encode)':>8} {'tail pos':>8} {'stream ms':>9} {'total/off':>9}")
    for lag in lags:
        for name, _ in turns:
            runs, base = results[lag][name], results[lags[0]][name] if lags[0] is None else None
            total = med(r["commit_ms"] + r["streaming_ms"] for r in runs)
            ratio = f"{total / med(r['commit_ms'] for r in base):.2f}" if base else "-"
            print(f"{'off' if lag is None else lag:>4} {name:<26} {runs[0]['patches']:>7} "
                  f"{med(r['prefilled'] for r in runs):>9} {med(r['survived'] for r in runs):>8} "
                  f"{med(r['commit_ms'] for r in runs):>9.1f} {med(r['encode_ms'] for r in runs):>8.1f} "
                  f"{med(r['tail_positions'] for r in runs):>8} {med(r['streaming_ms'] for r in runs):>9.1f} "
                  f"{ratio:>9}")
    return 0
