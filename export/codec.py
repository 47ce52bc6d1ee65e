"""The audio tokenizer's hot paths on ONNX Runtime, behind the engine's codec interface.

:class:`OnnxCodec` wraps a PyTorch ``MiMoAudioTokenizer`` (its configuration, log-mel front end
and inverse STFT) and replaces two things:

- ``encode_batch``: the encoder and the RVQ run as the ``codec_encoder`` graph (the log-mel STFT
  stays in torch: ONNX Runtime's DFT is a direct O(n^2) transform for n_fft = 960);
- the streaming decode of "cached" schedules (the server's default): each pass runs the
  ``codec_decoder_chunk`` graph for all due streams at once. The schedule logic (when a chunk is due,
  what is held back, cross-fades, 60 s segments, when the history is refreshed) is
  ``agent.codec.streaming``'s own, so both backends emit the same chunk sizes at the same moments;
  only the decoding in the pass is ours.

Streams with a "window" schedule, and the offline ``decode``, run on PyTorch (the server never asks
for them; they re-decode a whole window and need other graphs). Per-stream state lives in the
stream (``DecodeStream``/``_Segment``), in the same fields and types the PyTorch pass uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from agent.codec import streaming
from agent.codec.config import LM_CODEBOOKS
from agent.codec.vocoder import overlap_add

from .runtime import GraphRunner

#: the longest vocoder window (mel frames, 10 ms each) the chunk graph takes; the default schedule's
#: is (50 + 4) tokens = 216 frames. Longer ones (unbounded left context) go to PyTorch's blockwise path.
MAX_GRAPH_WINDOW = 1024


class OnnxCodec:
    """``encode_batch``, ``new_decode_stream``, ``decode_streams``, ``finish_stream`` on ONNX Runtime."""

    def __init__(self, tok: nn.Module, encoder: GraphRunner, chunk: GraphRunner, settings: Mapping[str, Any]) -> None:
        self.tok = tok
        self.encoder = encoder
        self.chunk = chunk
        self.codebooks = int(settings.get("codec_codebooks", LM_CODEBOOKS))
        cfg = tok.config
        self.layers = cfg.decoder_layers
        self.heads = cfg.decoder_attention_heads
        self.head_dim = cfg.d_model // cfg.decoder_attention_heads
        self.passes = {"cached": self._cached_pass}
        self.istft = WindowTailISTFT(cfg.nfft, cfg.hop_length)

    # --- the tokenizer's attributes -------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.tok.config

    @property
    def device(self) -> torch.device:
        return self.tok.device

    @property
    def sample_rate(self) -> int:
        return self.tok.sample_rate

    @property
    def samples_per_token(self) -> int:
        return self.tok.samples_per_token

    # --- encoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_batch(
        self,
        wavs: Sequence[np.ndarray | torch.Tensor],
        sample_rate: int | None = None,
        *,
        n_q: int = LM_CODEBOOKS,
        pad_to_group: bool = True,
    ) -> list[torch.Tensor]:
        """As ``MiMoAudioTokenizer.encode_batch``: codes (T, n_q) int64 on the CPU per turn."""
        if not 1 <= n_q <= self.codebooks:
            raise ValueError(f"n_q={n_q} is outside 1..{self.codebooks} (the exported encoder's codebooks)")
        def encode_group(mel: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
            T25 = (mel.shape[1] + 3) // 4  # conv2 (stride 2) then the pooling (2), both rounding up
            out = self.encoder({"mel": mel, "mel_frames": lengths},
                               {"codes": (len(lengths), T25, self.codebooks), "tokens": (len(lengths),)})
            codes, tokens = out["codes"].cpu(), out["tokens"].tolist()
            return [codes[b, : tokens[b], :n_q] for b in range(len(tokens))]

        return self.tok.encode_segments(wavs, sample_rate, encode_group, n_q=n_q, pad_to_group=pad_to_group)

    def encode(self, wav: np.ndarray | torch.Tensor, sample_rate: int | None = None, **kwargs: Any) -> torch.Tensor:
        return self.encode_batch([wav], sample_rate, **kwargs)[0]

    # --- decoding ---------------------------------------------------------------------------------
    def decode_cache_bytes(self) -> int:
        return self.tok.decode_cache_bytes()

    def new_decode_stream(self, schedule: streaming.DecodeSchedule | None = None) -> streaming.DecodeStream:
        return self.tok.new_decode_stream(schedule)

    def decode_streams(self, items) -> list[np.ndarray]:
        """``[(stream, codes (n, 8)), ...]`` -> audio each stream can play now (as the tokenizer's)."""
        return streaming.decode_streams(self.tok, items, passes=self.passes)

    def finish_stream(self, stream: streaming.DecodeStream) -> np.ndarray:
        """End a stream: decode and return all audio it still holds back."""
        return self.finish_streams([stream])[0]

    def finish_streams(self, streams: Sequence[streaming.DecodeStream]) -> list[np.ndarray]:
        """End several streams in one batched pass; the held-back audio of each."""
        return streaming.finish_streams(self.tok, list(streams), passes=self.passes)

    def decode(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """Offline decode (PyTorch)."""
        return self.tok.decode(codes)

    def _cached_pass(self, tok: nn.Module, jobs: list[streaming.Job]) -> list[np.ndarray]:
        """The "cached" pass: streams the graph covers run in one graph call, others on PyTorch.

        The graph takes the exported number of codebooks, and its vocoder attends through a dense
        mask, fine for the schedules' windows of a few hundred frames; a stream with other codes or
        an unbounded left context (a window past :data:`MAX_GRAPH_WINDOW` frames) takes the PyTorch
        pass. Both keep the stream state in the same form, so a stream may switch between them.
        """
        fpt = tok.config.mel_frames_per_token
        spt = tok.samples_per_token

        def fits(job: streaming.Job) -> bool:
            stream, seg, _ = job
            left = seg.received - streaming._window_start(seg, stream.schedule, spt)
            return stream.n_codebooks == self.codebooks and left * fpt <= MAX_GRAPH_WINDOW

        picks = [fits(job) for job in jobs]
        ours = self._graph_pass(tok, [j for j, p in zip(jobs, picks, strict=True) if p])
        theirs = streaming.PASSES["cached"](tok, [j for j, p in zip(jobs, picks, strict=True) if not p]) \
            if not all(picks) else []
        return [ours.pop(0) if p else theirs.pop(0) for p in picks]

    @torch.no_grad()
    def _graph_pass(self, tok: nn.Module, jobs: list[streaming.Job]) -> list[np.ndarray]:
        """``streaming._cached_pass`` on the chunk graph: the decoder advance and the vocoder in one
        run for all jobs; a second run re-decodes the history of the streams due for a refresh
        (``streaming._refresh``, which keeps the bookkeeping); then emission as in PyTorch."""
        if not jobs:
            return []
        spt, fpt = tok.samples_per_token, tok.config.mel_frames_per_token
        audio = dict(zip((id(seg) for _, seg, _ in jobs), self._decode(tok, jobs), strict=True))

        def rebuild(tok: nn.Module, due: list[streaming.Job], rebuild: bool) -> None:
            audio.update(zip((id(seg) for _, seg, _ in due), self._decode(tok, due, rebuild=rebuild), strict=True))

        streaming._refresh(tok, jobs, advance=rebuild)
        out = []
        for stream, seg, final in jobs:
            w0 = streaming._window_start(seg, stream.schedule, spt)
            offset, samples = audio[id(seg)]
            end = streaming._emit_end(seg, stream.schedule, final, spt)
            out.append(streaming.emit(seg, samples, w0 * spt + offset, end, final, stream.schedule.crossfade_samples))
            seg.mel, seg.mel_offset = seg.mel[w0 * fpt - seg.mel_offset :], w0 * fpt
            if not stream.schedule.refresh_from:  # a refresh re-reads the whole segment's codes
                seg.codes, seg.codes_offset = seg.codes[seg.advanced - seg.codes_offset :], seg.advanced
        return out

    def _decode(self, tok: nn.Module, jobs: list[streaming.Job], rebuild: bool = False) -> list[tuple[int, np.ndarray]]:
        """Run the tokens each segment has not advanced through yet (``_advance_decoder``), update
        its state, and synthesise its vocoder window: per job (first sample, samples to the end).

        ``rebuild``: the segments were reset to re-run their history; dconv1's statistics already
        count it (kept as they are), dconv2's start again.
        """
        spt, fpt = tok.samples_per_token, tok.config.mel_frames_per_token
        cfg = tok.config
        device, dtype = tok.device, tok.decoder.dtype
        B = len(jobs)
        segs = [seg for _, seg, _ in jobs]
        new = [seg.codes[seg.advanced - seg.codes_offset :, : self.codebooks] for seg in segs]
        n = [int(c.shape[0]) for c in new]
        N = max(1, *n)  # rows with nothing new (a finish) still run the vocoder: one padded token

        # each row's vocoder window: segment frames [w0 * fpt, received * fpt), from the mel it keeps
        # (up to ``advanced``) and the frames this run makes
        left, new_from, window, first = [], [], [], []
        for stream, seg, _ in jobs:
            w0 = streaming._window_start(seg, stream.schedule, spt)
            lo, kept_end = w0 * fpt, seg.advanced * fpt
            kept = seg.mel[lo - seg.mel_offset :] if seg.mel is not None and lo < kept_end else None
            left.append(kept if kept is not None else torch.zeros(0, cfg.n_mels, dtype=dtype, device=device))
            new_from.append(max(0, lo - kept_end))
            window.append(left[-1].shape[0] + seg.received * fpt - max(lo, kept_end))
            # the frames whose samples ``emit`` can read: from the previous cross-fade tail on
            first.append(self.istft.first_frame(max(0, seg.covered - seg.tail.shape[0] - w0 * spt), window[-1]))
        left_mel = nn.utils.rnn.pad_sequence(left, batch_first=True)
        Lmax, W = left_mel.shape[1], max(window)
        index = torch.zeros(B, max(W, 1), dtype=torch.int64)
        for b, (m, start, frames) in enumerate(zip(left, new_from, window, strict=True)):
            index[b, : frames] = torch.cat([torch.arange(m.shape[0]),
                                            Lmax + start + torch.arange(frames - m.shape[0])])
        K = max(1, *(frames - t0 for frames, t0 in zip(window, first, strict=True)))
        windows = torch.tensor(window, device=device)
        keep1 = [True if rebuild else seg.frozen for seg in segs]
        feeds: dict[str, torch.Tensor] = {
            "codes": _pad(new, N, (self.codebooks,), torch.int64, device),
            "new_tokens": torch.tensor(n, device=device),
            "past_frames": torch.tensor([seg.frames50 for seg in segs], device=device),
            "moments1": torch.stack([self._moments(s, seg.moments1, 1, device) for s, seg, _ in jobs]),
            "moments2": torch.stack([self._moments(s, seg.moments2, 2, device) for s, seg, _ in jobs]),
            "keep_moments1": torch.tensor(keep1, device=device),
            "keep_moments2": torch.tensor([seg.frozen for seg in segs], device=device),
            "prev_hidden": torch.stack([seg.prev_hidden if seg.prev_hidden is not None
                                        else torch.zeros(cfg.d_model, dtype=dtype, device=device) for seg in segs]),
            "left_mel": left_mel,
            "window_index": index.to(device),
            "window_frames": windows,
            "spectrum_index": windows[:, None] - K + torch.arange(K, device=device),  # each window's last K
        }
        P = max(seg.frames50 for seg in segs)
        for i in range(self.layers):
            for kind, name in (("k", f"past_key_{i}"), ("v", f"past_value_{i}")):
                feeds[name] = self._past([getattr(seg.kv[i], kind) if seg.kv is not None else None for seg in segs],
                                         P, device, dtype)
        F = cfg.nfft // 2 + 1
        shapes = {"spectrum_real": (B, F, K), "spectrum_imag": (B, F, K), "mel": (B, 4 * N, cfg.n_mels),
                  "moments1_out": (B, 3), "moments2_out": (B, 3), "last_hidden": (B, cfg.d_model)}
        for i in range(self.layers):
            shapes[f"new_key_{i}"] = shapes[f"new_value_{i}"] = (B, self.heads, 2 * N, self.head_dim)
        out = self.chunk(feeds, shapes)

        # the new state of each segment that ran tokens (as ``_advance_decoder`` leaves it)
        for b, ((stream, seg, _), count) in enumerate(zip(jobs, n, strict=True)):
            if count == 0:
                continue
            for i, kv in enumerate(streaming.segment_kv(tok, stream, seg)):
                kv.append(out[f"new_key_{i}"][b : b + 1, :, : 2 * count].to(dtype),
                          out[f"new_value_{i}"][b : b + 1, :, : 2 * count].to(dtype))
            seg.frames50 += 2 * count
            seg.moments1 = tuple(out["moments1_out"][b])
            seg.moments2 = tuple(out["moments2_out"][b])
            seg.prev_hidden = out["last_hidden"][b].to(dtype)
            frames = out["mel"][b, : 4 * count].to(dtype)
            seg.mel = frames if seg.mel is None else torch.cat([seg.mel, frames])
            seg.advanced = seg.received
            if stream.schedule.norm == "frozen" and seg.received >= stream.schedule.freeze_after_tokens:
                seg.frozen = True

        # the inverse STFT of each window's last frames (torch)
        spectrum = torch.complex(out["spectrum_real"].float(), out["spectrum_imag"].float()).to(device)
        return [self.istft(spectrum[b, :, K - (window[b] - first[b]) :], first[b], window[b]) for b in range(B)]

    def _moments(self, stream: streaming.DecodeStream, moments: tuple[torch.Tensor, ...] | None, which: int,
                 device: torch.device) -> torch.Tensor:
        """A segment's GroupNorm moments (count, sum, sum of squares) fp64 (3,); for none yet, zeros
        (the graph adds the chunk's to them: exactly its own moments), or the schedule's prior as
        pseudo-moments worth ``prior_tokens`` tokens of frames (``streaming._normalise``)."""
        if moments is not None:
            return torch.stack(list(moments)).to(device=device, dtype=torch.float64)
        schedule = stream.schedule
        if schedule.norm != "prior":
            return torch.zeros(3, dtype=torch.float64, device=device)
        prior, cfg = schedule.prior, self.tok.config
        mean, var = (prior.mean1, prior.var1) if which == 1 else (prior.mean2, prior.var2)
        frames, channels = (self.tok.decoder.dconv1.stride, cfg.d_model) if which == 1 else \
            (cfg.mel_frames_per_token, cfg.n_mels)
        n = torch.tensor(float(schedule.prior_tokens * frames * channels), dtype=torch.float64, device=device)
        return torch.stack([n, n * mean, n * (var + mean * mean)])

    def _past(self, caches: list[torch.Tensor | None], P: int, device: torch.device, dtype: torch.dtype
              ) -> torch.Tensor:
        """One layer's cached keys or values for the batch (B, H, P, d): a stream's own tensor when
        alone, else copies padded to the longest."""
        if len(caches) == 1 and caches[0] is not None:
            return caches[0]
        shape = (self.heads, P, self.head_dim)
        out = torch.zeros(len(caches), *shape, dtype=dtype, device=device)
        for b, cache in enumerate(caches):
            if cache is not None:
                out[b, :, : cache.shape[2]] = cache[0]
        return out


class WindowTailISTFT:
    """The vocoder's inverse STFT (``agent.codec.vocoder.ISTFT``) of a window's last frames only.

    A sample of the overlap-add depends on the frames that overlap it: synthesised from frames
    ``t0..T-1``, every sample from ``t0 * hop + n_fft - hop - pad`` on is the sum of the same frame
    contributions, in the same order, divided by the same envelope, as in the whole window's
    synthesis. The streaming decode plays only the last few tokens of each window, so this skips
    most of the work (and the vocoder head's, in the graph) of every chunk.
    """

    def __init__(self, n_fft: int, hop: int) -> None:
        self.n_fft, self.hop = n_fft, hop
        self.pad = (n_fft - hop) // 2  # "same" padding, trimmed at the window's start
        self._window: dict[torch.device, torch.Tensor] = {}
        self._envelopes: dict[tuple[int, torch.device], torch.Tensor] = {}

    def first_frame(self, sample: int, frames: int) -> int:
        """The first frame to synthesise for samples from ``sample`` on, in a window of ``frames``."""
        if frames == 0:
            return 0
        return min(frames - 1, max(0, (sample + self.pad - self.n_fft + self.hop) // self.hop))

    def __call__(self, spec: torch.Tensor, t0: int, T: int) -> tuple[int, np.ndarray]:
        """spec (n_fft/2+1, T - t0) complex, frames t0..T-1 of a T-frame window ->
        (first sample, samples from there to the window's end T * hop), float32."""
        if T == 0:
            return 0, np.zeros(0, np.float32)
        device = spec.device
        if device not in self._window:
            self._window[device] = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float32, device=device)
        window = self._window[device]
        K = T - t0
        frames = torch.fft.irfft(spec[None], n=self.n_fft, dim=1) * window[None, :, None]  # (1, n_fft, K)
        ola = overlap_add(frames.transpose(1, 2), self.hop)[0]  # ((K - 1) * hop + n_fft,)
        key = (K, device)
        if key not in self._envelopes:
            self._envelopes[key] = overlap_add(window.square()[None, None, :].expand(1, K, -1), self.hop)[0]
        envelope = self._envelopes[key]
        begin = self.pad if t0 == 0 else self.n_fft - self.hop  # the first complete sample
        stop = T * self.hop + self.pad - t0 * self.hop
        audio = (ola[begin:stop] / envelope[begin:stop]).float().cpu().numpy()
        return t0 * self.hop + begin - self.pad, audio


def _pad(rows: list[torch.Tensor], length: int, tail: tuple[int, ...], dtype: torch.dtype, device: torch.device
         ) -> torch.Tensor:
    """Rows (n_b, *tail) zero-padded to (B, length, *tail)."""
    out = torch.zeros(len(rows), length, *tail, dtype=dtype, device=device)
    for b, row in enumerate(rows):
        out[b, : row.shape[0]] = row
    return out
