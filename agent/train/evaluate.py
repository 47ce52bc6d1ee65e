"""``mimo-agent eval-codec``: how well a codec reconstructs speech it was not trained on.

Each utterance is encoded with ``n_q`` codebooks (8: what the language model reads and writes;
20: all of them), decoded offline and compared with the input: STOI (short-time objective
intelligibility, ``pystoi``; 1 for the same signal) and the log-mel L1 of the codec's own front
end (0 for the same signal). Inputs: the held-out split of a ``mimo-agent train data`` corpus,
reported per voice, and any audio files (``--audio``; the human recordings, for instance).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..codec.audio import load_wav
from ..codec.mel import log_mel_distance
from ..codec.tokenizer import MiMoAudioTokenizer, load_audio_tokenizer


def stoi(reference: np.ndarray, estimate: np.ndarray, sample_rate: int) -> float:
    """STOI of ``estimate`` against ``reference`` (the common length), 1 for identical signals."""
    try:
        from pystoi import stoi as pystoi_stoi
    except ImportError:
        raise RuntimeError("STOI needs pystoi: pip install pystoi (or the project's dev extra)") from None
    n = min(reference.size, estimate.size)
    return float(pystoi_stoi(reference[:n].astype(np.float64), estimate[:n].astype(np.float64), sample_rate))


def log_mel_l1(tok: MiMoAudioTokenizer, reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean absolute log-mel difference (the codec's 128-band natural-log front end), 0 when equal."""
    return log_mel_distance(tok.mel(reference), tok.mel(estimate))


def reconstruct(tok: MiMoAudioTokenizer, audio: np.ndarray, n_q: int) -> np.ndarray:
    """Encode with ``n_q`` codebooks and decode offline, cut to the input's length."""
    return tok.decode(tok.encode(audio, n_q=n_q))[: audio.size]


def measure(tok: MiMoAudioTokenizer, audio: np.ndarray, n_q: int) -> dict[str, float]:
    out = reconstruct(tok, audio, n_q)
    return {"stoi": stoi(audio, out, tok.sample_rate), "log_mel_l1": log_mel_l1(tok, audio, out)}


def evaluate(
    tok: MiMoAudioTokenizer, items: list[tuple[str, np.ndarray]], n_qs: list[int]
) -> dict[str, dict[str, dict[str, float]]]:
    """{group: {"n_q=8": {"stoi", "log_mel_l1", "utterances"}}} for (group, audio) items, plus "mean"
    (over all items) when there are several groups."""
    rows: dict[str, dict[int, list[dict[str, float]]]] = {}
    for group, audio in items:
        for n_q in n_qs:
            rows.setdefault(group, {}).setdefault(n_q, []).append(measure(tok, audio, n_q))
    result: dict[str, dict[str, dict[str, float]]] = {}
    everything: dict[int, list[dict[str, float]]] = {}
    for group, by_nq in rows.items():
        for n_q, values in by_nq.items():
            everything.setdefault(n_q, []).extend(values)
            result.setdefault(group, {})[f"n_q={n_q}"] = _mean(values)
    if len(rows) > 1:
        result["mean"] = {f"n_q={n_q}": _mean(values) for n_q, values in everything.items()}
    return result


def _mean(values: list[dict[str, float]]) -> dict[str, float]:
    return {"stoi": round(statistics.fmean(v["stoi"] for v in values), 4),
            "log_mel_l1": round(statistics.fmean(v["log_mel_l1"] for v in values), 4),
            "utterances": len(values)}


def table(result: dict[str, dict[str, dict[str, float]]]) -> str:
    n_qs = list(next(iter(result.values())).keys()) if result else []
    head = "| input | " + " | ".join(f"STOI {k} | log-mel L1 {k}" for k in n_qs) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(n_qs))]
    for group, by_nq in result.items():
        cells = " | ".join(f"{by_nq[k]['stoi']:.3f} | {by_nq[k]['log_mel_l1']:.3f}" for k in n_qs)
        lines.append(f"| {group} ({next(iter(by_nq.values()))['utterances']}) | {cells} |")
    return "\n".join(lines)


def add_arguments(parser, command: str | None = None) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="codec checkpoint directory (e.g. from `mimo-agent train codec`)")
    source.add_argument("--preset", help="random-weight preset instead (tiny, tiny-speech): the untrained baseline")
    parser.add_argument("--data", help="corpus of `mimo-agent train data`: its held-out voices are measured")
    parser.add_argument("--audio", nargs="*", default=[], help="audio files measured one by one (any rate)")
    parser.add_argument("--n-q", type=int, nargs="+", default=[8, 20],
                        help="codebooks used to encode (default: 8 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures to this JSON file")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data and not args.audio:
        raise SystemExit("eval-codec: give --data (a corpus) and/or --audio files")
    tok = load_audio_tokenizer(args.checkpoint, args.preset, dtype=torch.float32, device="cpu")
    results: dict[str, dict] = {}
    started = time.monotonic()
    if args.data:
        from .data import load_split

        held_out = [(entry["voice"], audio) for entry, audio in load_split(args.data, "held_out", tok.sample_rate)]
        results["held-out voices"] = evaluate(tok, held_out, args.n_q)
    if args.audio:
        results["audio files"] = evaluate(tok, [(Path(p).name, load_wav(p, tok.sample_rate)) for p in args.audio],
                                          args.n_q)
    print(f"codec {args.checkpoint or args.preset} ({time.monotonic() - started:.0f} s)")
    for name, result in results.items():
        print(f"\n{name}:\n{table(result)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0
