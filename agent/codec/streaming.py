"""Streaming decode: codes arrive patch by patch while the LM generates; audio leaves in chunks.

Exact equality with the offline decode is impossible by design: both up-samplers normalise with
GroupNorm statistics taken over the whole sequence, and every vocoder layer looks 10 frames ahead
(1.6 s in all). Two designs trade fidelity for latency, chosen per stream by a
:class:`DecodeSchedule`:

``window``  (what the official ``streaming_decode`` and vLLM-Omni do): each chunk re-decodes the
            whole decoder over ``left_context_tokens`` of history plus the new tokens.
``cached``  (ARCHITECTURE.md, "the better way"): the causal transformer keeps its KV cache across
            chunks, so each token goes through it once; the two GroupNorms use running statistics
            (frozen after ``freeze_after_tokens``, or starting from calibrated ``prior`` statistics:
            by default the checkpoint's own, ``streaming_prior.json``, when it ships one);
            only the vocoder, which is cheap, re-runs over a window of ``left_context_tokens`` of
            coarse mel. Given the offline statistics and enough hold-back it is exact.

Both hold back the last ``holdback_tokens`` of each chunk (they are re-synthesised next time with
more look-ahead) and cross-fade ``crossfade_samples`` at each seam. Streams are independent and
reset every 1500 tokens (60 s) as the offline decode does, so a schedule that holds everything back
(:meth:`DecodeSchedule.infinite`) reproduces the offline decode. The distance of each schedule to
the offline decode is measured by ``mimo-agent bench-codec`` (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .config import DECODE_SEGMENT_TOKENS, GROUP_SIZE, AudioTokenizerConfig
from .decoder import apply_group_norm, group_norm_moments, moments_to_stats, valid_mask
from .transformer import BoundedKV, LayerKV

Job = tuple["DecodeStream", "_Segment", bool]  # (stream, segment, final pass)

if TYPE_CHECKING:
    from .prior import StreamingPrior
    from .tokenizer import MiMoAudioTokenizer

MODES = ("window", "cached")
NORMS = ("checkpoint", "running", "frozen", "prior")


@dataclass(frozen=True)
class NormStatistics:
    """Mean and variance of the two up-samplers' outputs before their GroupNorm: what the offline
    decode normalises a whole sequence by. From :func:`norm_statistics`."""

    mean1: float
    var1: float
    mean2: float
    var2: float


@dataclass(frozen=True)
class DecodeSchedule:
    """When a stream emits audio and how much history each chunk re-decodes.

    Counts are in 25 Hz tokens (40 ms, 960 samples) or LM patches (``group_size`` tokens, 160 ms).

    - ``mode``: ``"cached"`` or ``"window"`` (module docstring).
    - ``first_chunk_patches`` / ``chunk_patches``: a chunk is decoded once this many patches have
      arrived since the previous one (N, then M).
    - ``left_context_tokens`` (L): history re-synthesised with each chunk (window: the whole
      decoder; cached: the vocoder only). None: everything since the segment start.
    - ``holdback_tokens`` (R): the newest tokens' audio is withheld and re-synthesised with the
      next chunk, when the vocoder has more look-ahead. None: hold everything until the end.
    - ``crossfade_samples``: raised-cosine cross-fade at each seam (at most one token).
    - ``norm``: cached mode's GroupNorm statistics: ``"running"`` over everything so far;
      ``"frozen"`` once ``freeze_after_tokens`` have been seen; ``"prior"``: running, starting
      from ``prior`` (calibrated :class:`NormStatistics`) weighted as ``prior_tokens`` tokens;
      ``"checkpoint"`` (the default): ``"prior"`` with the statistics and weight the tokenizer's
      checkpoint ships (:class:`agent.codec.prior.StreamingPrior`), ``"running"`` when it ships
      none. A stream resolves it when it starts (:meth:`resolve`); ``"running"`` turns the
      checkpoint's prior off.
    - ``refresh_from``, ``refresh_until``: cached mode re-runs the decoder over the segment's
      history with the current statistics once it holds ``refresh_from`` tokens, then at each
      doubling up to ``refresh_until`` (8, 16, ..., 256): the early chunks were normalised with
      few frames' statistics. At most doubles the decoder's work; None: never.

    The default (cached with refresh, N = M = 1 patch, L = 50, R = 2, 10 ms cross-fade, the
    checkpoint's prior) was chosen by ``mimo-agent bench-codec``: first audio after one patch, and
    the closest to the offline decode of the schedules with that latency (BENCHMARKS.md).
    """

    mode: str = "cached"
    first_chunk_patches: int = 1
    chunk_patches: int = 1
    left_context_tokens: int | None = 50
    holdback_tokens: int | None = 2
    crossfade_samples: int = 240
    norm: str = "checkpoint"
    freeze_after_tokens: int = 25
    prior: NormStatistics | None = None
    prior_tokens: int = 25
    refresh_from: int | None = 8
    refresh_until: int = 256
    group_size: int = GROUP_SIZE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"schedule mode {self.mode!r} is not one of {MODES}")
        if self.norm not in NORMS:
            raise ValueError(f"schedule norm {self.norm!r} is not one of {NORMS}")
        if (self.norm == "prior") != (self.prior is not None):
            raise ValueError("schedule norm 'prior' and prior statistics go together (give both or neither)")
        counts = ("first_chunk_patches", "chunk_patches", "group_size", "freeze_after_tokens", "prior_tokens")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"schedule {name} must be at least 1, got {getattr(self, name)}")
        for name in ("left_context_tokens", "holdback_tokens", "crossfade_samples", "refresh_from"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"schedule {name} must not be negative, got {value}")

    @classmethod
    def infinite(cls) -> DecodeSchedule:
        """All left context, everything held back: the offline decode, delivered at the end."""
        return cls(mode="window", left_context_tokens=None, holdback_tokens=None, crossfade_samples=0)

    @classmethod
    def official(cls) -> DecodeSchedule:
        """The official ``streaming_decode`` defaults: 250 tokens of history, 40 held back, called
        once per patch, no cross-fade (it emits nothing before 41 tokens)."""
        return cls(mode="window", first_chunk_patches=11, chunk_patches=1, left_context_tokens=250,
                   holdback_tokens=40, crossfade_samples=0)

    def resolve(self, prior: StreamingPrior | None) -> DecodeSchedule:
        """The schedule a stream runs: norm ``"checkpoint"`` made ``"prior"`` with the checkpoint's
        calibrated ``prior`` (its statistics and weight), or ``"running"`` when there is none."""
        if self.norm != "checkpoint":
            return self
        if prior is None:
            return replace(self, norm="running")
        return replace(self, norm="prior", prior=prior.statistics, prior_tokens=prior.tokens)

    def first_audio_tokens(self, samples_per_token: int = 960) -> int | None:
        """Tokens that must have arrived before the first audio leaves (None: only at the end)."""
        if self.holdback_tokens is None:
            return None
        tokens = self.first_chunk_patches * self.group_size
        while (tokens - self.holdback_tokens) * samples_per_token - self.crossfade_samples <= 0:
            tokens += self.chunk_patches * self.group_size
        return tokens

    def describe(self) -> str:
        """A one-line summary (``p``: patches, ``t``: tokens, cross-fade in samples)."""
        left = "all" if self.left_context_tokens is None else self.left_context_tokens
        hold = "all" if self.holdback_tokens is None else self.holdback_tokens
        extra = f", norm {self.norm}" + {"frozen": f"@{self.freeze_after_tokens}",
                                          "prior": f" x{self.prior_tokens}t"}.get(self.norm, "")
        if self.refresh_from:
            extra += f", refresh {self.refresh_from}..{self.refresh_until}t"
        return (f"{self.mode}: first {self.first_chunk_patches}p, then {self.chunk_patches}p, "
                f"left {left}t, hold {hold}t, xfade {self.crossfade_samples}"
                + (extra if self.mode == "cached" else ""))


@dataclass
class _Segment:
    """Decoding state of one 1500-token segment of a stream (positions are segment-relative)."""

    codes: torch.Tensor  # (n, q) codes kept, the first being token ``codes_offset``
    codes_offset: int = 0
    received: int = 0  # tokens received
    covered: int = 0  # samples synthesised for good: emitted, plus the cross-fade tail
    tail: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    since_chunk: int = 0  # tokens received since the last chunk
    chunks: int = 0
    # cached mode
    advanced: int = 0  # tokens run through the decoder transformer
    kv: list[LayerKV] | None = None  # views of kv_store, one per layer (None: empty, to be set up)
    kv_store: torch.Tensor | None = None  # (layers, 2, 1, H, capacity, D): the stream's, while this segment runs
    frames50: int = 0  # 50 Hz frames in the KV cache
    moments1: tuple[torch.Tensor, ...] | None = None  # running GroupNorm moments, dconv1
    moments2: tuple[torch.Tensor, ...] | None = None  # and dconv2
    frozen: bool = False
    prev_hidden: torch.Tensor | None = None  # last 50 Hz transformer output, for dconv2's overlap
    mel: torch.Tensor | None = None  # coarse mel frames kept, the first being frame ``mel_offset``
    mel_offset: int = 0
    next_refresh: int | None = None  # token count at which the history is re-normalised next


class DecodeStream:
    """Per-stream decoding state (one response's audio). Create with
    ``MiMoAudioTokenizer.new_decode_stream``; feed with ``decode_streams``; end with ``finish_stream``."""

    def __init__(self, tok: MiMoAudioTokenizer, schedule: DecodeSchedule):
        if schedule.crossfade_samples > tok.samples_per_token:
            raise ValueError(
                f"crossfade_samples={schedule.crossfade_samples} exceeds one token ({tok.samples_per_token})"
            )
        #: what this stream runs: ``schedule`` with the tokenizer's calibrated prior resolved
        self.schedule = schedule.resolve(tok.streaming_prior)
        #: tokens per independent segment; the decoder's KV cache holds at most one segment
        self.segment_tokens = DECODE_SEGMENT_TOKENS
        self.samples_per_token = tok.samples_per_token
        self.device = tok.device
        self.n_codebooks: int | None = None
        #: the decoder's KV storage, one segment's worth, handed from each segment to the next
        self.kv_store: torch.Tensor | None = None
        self._kv_owner: _Segment | None = None
        self.tokens_received = 0
        self.samples_emitted = 0
        self.finished = False
        self.segment = self._new_segment(0)

    def _new_segment(self, n_codebooks: int) -> _Segment:
        return _Segment(codes=torch.zeros(0, n_codebooks, dtype=torch.long, device=self.device))

    def _append(self, codes: torch.Tensor) -> list[_Segment]:
        """Add codes (n, q); return the segments they complete (which must now be finished)."""
        if self.finished:
            raise RuntimeError("this decode stream is finished; start a new one for the next response")
        if self.n_codebooks is None:
            self.n_codebooks = codes.shape[1]
            self.segment.codes = self.segment.codes.reshape(0, self.n_codebooks)
        elif codes.shape[1] != self.n_codebooks:
            raise ValueError(
                f"this stream decodes {self.n_codebooks} codebooks; these codes have {codes.shape[1]}"
            )
        closed = []
        codes = codes.to(self.device)
        while codes.shape[0]:
            seg = self.segment
            take = min(codes.shape[0], self.segment_tokens - seg.received)
            seg.codes = torch.cat([seg.codes, codes[:take]])
            seg.received += take
            seg.since_chunk += take
            self.tokens_received += take
            codes = codes[take:]
            if seg.received == self.segment_tokens:
                closed.append(seg)
                self.segment = self._new_segment(self.n_codebooks)
        return closed

    def __repr__(self) -> str:
        return (f"DecodeStream({self.schedule.describe()}; received {self.tokens_received} tokens, "
                f"emitted {self.samples_emitted} samples{', finished' if self.finished else ''})")


# --- emission ------------------------------------------------------------------------------------
def crossfade(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Raised-cosine cross-fade from ``old`` to ``new`` (same length); equal inputs pass unchanged."""
    n = old.shape[0]
    if n == 0:
        return new
    ramp = np.sin(0.5 * np.pi * (np.arange(n, dtype=np.float64) + 0.5) / n) ** 2
    return (old * (1.0 - ramp) + new * ramp).astype(np.float32)


def emit(seg: _Segment, audio: np.ndarray, start: int, end: int, final: bool, crossfade_samples: int):
    """Audio to play from a pass that synthesised ``audio`` = samples [start, start + len) of the segment.

    Plays everything up to ``end`` (all of ``audio`` when ``final``), except the last
    ``crossfade_samples`` which become the new tail, to be cross-faded with the next pass. The
    previous tail is cross-faded with this pass's version of the same samples where it has one.
    """
    if not final and end - crossfade_samples < seg.covered:
        return np.zeros(0, np.float32)  # nothing new to play yet
    out = []
    tail = seg.tail
    overlap = max(0, min(tail.shape[0], seg.covered - start))
    if overlap < tail.shape[0]:
        out.append(tail[: tail.shape[0] - overlap])
    if overlap:
        again = audio[seg.covered - overlap - start : seg.covered - start]  # this pass's version of the tail
        out.append(crossfade(tail[tail.shape[0] - overlap :], again))
    cut = start + audio.shape[0] if final else end - crossfade_samples
    out.append(audio[seg.covered - start : cut - start])
    seg.tail = np.zeros(0, np.float32) if final else audio[cut - start : end - start].copy()
    seg.covered = cut if final else end
    return np.concatenate(out).astype(np.float32, copy=False)


# --- passes ----------------------------------------------------------------------------------------
def _window_start(seg: _Segment, schedule: DecodeSchedule, samples_per_token: int) -> int:
    """First token a pass re-decodes: ``left_context_tokens`` before the first token not yet covered."""
    if schedule.left_context_tokens is None:
        return 0
    first_open = (seg.covered - seg.tail.shape[0]) // samples_per_token
    return max(0, first_open - schedule.left_context_tokens)


def _emit_end(seg: _Segment, schedule: DecodeSchedule, final: bool, samples_per_token: int) -> int:
    if final or schedule.holdback_tokens is None:
        return seg.received * samples_per_token
    return max(0, seg.received - schedule.holdback_tokens) * samples_per_token


def _window_pass(tok: MiMoAudioTokenizer, jobs: list[Job]) -> list[np.ndarray]:
    """Re-decode [window start, received) of each segment with the whole decoder (batched)."""
    spt = tok.samples_per_token
    starts = [_window_start(seg, s.schedule, spt) for s, seg, _ in jobs]
    windows = [seg.codes[w0 - seg.codes_offset :] for (_, seg, _), w0 in zip(jobs, starts, strict=True)]
    audios = tok.decode_sequences(windows)
    out = []
    for (stream, seg, final), w0, audio in zip(jobs, starts, audios, strict=True):
        end = _emit_end(seg, stream.schedule, final, spt)
        out.append(emit(seg, audio, w0 * spt, end, final, stream.schedule.crossfade_samples))
        # later windows start no earlier than this one
        seg.codes, seg.codes_offset = seg.codes[w0 - seg.codes_offset :], w0
    return out


def _advance_decoder(tok: MiMoAudioTokenizer, jobs: list[Job], rebuild: bool = False) -> None:
    """Run the new tokens of each segment through dconv1, the cached transformer and dconv2.

    ``rebuild``: the segments were reset to re-run their whole history; their dconv1 statistics
    already count it and are not updated again (dconv2's are recomputed from the new frames).
    """
    dec = tok.decoder
    todo = [(s, seg) for s, seg, _ in jobs if seg.received > seg.advanced]
    if not todo:
        return
    new = [seg.codes[seg.advanced - seg.codes_offset :] for _, seg in todo]
    n = torch.tensor([c.shape[0] for c in new], device=tok.device)
    emb = nn.utils.rnn.pad_sequence([tok.embed_codes(c) for c in new], batch_first=True).to(dec.dtype)

    # dconv1 (kernel = stride: chunks do not overlap), GroupNorm with running statistics
    y, len50 = dec.dconv1.upsample(emb, n)  # (B, 2 n_max, d), no trim
    x = _normalise(y, len50, todo, "moments1", dec.dconv1.norm, dec.dconv1.stride, update=not rebuild)

    # the causal transformer, continuing each segment's KV cache (appended in place)
    caches, past = _gather_kv(tok, todo, len50)
    h = dec.transform(x, len50, caches, past)
    for (_, seg), n in zip(todo, len50.tolist(), strict=True):
        seg.frames50 += n

    # dconv2 (kernel 3, stride 2): prepend each segment's previous frame, keep the complete frames
    prev = torch.stack([seg.prev_hidden if seg.prev_hidden is not None else h.new_zeros(h.shape[-1])
                        for _, seg in todo])
    y2, _ = dec.dconv2.upsample(torch.cat([prev[:, None], h], dim=1), len50 + 1)
    s = dec.dconv2.stride
    len100 = len50 * s
    y2 = y2[:, s : s + int(len100.max())]  # frames of the new 50 Hz inputs only, (B, 4 n_max, n_mels)
    fpt = tok.config.mel_frames_per_token
    mel = _normalise(y2, len100, todo, "moments2", dec.dconv2.norm, fpt, update=True)

    for b, (stream, seg) in enumerate(todo):
        seg.prev_hidden = h[b, int(len50[b]) - 1]
        frames = mel[b, : int(len100[b])]
        seg.mel = frames if seg.mel is None else torch.cat([seg.mel, frames])
        seg.advanced = seg.received
        if stream.schedule.norm == "frozen" and seg.received >= stream.schedule.freeze_after_tokens:
            seg.frozen = True


def _refresh(tok: MiMoAudioTokenizer, jobs: list[Job], advance: Callable[..., None] | None = None) -> list[Job]:
    """Re-run the decoder over the history of the segments that reached their refresh point, with
    the statistics of everything received so far (the early chunks saw only a few frames' worth).
    ``advance`` runs the decoder (default :func:`_advance_decoder`; another backend's pass gives
    its own). Returns the jobs refreshed."""
    due = []
    for stream, seg, final in jobs:
        start = stream.schedule.refresh_from
        if not start or final:
            continue
        if seg.next_refresh is None:
            seg.next_refresh = start
        if seg.next_refresh <= min(seg.received, stream.schedule.refresh_until):
            while seg.next_refresh <= seg.received:
                seg.next_refresh *= 2
            seg.kv, seg.frames50, seg.prev_hidden, seg.mel, seg.mel_offset = None, 0, None, None, 0
            seg.moments2 = None if not seg.frozen else seg.moments2
            seg.advanced = 0
            due.append((stream, seg, final))
    if due:
        (advance or _advance_decoder)(tok, due, rebuild=True)
    return due


def _normalise(
    y: torch.Tensor,
    lengths: torch.Tensor,
    todo,
    which: str,
    norm: nn.GroupNorm,
    frames_per_token: int,
    update: bool,
) -> torch.Tensor:
    """GroupNorm y (B, T, C) with each segment's running moments, first updated with y (if
    ``update`` and not frozen)."""
    count, total, squares = group_norm_moments(y, lengths)
    C = y.shape[-1]
    segs = [seg for _, seg in todo]
    for b, (stream, seg) in enumerate(todo):
        current = getattr(seg, which)
        if current is None and stream.schedule.norm == "prior":
            # the prior enters as pseudo-moments worth ``prior_tokens`` tokens of frames
            prior = stream.schedule.prior
            mean, var = (prior.mean1, prior.var1) if which == "moments1" else (prior.mean2, prior.var2)
            n = torch.tensor(float(stream.schedule.prior_tokens * frames_per_token * C), dtype=torch.float64,
                             device=y.device)
            current = (n, n * mean, n * (var + mean * mean))
            setattr(seg, which, current)
        if current is None:
            setattr(seg, which, (count[b], total[b], squares[b]))
        elif update and not seg.frozen:
            setattr(seg, which, (current[0] + count[b], current[1] + total[b], current[2] + squares[b]))
    stats = [moments_to_stats(*getattr(seg, which)) for seg in segs]
    mean = torch.stack([m for m, _ in stats])
    var = torch.stack([v for _, v in stats])
    out = apply_group_norm(y, mean, var, norm)
    return out.masked_fill(~valid_mask(lengths, y.shape[1])[..., None], 0.0)


def decode_cache_bytes(config: AudioTokenizerConfig, dtype: torch.dtype,
                       segment_tokens: int = DECODE_SEGMENT_TOKENS) -> int:
    """Bytes of the cached-mode decoder's KV cache per stream: keys and values of every decoder
    layer for one segment's frames, all the causal decoder can attend to (its window is the whole
    segment unless ``decoder_attn_window_size`` bounds it). 469 MiB for the shipped config in bf16."""
    frames = segment_tokens * config.avg_pooler  # 50 Hz frames (dconv1 doubles the 25 Hz tokens)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return config.decoder_layers * 2 * frames * config.d_model * itemsize


def segment_kv(tok: MiMoAudioTokenizer, stream: DecodeStream, seg: _Segment) -> list[LayerKV]:
    """The segment's per-layer KV caches, in the stream's storage: preallocated once for a whole
    segment (what the decoder attends to), so a chunk appends in place and a stream's memory is
    bounded from its first chunk. A refresh (``seg.kv = None``) empties them; a finished segment
    hands the storage to the next (one that starts while another is still unfinished, when one
    call brings more than a segment of codes, gets its own)."""
    if seg.kv is None:
        if seg.kv_store is None:
            if stream._kv_owner is not None and stream._kv_owner is not seg:
                seg.kv_store = _allocate_kv(tok, stream)
            else:
                if stream.kv_store is None:
                    stream.kv_store = _allocate_kv(tok, stream)
                seg.kv_store, stream._kv_owner = stream.kv_store, seg
        seg.kv = [BoundedKV(layer[0], layer[1]) for layer in seg.kv_store]
    return seg.kv


def _allocate_kv(tok: MiMoAudioTokenizer, stream: DecodeStream) -> torch.Tensor:
    cfg = tok.config
    heads = cfg.decoder_attention_heads
    frames = stream.segment_tokens * cfg.avg_pooler
    return torch.empty(cfg.decoder_layers, 2, 1, heads, frames, cfg.d_model // heads,
                       dtype=tok.decoder.dtype, device=tok.device)


def _release_kv(stream: DecodeStream, seg: _Segment) -> None:
    """A finished segment gives its KV storage back to the stream (or drops its own)."""
    seg.kv = seg.kv_store = None
    if stream._kv_owner is seg:
        stream._kv_owner = None


class _BatchKV(LayerKV):
    """One layer's caches of several segments, as the padded batch attention needs them:
    [row b's cache padded to P | the new frames]. Built when the layer appends its new frames,
    which also go to each segment's own cache, and handed out once (``k`` then ``v``), so only one
    layer's padded copy exists at a time."""

    def __init__(self, own: list[LayerKV], past: list[int], new: list[int]) -> None:
        self.own, self.past, self.new = own, past, new
        self.P = max(past)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        return self.P

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        pad = [(nn.functional.pad(o.k, (0, 0, 0, self.P - o.k.shape[2])),
                nn.functional.pad(o.v, (0, 0, 0, self.P - o.v.shape[2]))) for o in self.own]
        self._k = torch.cat([torch.cat([pk for pk, _ in pad]), k], dim=2)
        self._v = torch.cat([torch.cat([pv for _, pv in pad]), v], dim=2)
        for b, (own, n) in enumerate(zip(self.own, self.new, strict=True)):
            own.append(k[b : b + 1, :, :n], v[b : b + 1, :, :n])

    @property
    def k(self) -> torch.Tensor:  # type: ignore[override]
        out, self._k = self._k, None
        return out

    @property
    def v(self) -> torch.Tensor:  # type: ignore[override]
        out, self._v = self._v, None
        return out


def _gather_kv(tok: MiMoAudioTokenizer, todo: list[tuple[DecodeStream, _Segment]],
               new: torch.Tensor) -> tuple[list[LayerKV], torch.Tensor]:
    """Per-layer caches for the batch: a segment's own when alone, else :class:`_BatchKV` views.
    ``new``: the 50 Hz frames each segment appends in this pass."""
    segs = [seg for _, seg in todo]
    own = [segment_kv(tok, stream, seg) for stream, seg in todo]
    past = torch.tensor([seg.frames50 for seg in segs], device=tok.device)
    if len(segs) == 1:
        return own[0], past
    counts = [seg.frames50 for seg in segs]
    return [_BatchKV([kv[layer] for kv in own], counts, new.tolist()) for layer in range(len(own[0]))], past


def _cached_pass(tok: MiMoAudioTokenizer, jobs: list[Job]) -> list[np.ndarray]:
    """Advance the cached decoder, then re-run the vocoder over each segment's window (batched)."""
    _advance_decoder(tok, jobs)
    _refresh(tok, jobs)
    spt, fpt = tok.samples_per_token, tok.config.mel_frames_per_token
    starts = [_window_start(seg, s.schedule, spt) for s, seg, _ in jobs]
    mels = [seg.mel[w0 * fpt - seg.mel_offset : seg.received * fpt - seg.mel_offset]
            for (_, seg, _), w0 in zip(jobs, starts, strict=True)]
    lengths = torch.tensor([m.shape[0] for m in mels], device=tok.device)
    wav = tok.decoder.vocoder(nn.utils.rnn.pad_sequence(mels, batch_first=True), lengths)
    wav = wav.float().cpu().numpy()
    out = []
    for b, ((stream, seg, final), w0) in enumerate(zip(jobs, starts, strict=True)):
        audio = wav[b, : int(lengths[b]) * tok.config.hop_length]
        end = _emit_end(seg, stream.schedule, final, spt)
        out.append(emit(seg, audio, w0 * spt, end, final, stream.schedule.crossfade_samples))
        seg.mel, seg.mel_offset = seg.mel[w0 * fpt - seg.mel_offset :], w0 * fpt
        if not stream.schedule.refresh_from:  # a refresh re-reads the whole segment's codes
            seg.codes, seg.codes_offset = seg.codes[seg.advanced - seg.codes_offset :], seg.advanced
    return out


#: a pass decodes a batch of jobs of one mode: (tokenizer, jobs) -> audio to play per job
Pass = Callable[["MiMoAudioTokenizer", list[Job]], list[np.ndarray]]
#: the PyTorch pass of each mode; ``decode_streams(..., passes=...)`` may replace some (ONNX Runtime)
PASSES: dict[str, Pass] = {"window": _window_pass, "cached": _cached_pass}


def _run(tok: MiMoAudioTokenizer, jobs: list[Job], passes: Mapping[str, Pass] | None = None) -> list[np.ndarray]:
    """Run passes, one batched call per mode; results in the order of ``jobs``."""
    results: list[np.ndarray | None] = [None] * len(jobs)
    for mode, run in {**PASSES, **(passes or {})}.items():
        idx = [i for i, (s, seg, _) in enumerate(jobs) if s.schedule.mode == mode and seg.received > 0]
        if idx:
            for i, audio in zip(idx, run(tok, [jobs[i] for i in idx]), strict=True):
                results[i] = audio
    for i, (stream, seg, final) in enumerate(jobs):
        if results[i] is None:
            results[i] = np.zeros(0, np.float32)
        seg.since_chunk = 0
        seg.chunks += 1
        if final:
            _release_kv(stream, seg)
    return results  # type: ignore[return-value]


def _due(stream: DecodeStream, seg: _Segment) -> bool:
    sched = stream.schedule
    if sched.holdback_tokens is None:
        return False
    need = (sched.first_chunk_patches if seg.chunks == 0 else sched.chunk_patches) * sched.group_size
    end = _emit_end(seg, sched, False, stream.samples_per_token)
    return seg.since_chunk >= need and end > seg.covered


@torch.no_grad()
def decode_streams(tok: MiMoAudioTokenizer, items, *, passes: Mapping[str, Pass] | None = None) -> list[np.ndarray]:
    """``[(stream, codes (n, q)), ...]`` -> the audio each stream can play now (float32, maybe empty).

    Segments completed by these codes are finished, then every stream whose next chunk is due is
    advanced; all the work of one kind is done in one batched forward. ``passes`` replaces the
    PyTorch pass of some modes (:data:`PASSES`) while the schedule logic stays here.
    """
    streams = [s for s, _ in items]
    if len({id(s) for s in streams}) != len(streams):
        raise ValueError("a stream appears twice in one decode_streams call; concatenate its codes")
    closed: list[tuple[int, _Segment]] = []
    for i, (stream, codes) in enumerate(items):
        if not isinstance(stream, DecodeStream):
            raise TypeError(f"item {i}: expected a DecodeStream, got {type(stream).__name__}")
        codes = tok.check_codes(codes, name=f"codes of stream {i}")
        closed += [(i, seg) for seg in stream._append(codes)]
    pieces: list[list[np.ndarray]] = [[] for _ in items]
    if closed:
        audios = _run(tok, [(items[i][0], seg, True) for i, seg in closed], passes)
        for (i, _), audio in zip(closed, audios, strict=True):
            pieces[i].append(audio)
    due = [i for i, s in enumerate(streams) if _due(s, s.segment)]
    if due:
        audios = _run(tok, [(streams[i], streams[i].segment, False) for i in due], passes)
        for i, audio in zip(due, audios, strict=True):
            pieces[i].append(audio)
    out = []
    for stream, parts in zip(streams, pieces, strict=True):
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        stream.samples_emitted += audio.shape[0]
        out.append(audio)
    return out


@torch.no_grad()
def finish_streams(
    tok: MiMoAudioTokenizer, streams: list[DecodeStream], *, passes: Mapping[str, Pass] | None = None
) -> list[np.ndarray]:
    """Decode and return everything the streams still hold; they cannot be fed afterwards."""
    if len({id(s) for s in streams}) != len(streams):
        raise ValueError("a stream appears twice in one finish_streams call")
    for stream in streams:
        if stream.finished:
            raise RuntimeError("this decode stream is already finished")
    audios = _run(tok, [(s, s.segment, True) for s in streams], passes)
    for stream, audio in zip(streams, audios, strict=True):
        stream.samples_emitted += audio.shape[0]
        stream.finished = True
        stream.segment = stream._new_segment(stream.n_codebooks or 0)
        stream.kv_store = None  # the memory goes as soon as the stream ends
        if stream.samples_emitted != stream.tokens_received * stream.samples_per_token:  # an invariant
            raise RuntimeError(
                f"internal error: stream emitted {stream.samples_emitted} samples for "
                f"{stream.tokens_received} tokens"
            )
    return audios


@torch.no_grad()
def norm_statistics(tok: MiMoAudioTokenizer, sequences: list[torch.Tensor]) -> NormStatistics:
    """The GroupNorm statistics of the offline decode, pooled over code sequences (T_i, q).

    Of one sequence: exactly what the offline decode normalises it by (a test oracle). Of a few
    typical utterances: a calibrated ``prior`` for :class:`DecodeSchedule`.
    """
    dec = tok.decoder
    pooled1, pooled2 = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    for codes in sequences:
        lengths = torch.tensor([codes.shape[0]], device=tok.device)
        emb = tok.embed_codes(codes)[None].to(dec.dtype)
        y1, full1 = dec.dconv1.upsample(emb, lengths)
        x, len50 = dec.dconv1(emb, lengths)
        y2, full2 = dec.dconv2.upsample(dec.transform(x, len50), len50)
        for pooled, (y, full) in ((pooled1, (y1, full1)), (pooled2, (y2, full2))):
            for i, m in enumerate(group_norm_moments(y, full)):
                pooled[i] += float(m[0])
    mean1, var1 = (float(v) for v in moments_to_stats(*map(torch.tensor, pooled1)))
    mean2, var2 = (float(v) for v in moments_to_stats(*map(torch.tensor, pooled2)))
    return NormStatistics(mean1, var1, mean2, var2)


def stream_decode(
    tok: MiMoAudioTokenizer, codes: torch.Tensor, schedule: DecodeSchedule, feed_tokens: int | None = None
) -> tuple[np.ndarray, list[int]]:
    """Decode ``codes`` (T, q) through one stream, fed ``feed_tokens`` at a time (default: one patch).

    Returns the concatenated audio and, for each fed piece, how many samples came out: what the
    benchmark and tests use to compare a schedule with the offline decode.
    """
    feed = feed_tokens or schedule.group_size
    stream = tok.new_decode_stream(schedule)
    pieces, sizes = [], []
    for i in range(0, codes.shape[0], feed):
        (audio,) = tok.decode_streams([(stream, codes[i : i + feed])])
        pieces.append(audio)
        sizes.append(audio.shape[0])
    tail = tok.finish_stream(stream)
    pieces.append(tail)
    sizes.append(tail.shape[0])
    return np.concatenate(pieces), sizes


def first_audio_latency_ms(schedule: DecodeSchedule, token_rate: float = 25.0) -> float:
    """Generated content (ms) needed before the first audio: the schedule's built-in latency."""
    tokens = schedule.first_audio_tokens()
    return math.inf if tokens is None else 1000.0 * tokens / token_rate
