"""Incremental encoding: codes for a user turn while it is still being spoken (approximate).

The exact encode (``MiMoAudioTokenizer.encode``) needs the whole turn: the encoder attends in both
directions over up to 60 s. This encoder instead encodes each new chunk of audio together with some
left context and a little look-ahead, and keeps only the chunk's tokens. Its codes differ from the
exact ones wherever far context matters; ``mimo-agent bench-codec`` measures how often (share of
identical codes per codebook). Its use is to start prefilling the LM before the turn ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import ENCODE_SEGMENT_MEL_FRAMES, GROUP_SIZE

if TYPE_CHECKING:
    from .tokenizer import MiMoAudioTokenizer


@dataclass(frozen=True)
class IncrementalEncodeConfig:
    """Chunking of the incremental encoder, in 25 Hz tokens (40 ms each).

    ``left_context_tokens=None`` re-encodes everything since the start of the turn each time.
    """

    chunk_tokens: int = GROUP_SIZE
    left_context_tokens: int | None = 100
    lookahead_tokens: int = 2

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be at least 1, got {self.chunk_tokens}")
        left = self.left_context_tokens
        if self.lookahead_tokens < 0 or (left is not None and left < 0):
            raise ValueError("lookahead_tokens and left_context_tokens must not be negative")


class IncrementalEncoder:
    """Per-turn state: ``push`` audio (24 kHz float32 mono) as it arrives, get the codes that became
    final; ``finish`` returns the rest, padded like the exact encode (to a multiple of 4 tokens)."""

    def __init__(self, tok: MiMoAudioTokenizer, config: IncrementalEncodeConfig | None = None, n_q: int = 8):
        self.tok = tok
        self.config = config or IncrementalEncodeConfig()
        self.n_q = n_q
        self.spt = tok.samples_per_token
        self._audio = np.zeros(0, np.float32)
        self._audio_offset = 0  # samples dropped from the front of ``_audio``
        self._emitted = 0  # tokens returned so far
        self._last: torch.Tensor | None = None
        self.finished = False

    @property
    def tokens_emitted(self) -> int:
        return self._emitted

    def push(self, audio: np.ndarray) -> torch.Tensor:
        """Add 24 kHz mono samples; return newly final codes (n, n_q), n a multiple of ``chunk_tokens``."""
        if self.finished:
            raise RuntimeError("this incremental encoder is finished")
        audio = self.tok.prepare(audio)
        self._audio = np.concatenate([self._audio, audio])
        total = self._audio_offset + self._audio.shape[0]
        cfg = self.config
        available = total // self.spt - cfg.lookahead_tokens - self._emitted  # whole tokens with look-ahead
        ready = available // cfg.chunk_tokens * cfg.chunk_tokens
        if ready <= 0:
            return torch.zeros(0, self.n_q, dtype=torch.long)
        end = self._emitted + ready
        return self._encode_until(end, (end + cfg.lookahead_tokens) * self.spt)

    def finish(self) -> torch.Tensor:
        """The remaining codes, through the end of the audio, padded to whole patches."""
        if self.finished:
            raise RuntimeError("this incremental encoder is already finished")
        self.finished = True
        total = self._audio_offset + self._audio.shape[0]
        if total == 0:
            return torch.zeros(0, self.n_q, dtype=torch.long)
        mel_frames = self.tok.front_end.num_frames(total)
        _, n_tokens = self.tok.encoder.output_lengths(torch.tensor(mel_frames))  # as the exact encode
        codes = self._encode_until(int(n_tokens), total)
        short = -self._emitted % GROUP_SIZE
        if short and self._last is not None:
            codes = torch.cat([codes, self._last.expand(short, -1)])
            self._emitted += short
        return codes

    def _encode_until(self, end_token: int, end_sample: int) -> torch.Tensor:
        """Encode the window [start - left context, end_sample) and keep tokens [emitted, end_token)."""
        cfg = self.config
        seg_tokens = ENCODE_SEGMENT_MEL_FRAMES // self.tok.config.mel_frames_per_token
        segment_start = (self._emitted // seg_tokens) * seg_tokens
        pieces = []
        while self._emitted < end_token:
            stop = min(end_token, segment_start + seg_tokens)
            left = self._emitted if cfg.left_context_tokens is None else cfg.left_context_tokens
            start = max(segment_start, self._emitted - left)
            b = min(end_sample, (segment_start + seg_tokens) * self.spt)
            codes = self._encode_window(start * self.spt, b)
            pieces.append(codes[self._emitted - start : stop - start])
            self._emitted = stop
            segment_start = (self._emitted // seg_tokens) * seg_tokens
        self._trim()
        out = torch.cat(pieces) if pieces else torch.zeros(0, self.n_q, dtype=torch.long)
        if out.shape[0]:
            self._last = out[-1:]
        return out

    def _encode_window(self, a: int, b: int) -> torch.Tensor:
        """Codes of audio samples [a, b) (absolute) encoded as one sequence.

        The mel frames are computed with the half window of real audio before ``a`` when there is
        one, so they equal the whole turn's frames except the last two (reflect-padded at ``b``).
        """
        fe = self.tok.front_end
        lead = min(a, fe.n_fft // 2)
        lead -= lead % fe.hop_length
        audio = self._audio[a - lead - self._audio_offset : b - self._audio_offset]
        mel = fe(torch.from_numpy(np.ascontiguousarray(audio)).to(self.tok.device))[lead // fe.hop_length :]
        lengths = torch.tensor([mel.shape[0]], device=mel.device)
        return self.tok.encoder.encode(mel[None], lengths, self.n_q)[0].cpu()

    def _trim(self) -> None:
        """Drop audio no future window will read."""
        if self.config.left_context_tokens is None:
            return
        # keep the left context and the half window before it (see _encode_window)
        context_start = (self._emitted - self.config.left_context_tokens) * self.spt
        keep_from = max(0, context_start - self.tok.config.nfft // 2)
        drop = keep_from - self._audio_offset
        if drop > 0:
            self._audio = self._audio[drop:]
            self._audio_offset = keep_from


def incremental_encode(
    tok: MiMoAudioTokenizer,
    wav: np.ndarray,
    config: IncrementalEncodeConfig | None = None,
    feed_samples: int = 3840,
) -> torch.Tensor:
    """Encode ``wav`` (24 kHz mono) through an :class:`IncrementalEncoder`, fed ``feed_samples`` at a time."""
    enc = IncrementalEncoder(tok, config)
    parts = [enc.push(wav[i : i + feed_samples]) for i in range(0, wav.shape[0], feed_samples)]
    parts.append(enc.finish())
    return torch.cat(parts)
