"""``mimo-agent bench-codec``: codec speed and streaming-decode fidelity (prints figures).

Real-time factors of the exact encode and the offline decode; per-chunk latency of the default
streaming schedule, alone and batched across streams; distance of each streaming schedule to the
offline decode of the same codes (log-mel L1, SNR) against its built-in latency; agreement of the
incremental encoder with the exact encode; peak RSS. With random weights (the presets) the
fidelity figures are only indicative: the decoder's input has the same scale whatever the content,
so its sequence-wide GroupNorm statistics hardly move. ``--norm-sensitive STRENGTH`` rescales each
codebook entry by exp(STRENGTH * z), z the standardised loudness of the audio frames it encodes
(after the codes are computed), so that quiet and loud passages reach the decoder at different
scales and the running statistics of a stream's first chunks differ from the whole turn's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import AudioTokenizerConfig
from .config import preset as preset_config
from .incremental import IncrementalEncodeConfig, incremental_encode
from .mel import log_mel_distance, snr_db
from .streaming import DecodeSchedule, norm_statistics, stream_decode
from .tokenizer import MiMoAudioTokenizer, init_random_weights, load_audio_tokenizer

#: A prior weighted as this many tokens never moves: fixed statistics.
ORACLE_WEIGHT = 10**9
DEFAULT_AUDIO = Path(__file__).resolve().parents[2] / "tests" / "data" / "codec" / "speech_en.wav"


def fidelity_schedules(grid: str = "full") -> list[DecodeSchedule]:
    """The schedules of the fidelity table: the official one, then both designs over a grid."""
    if grid == "small":
        return [
            DecodeSchedule.official(),
            DecodeSchedule(mode="window"),
            DecodeSchedule(mode="window", left_context_tokens=160),
            DecodeSchedule(holdback_tokens=0),
            DecodeSchedule(refresh_from=None),
            DecodeSchedule(),
            DecodeSchedule(holdback_tokens=4),
            DecodeSchedule(norm="frozen"),
        ]
    out = [DecodeSchedule.official()]
    for mode in ("window", "cached"):
        for left in (16, 50, 160):
            for hold in (0, 2):
                out.append(DecodeSchedule(mode=mode, left_context_tokens=left, holdback_tokens=hold))
    out += [
        DecodeSchedule(mode="cached", refresh_from=None),
        DecodeSchedule(mode="cached", norm="frozen", freeze_after_tokens=25),
        DecodeSchedule(mode="cached", holdback_tokens=4),
        DecodeSchedule(mode="window", holdback_tokens=4),
        DecodeSchedule(mode="cached", chunk_patches=3),
    ]
    default = DecodeSchedule()
    if default not in out:
        out.append(default)
    return out


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add = parser.add_argument
    add("--preset", default="tiny", help="tokenizer preset (random weights): tiny | mimo-audio-tokenizer")
    add("--checkpoint", help="a tokenizer checkpoint directory or hub id instead of a preset")
    add("--override", nargs="*", default=[], metavar="KEY=VALUE",
        help="change preset config fields, e.g. d_model=256 vocoder_num_layers=16")
    add("--norm-sensitive", type=float, default=0.0, metavar="STRENGTH",
        help="scale codebook entries by exp(STRENGTH * loudness z-score) (GroupNorm-sensitive weights)")
    add("--audio", nargs="*", type=Path, default=[DEFAULT_AUDIO],
        help=f"speech files to encode (default: {DEFAULT_AUDIO.relative_to(DEFAULT_AUDIO.parents[3])})")
    add("--device", default="cpu", help="cpu, cuda or cuda:N")
    add("--dtype", default="fp32", help="fp32, bf16 or fp16")
    add("--threads", type=int, default=1, help="torch CPU threads (1: the one-core figures)")
    add("--repeat", type=int, default=3, help="timing repetitions (the median is shown)")
    add("--streams", type=int, default=8, help="streams decoded together in the batching test")
    add("--skip", nargs="*", default=[], choices=["speed", "chunks", "batch", "fidelity", "incremental"],
        help="tables to leave out (default: none)")
    add("--grid", choices=["full", "small"], default="full", help="schedules in the fidelity table")
    add("--clock", choices=["wall", "cpu"], default="wall",
        help="time with the wall clock, or with this process's CPU time (steadier on a shared CPU machine)")
    add("--json", type=Path, help="also write the figures to this JSON file")


def _build(args) -> MiMoAudioTokenizer:
    if args.checkpoint:
        return load_audio_tokenizer(args.checkpoint, dtype=args.dtype, device=args.device)
    config = preset_config(args.preset)
    if args.override:
        fields = {f.name: f.type for f in dataclasses.fields(AudioTokenizerConfig)}
        changes = {}
        for item in args.override:
            key, _, value = item.partition("=")
            if key not in fields:
                raise SystemExit(f"--override: unknown config field {key!r}")
            changes[key] = json.loads(value)
        config = AudioTokenizerConfig.from_dict({**config.to_dict(), **changes})
    tok = init_random_weights(MiMoAudioTokenizer(config), seed=0)
    return tok.to(device=args.device, dtype=load_dtype(args.dtype)).eval()


def load_dtype(name: str) -> torch.dtype:
    from ..checkpoint import parse_dtype

    return parse_dtype(name)


@torch.no_grad()
def make_norm_sensitive(
    tok: MiMoAudioTokenizer, wavs: list[np.ndarray], codes: list[torch.Tensor], strength: float
) -> None:
    """Scale the codebook entries so the decoder's input is small where the audio is quiet and large
    where it is loud: entry k of codebook q gets exp(strength * z_k), z_k the mean standardised
    log-mel energy of the tokens that use it in ``codes`` (0 for unused entries). Call it after
    encoding: the codes stay those of the original weights."""
    energy = []
    for wav, c in zip(wavs, codes, strict=True):
        per_frame = tok.mel(wav).mean(dim=1)  # (T_mel,) mean log-mel
        fpt = tok.config.mel_frames_per_token
        per_frame = torch.nn.functional.pad(per_frame, (0, fpt * c.shape[0]), value=float(per_frame[-1]))
        energy.append(per_frame[: fpt * c.shape[0]].view(c.shape[0], fpt).mean(dim=1).cpu())
    e = torch.cat(energy)
    z = (e - e.mean()) / e.std().clamp_min(1e-6)
    all_codes = torch.cat(codes)
    for q in range(all_codes.shape[1]):
        book = tok.encoder.quantizer.codebook(q)
        total = torch.zeros(book.shape[0]).index_add_(0, all_codes[:, q], z)
        count = torch.zeros(book.shape[0]).index_add_(0, all_codes[:, q], torch.ones_like(z))
        mean_z = total / count.clamp_min(1)
        book.mul_(torch.exp(strength * mean_z)[:, None].to(book.device))


@torch.no_grad()
def norm_variability(tok: MiMoAudioTokenizer, codes: torch.Tensor, tokens: int = 4) -> float:
    """|log(std of dconv1's pre-norm output over the first ``tokens`` / std over the whole turn)|."""
    emb = tok.embed_codes(codes)[None].to(tok.decoder.dtype)
    y, _ = tok.decoder.dconv1.upsample(emb, torch.tensor([codes.shape[0]], device=tok.device))
    first = y[0, : 2 * tokens].float().std()
    return float(torch.log(first / y[0].float().std()).abs())


def _sync(tok: MiMoAudioTokenizer) -> None:
    if tok.device.type == "cuda":
        torch.cuda.synchronize()


def _timed(tok, fn, repeat: int, clock) -> float:
    times = []
    for _ in range(repeat):
        _sync(tok)
        start = clock()
        fn()
        _sync(tok)
        times.append(clock() - start)
    return statistics.median(times)


def run(args) -> int:
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    tok = _build(args)
    from .audio import load_wav

    wavs = [load_wav(p) for p in args.audio]
    seconds = sum(w.shape[0] for w in wavs) / tok.sample_rate
    cfg = tok.config
    params = sum(p.numel() for p in tok.parameters())
    name = f"{args.checkpoint or args.preset} {' '.join(args.override)}".strip()
    print(f"tokenizer: {name}, {params / 1e6:.1f} M params, {tok.dtype}, {tok.device}, "
          f"{args.threads} thread(s), torch {torch.__version__}, {args.clock} clock")
    print(f"  d_model {cfg.d_model}, encoder {cfg.encoder_layers} layers, decoder {cfg.decoder_layers}, "
          f"vocoder {cfg.vocoder_num_layers}x{cfg.vocoder_dim}; norm-sensitive {args.norm_sensitive}")
    print(f"audio: {len(wavs)} file(s), {seconds:.2f} s")
    codes = [tok.encode(w) for w in wavs]
    if args.norm_sensitive:
        make_norm_sensitive(tok, wavs, codes, args.norm_sensitive)
    offline = [tok.decode(c) for c in codes]
    report: dict = {"audio_seconds": seconds, "params": params}
    variability = statistics.mean(norm_variability(tok, c) for c in codes)
    report["norm_variability"] = variability
    print(f"GroupNorm variability |log(std of dconv1 over the first patch / the turn)|: {variability:.3f}")

    if "speed" not in args.skip:
        enc = _timed(tok, lambda: [tok.encode(w) for w in wavs], args.repeat, clock)
        dec = _timed(tok, lambda: [tok.decode(c) for c in codes], args.repeat, clock)
        report["encode_rtf"], report["decode_rtf"] = enc / seconds, dec / seconds
        print("\n== offline speed ==")
        print(f"encode: {enc * 1000:8.1f} ms for {seconds:.2f} s of audio, RTF {enc / seconds:.4f} "
              f"({seconds / enc:.0f}x real time)")
        print(f"decode: {dec * 1000:8.1f} ms for {seconds:.2f} s of audio, RTF {dec / seconds:.4f} "
              f"({seconds / dec:.0f}x real time)")

    if "chunks" not in args.skip:
        print("\n== per-chunk latency, default schedule, one patch (4 tokens) per call ==")
        schedule = DecodeSchedule()
        print(f"schedule: {schedule.resolve(tok.streaming_prior).describe()}")
        calls, first = [], None
        for c in codes:
            stream = tok.new_decode_stream(schedule)
            for i in range(0, c.shape[0], schedule.group_size):
                _sync(tok)
                start = clock()
                (audio,) = tok.decode_streams([(stream, c[i : i + schedule.group_size])])
                _sync(tok)
                elapsed = clock() - start
                if audio.size:
                    if first is None:
                        first = elapsed
                    else:
                        calls.append(elapsed)
            tok.finish_stream(stream)
        calls.sort()
        p90 = calls[int(0.9 * (len(calls) - 1))]
        median = statistics.median(calls)
        report["chunk_ms"] = {"first": first * 1e3, "median": median * 1e3, "p90": p90 * 1e3}
        print(f"first chunk {first * 1e3:.2f} ms; then median {median * 1e3:.2f} ms, p90 {p90 * 1e3:.2f} ms, "
              f"max {calls[-1] * 1e3:.2f} ms per 160 ms of audio ({len(calls)} chunks)")

    if "batch" not in args.skip:
        print(f"\n== {args.streams} streams, one patch each per call: batched vs one call per stream ==")
        c = codes[0]
        n_patches = min(c.shape[0] // 4, 25)
        for mode in ("cached", "window"):
            schedule = DecodeSchedule(mode=mode)

            def together(schedule=schedule):
                streams = [tok.new_decode_stream(schedule) for _ in range(args.streams)]
                for p in range(n_patches):
                    tok.decode_streams([(s, c[4 * p : 4 * p + 4]) for s in streams])

            def apart(schedule=schedule):
                streams = [tok.new_decode_stream(schedule) for _ in range(args.streams)]
                for p in range(n_patches):
                    for s in streams:
                        tok.decode_streams([(s, c[4 * p : 4 * p + 4])])

            t_together = _timed(tok, together, args.repeat, clock)
            t_apart = _timed(tok, apart, args.repeat, clock)
            print(f"{mode:7s}: batched {t_together / n_patches * 1e3:7.2f} ms per round, separate "
                  f"{t_apart / n_patches * 1e3:7.2f} ms per round (x{t_apart / t_together:.2f})")
            report[f"batch_{mode}"] = {"together_ms": t_together / n_patches * 1e3,
                                       "apart_ms": t_apart / n_patches * 1e3}

    if "fidelity" not in args.skip:
        print("\n== streaming decode vs offline decode of the same codes (mean over files) ==")
        print("| schedule | first audio after | log-mel L1 | SNR dB | decode RTF |")
        print("| --- | --- | --- | --- | --- |")
        fe = tok.front_end
        rows = []
        # two diagnostic rows: the default with the offline statistics of each file (an oracle: what
        # is left is the vocoder's missing look-ahead), and with a prior from the other files
        oracle = [norm_statistics(tok, [c]) for c in codes]
        variants = [(s, None) for s in fidelity_schedules(args.grid)]
        if tok.streaming_prior is not None:  # the default without the checkpoint's prior
            variants.append((DecodeSchedule(norm="running"), None))
        fixed = dataclasses.replace(DecodeSchedule(), norm="prior", prior=oracle[0],
                                    prior_tokens=ORACLE_WEIGHT)
        variants.append((fixed, lambda i: oracle[i]))
        if len(codes) > 1:
            left_out = [norm_statistics(tok, codes[:i] + codes[i + 1 :]) for i in range(len(codes))]
            variants.append((dataclasses.replace(DecodeSchedule(), norm="prior", prior=left_out[0]),
                             lambda i: left_out[i]))
        for schedule, per_file in variants:
            l1s, snrs, elapsed = [], [], 0.0
            for i, (c, ref) in enumerate(zip(codes, offline, strict=True)):
                if per_file is not None:
                    schedule = dataclasses.replace(schedule, prior=per_file(i))
                start = clock()
                out, _ = stream_decode(tok, c, schedule)
                elapsed += clock() - start
                ref_t, out_t = torch.from_numpy(ref), torch.from_numpy(out)
                l1s.append(log_mel_distance(fe(ref_t.to(tok.device)), fe(out_t.to(tok.device))))
                snrs.append(snr_db(ref_t, out_t))
            first = schedule.first_audio_tokens()
            latency = "end" if first is None else f"{first * 1000 / cfg.token_rate:.0f} ms"
            tag = " (default)" if schedule == DecodeSchedule() else ""
            if tok.streaming_prior is not None and schedule == DecodeSchedule(norm="running"):
                tag = " (default with the checkpoint's prior off)"
            if per_file is not None:
                oracle_row = schedule.prior_tokens == ORACLE_WEIGHT
                tag = " (offline statistics: oracle)" if oracle_row else " (prior: other files)"
            l1, snr, rtf = statistics.mean(l1s), statistics.mean(snrs), elapsed / seconds
            name = schedule.resolve(tok.streaming_prior).describe() + tag
            rows.append({"schedule": name, "first_audio": latency, "log_mel_l1": l1, "snr_db": snr,
                         "rtf": rtf})
            print(f"| {name} | {latency} | {l1:.4f} | {snr:.1f} | {rtf:.3f} |", flush=True)
        report["fidelity"] = rows

    if "incremental" not in args.skip:
        print("\n== incremental encode vs exact encode: share of identical codes per codebook ==")
        for config in (IncrementalEncodeConfig(), IncrementalEncodeConfig(lookahead_tokens=8),
                       IncrementalEncodeConfig(left_context_tokens=None, lookahead_tokens=8)):
            per_file = [(incremental_encode(tok, w, config) == c).float().mean(0)
                        for w, c in zip(wavs, codes, strict=True)]
            same = torch.stack(per_file).mean(0)
            left = "all" if config.left_context_tokens is None else config.left_context_tokens
            print(f"chunk {config.chunk_tokens}t, left {left}t, look-ahead {config.lookahead_tokens}t: "
                  + " ".join(f"{x:.2f}" for x in same.tolist()))
            report.setdefault("incremental", []).append({"config": dataclasses.asdict(config),
                                                          "same": same.tolist()})

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["peak_rss_mb"] = rss_mb
    print(f"\npeak RSS: {rss_mb:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mimo-agent bench-codec", description=__doc__.splitlines()[0])
    add_arguments(parser, "bench-codec")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
