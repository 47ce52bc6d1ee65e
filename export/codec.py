"""The audio tokenizer's hot paths on ONNX Runtime, behind the engine's codec interface.

:class:`OnnxCodec` wraps a PyTorch ``MiMoAudioTokenizer`` (its configuration, log-mel front end
and inverse STFT) and replaces two things:

- ``encode_batch``: the encoder and the RVQ run as the ``codec_encoder`` graph (the log-mel STFT
  stays in torch: ONNX Runtime's DFT is a direct O(n^2) transform for n_fft = 960);
- the streaming decode of "cached" schedules (the server's default): each pass runs the
  ``codec_decoder_chunk`` graph for all due streams at once. The schedule logic (when a chunk is due,
  what is held back, cross-fades, 60 s segments) is ``agent.codec.streaming``'s own, so both
  backends emit the same chunk sizes at the same moments; only the pass is ours.

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
from agent.codec.config import ENCODE_SEGMENT_MEL_FRAMES, LM_CODEBOOKS
from agent.codec.tokenizer import MAX_MEL_FRAMES_PER_CALL, _group_by_budget, pad_codes_to_group
from agent.codec.transformer import LayerKV
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
        tok = self.tok
        audios = [tok.prepare(w, sample_rate) for w in wavs]
        segments = []  # (turn index, mel segment)
        for i, audio in enumerate(audios):
            if audio.size:
                mel = tok.front_end(torch.from_numpy(audio).to(tok.device))
                segments += [(i, seg) for seg in mel.split(ENCODE_SEGMENT_MEL_FRAMES)]
        per_turn: list[list[torch.Tensor]] = [[] for _ in wavs]
        for group in _group_by_budget(segments, MAX_MEL_FRAMES_PER_CALL):
            lengths = torch.tensor([seg.shape[0] for _, seg in group], device=tok.device)
            batch = nn.utils.rnn.pad_sequence([seg for _, seg in group], batch_first=True)
            T25 = (batch.shape[1] + 3) // 4  # conv2 (stride 2) then the pooling (2), both rounding up
            out = self.encoder({"mel": batch, "mel_frames": lengths},
                               {"codes": (len(group), T25, self.codebooks), "tokens": (len(group),)})
            codes, tokens = out["codes"].cpu(), out["tokens"].tolist()
            for b, (turn, _) in enumerate(group):
                per_turn[turn].append(codes[b, : tokens[b], :n_q])
        result = []
        for parts in per_turn:
            codes = torch.cat(parts) if parts else torch.zeros(0, n_q, dtype=torch.long)
            result.append(pad_codes_to_group(codes) if pad_to_group else codes)
        return result

    def encode(self, wav: np.ndarray | torch.Tensor, sample_rate: int | None = None, **kwargs: Any) -> torch.Tensor:
        return self.encode_batch([wav], sample_rate, **kwargs)[0]

    # --- decoding ---------------------------------------------------------------------------------
    def new_decode_stream(self, schedule: streaming.DecodeSchedule | None = None) -> streaming.DecodeStream:
        return self.tok.new_decode_stream(schedule)

    def decode_streams(self, items) -> list[np.ndarray]:
        """``[(stream, codes (n, 8)), ...]`` -> audio each stream can play now (as the tokenizer's)."""
        return streaming.decode_streams(self.tok, items, passes=self.passes)

    def finish_stream(self, stream: streaming.DecodeStream) -> np.ndarray:
        return streaming.finish_streams(self.tok, [stream], passes=self.passes)[0]

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
        """``streaming._cached_pass`` with the decoder and vocoder in one graph run for all jobs."""
        if not jobs:
            return []
        spt, fpt = tok.samples_per_token, tok.config.mel_frames_per_token
        device, dtype = tok.device, tok.decoder.dtype
        B = len(jobs)
        segs = [seg for _, seg, _ in jobs]
        new = [seg.codes[seg.advanced - seg.codes_offset :, : self.codebooks] for seg in segs]
        n = [int(c.shape[0]) for c in new]
        starts = [streaming._window_start(seg, s.schedule, spt) for s, seg, _ in jobs]
        empty_mel = torch.zeros(0, tok.config.n_mels, dtype=dtype, device=device)
        left = [seg.mel[w0 * fpt - seg.mel_offset :] if seg.mel is not None else empty_mel
                for seg, w0 in zip(segs, starts, strict=True)]
        past = [seg.frames50 for seg in segs]

        N = max(1, *n)  # a chunk of rows with nothing new (a finish) still runs the vocoder: one padded token
        feeds: dict[str, torch.Tensor] = {
            "codes": _pad(new, N, (self.codebooks,), torch.int64, device),
            "new_tokens": torch.tensor(n, device=device),
            "past_frames": torch.tensor(past, device=device),
            "moments1": _moments([seg.moments1 for seg in segs], device),
            "moments2": _moments([seg.moments2 for seg in segs], device),
            "frozen": torch.tensor([seg.frozen for seg in segs], device=device),
            "prev_hidden": torch.stack([seg.prev_hidden if seg.prev_hidden is not None
                                        else torch.zeros(tok.config.d_model, dtype=dtype, device=device)
                                        for seg in segs]),
            "left_mel": nn.utils.rnn.pad_sequence(left, batch_first=True),
            "left_frames": torch.tensor([m.shape[0] for m in left], device=device),
        }
        # the spectrum of the frames whose samples ``emit`` can read: from the cross-fade tail on
        window = [m.shape[0] + 4 * count for m, count in zip(left, n, strict=True)]
        first = [self.istft.first_frame(max(0, seg.covered - seg.tail.shape[0] - w0 * spt), frames)
                 for seg, w0, frames in zip(segs, starts, window, strict=True)]
        K = max(1, *(frames - t0 for frames, t0 in zip(window, first, strict=True)))
        feeds["spectrum_index"] = torch.tensor(window, device=device)[:, None] - K + torch.arange(K, device=device)
        P = max(past)
        for i in range(self.layers):
            for kind in ("k", "v"):
                name = f"past_{'key' if kind == 'k' else 'value'}_{i}"
                caches = [getattr(seg.kv[i], kind) if seg.kv is not None else None for seg in segs]
                feeds[name] = self._past(caches, P, device, dtype)
        F = tok.config.nfft // 2 + 1
        shapes = {"spectrum_real": (B, F, K), "spectrum_imag": (B, F, K), "mel": (B, 4 * N, tok.config.n_mels),
                  "moments1_out": (B, 3), "moments2_out": (B, 3), "last_hidden": (B, tok.config.d_model)}
        for i in range(self.layers):
            shapes[f"new_key_{i}"] = shapes[f"new_value_{i}"] = (B, self.heads, 2 * N, self.head_dim)
        out = self.chunk(feeds, shapes)

        # the new state of each stream that received tokens
        for b, ((stream, seg, _), count) in enumerate(zip(jobs, n, strict=True)):
            if count == 0:
                continue
            if seg.kv is None:
                none = torch.zeros(1, self.heads, 0, self.head_dim, dtype=dtype, device=device)
                seg.kv = [LayerKV(none, none) for _ in range(self.layers)]
            for i, kv in enumerate(seg.kv):
                kv.k = torch.cat([kv.k, out[f"new_key_{i}"][b : b + 1, :, : 2 * count].to(dtype)], dim=2)
                kv.v = torch.cat([kv.v, out[f"new_value_{i}"][b : b + 1, :, : 2 * count].to(dtype)], dim=2)
            seg.frames50 += 2 * count
            seg.moments1 = tuple(out["moments1_out"][b])
            seg.moments2 = tuple(out["moments2_out"][b])
            seg.prev_hidden = out["last_hidden"][b].to(dtype)
            frames = out["mel"][b, : 4 * count].to(dtype)
            seg.mel = frames if seg.mel is None else torch.cat([seg.mel, frames])
            seg.advanced = seg.received
            if stream.schedule.norm == "frozen" and seg.received >= stream.schedule.freeze_after_tokens:
                seg.frozen = True

        # the inverse STFT of each row's last frames (torch), then emission as the PyTorch pass does
        spectrum = torch.complex(out["spectrum_real"].float(), out["spectrum_imag"].float()).to(device)
        audio_out = []
        for b, ((stream, seg, final), w0) in enumerate(zip(jobs, starts, strict=True)):
            offset, audio = self.istft(spectrum[b, :, K - (window[b] - first[b]) :], first[b], window[b])
            end = streaming._emit_end(seg, stream.schedule, final, spt)
            audio_out.append(streaming.emit(seg, audio, w0 * spt + offset, end, final,
                                            stream.schedule.crossfade_samples))
            seg.mel, seg.mel_offset = seg.mel[w0 * fpt - seg.mel_offset :], w0 * fpt
            seg.codes, seg.codes_offset = seg.codes[seg.advanced - seg.codes_offset :], seg.advanced
        return audio_out

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


def _moments(values: list[tuple[torch.Tensor, ...] | None], device: torch.device) -> torch.Tensor:
    """GroupNorm moments (count, sum, sum of squares) per stream as (B, 3) fp64; zeros for none yet."""
    rows = [torch.zeros(3, dtype=torch.float64, device=device) if v is None else torch.stack(list(v)).double()
            for v in values]
    return torch.stack(rows).to(device)
