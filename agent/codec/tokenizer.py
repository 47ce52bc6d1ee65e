"""``MiMoAudioTokenizer``: 24 kHz audio <-> 25 Hz RVQ codes, offline and streaming.

The module tree and parameter names are those of the official checkpoint (``encoder.*``,
``decoder.*``, ``decoder.vocoder.*``), so loading is a name-for-name copy with shape checks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import checkpoint as ckpt
from .audio import prepare_audio
from .config import (
    DECODE_SEGMENT_TOKENS,
    ENCODE_SEGMENT_MEL_FRAMES,
    GROUP_SIZE,
    LM_CODEBOOKS,
    AudioTokenizerConfig,
    ConfigError,
)
from .config import preset as preset_config
from .decoder import AudioDecoder
from .encoder import AudioEncoder
from .mel import MelFrontEnd
from .prior import StreamingPrior, load_streaming_prior
from .streaming import DecodeSchedule, DecodeStream, decode_cache_bytes, decode_streams, finish_streams

#: Mel frames per encoder call (the official ``encode_batch`` budget), bounding memory.
MAX_MEL_FRAMES_PER_CALL = 256_000

#: Checkpoint keys the official model has but inference does not need.
TRAINING_ONLY_KEYS = (
    r"encoder\.quantizer\.vq\.layers\.\d+\._codebook\.(embed_avg|cluster_size|inited)",
    r"decoder\.vocoder\.head\.istft\.window",
)
CODEBOOK_KEYS = (r"encoder\.quantizer\.vq\.layers\.\d+\._codebook\.embed",)


class MiMoAudioTokenizer(nn.Module):
    """The MiMo-Audio tokenizer. Weights only: per-stream state lives in :class:`DecodeStream`."""

    def __init__(self, config: AudioTokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config)
        self.decoder = AudioDecoder(config)
        self.front_end = MelFrontEnd(config)
        #: calibrated GroupNorm statistics the default decode schedule starts streams from (the
        #: checkpoint's ``streaming_prior.json``; None: running statistics only)
        self.streaming_prior: StreamingPrior | None = None

    # --- properties ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv1.weight.dtype

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def samples_per_token(self) -> int:
        return self.config.samples_per_token

    def codes_digest(self) -> str:
        """sha256 of what makes the codes: the mel front end's settings and the encoder's weights
        with its RVQ codebooks, in name order, as fp32 on the CPU. Two codecs with the same digest
        give the same codes for the same audio, whatever their decoders (``train codec --train
        decoder`` keeps it)."""
        c = self.config
        digest = hashlib.sha256(repr((c.sampling_rate, c.nfft, c.window_size, c.hop_length, c.n_mels, c.fmin,
                                      c.fmax)).encode())
        for name, t in sorted(self.encoder.state_dict().items()):
            t = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous()
            digest.update(f"\n{name} {t.dtype} {tuple(t.shape)}\n".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()

    # --- encoding --------------------------------------------------------------------------------
    def prepare(self, wav: np.ndarray | torch.Tensor, sample_rate: int | None = None) -> np.ndarray:
        """Any mono or (samples, channels) float/int16 audio -> float32 mono at 24 kHz (the official filter)."""
        return prepare_audio(wav, sample_rate, self.sample_rate)

    @torch.no_grad()
    def mel(self, wav: np.ndarray | torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """Log-mel features (T_mel, n_mels) fp32 on the model's device, T_mel = 1 + N // 240."""
        audio = self.prepare(wav, sample_rate)
        return self.front_end(torch.from_numpy(audio).to(self.device))

    @torch.no_grad()
    def encode(
        self,
        wav: np.ndarray | torch.Tensor,
        sample_rate: int | None = None,
        *,
        n_q: int = LM_CODEBOOKS,
        pad_to_group: bool = True,
    ) -> torch.Tensor:
        """Exact whole-turn encode: audio -> codes LongTensor (T, n_q) on the CPU.

        As the official pipeline: mono, 24 kHz, log-mel, independent 60 s segments, RVQ, then T
        padded to a multiple of 4 by repeating the last frame (``pad_to_group``). Empty audio gives
        (0, n_q). ``sample_rate=None`` means the audio is already 24 kHz.
        """
        return self.encode_batch([wav], sample_rate, n_q=n_q, pad_to_group=pad_to_group)[0]

    @torch.no_grad()
    def encode_batch(
        self,
        wavs: Sequence[np.ndarray | torch.Tensor],
        sample_rate: int | None = None,
        *,
        n_q: int = LM_CODEBOOKS,
        pad_to_group: bool = True,
    ) -> list[torch.Tensor]:
        """Encode several turns of any lengths in batched encoder calls; each result equals
        :meth:`encode` of that turn alone (padding never reaches another sequence)."""
        if not 1 <= n_q <= self.config.num_quantizers:
            raise ValueError(f"n_q={n_q} is outside 1..{self.config.num_quantizers}")
        return self.encode_segments(wavs, sample_rate, lambda mel, lengths: self.encoder.encode(mel, lengths, n_q),
                                    n_q=n_q, pad_to_group=pad_to_group)

    def encode_segments(
        self,
        wavs: Sequence[np.ndarray | torch.Tensor],
        sample_rate: int | None,
        encode_group: Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]],
        *,
        n_q: int,
        pad_to_group: bool,
    ) -> list[torch.Tensor]:
        """The batching of :meth:`encode_batch` around any encoder: the turns' log-mels cut into 60 s
        segments, grouped under a frame budget, each group padded into one call of
        ``encode_group(mel (B, T, n_mels), lengths (B,)) -> codes (T_b, n_q) per row``, the parts
        joined per turn (the ONNX Runtime codec passes its encoder graph here)."""
        audios = [self.prepare(w, sample_rate) for w in wavs]
        segments: list[Segment] = []  # (turn index, mel segment)
        for i, audio in enumerate(audios):
            if audio.size:
                mel = self.front_end(torch.from_numpy(audio).to(self.device))
                segments += [(i, seg) for seg in mel.split(ENCODE_SEGMENT_MEL_FRAMES)]
        per_turn: list[list[torch.Tensor]] = [[] for _ in wavs]
        for group in _group_by_budget(segments, MAX_MEL_FRAMES_PER_CALL):
            lengths = torch.tensor([seg.shape[0] for _, seg in group], device=self.device)
            batch = nn.utils.rnn.pad_sequence([seg for _, seg in group], batch_first=True)
            for (turn, _), codes in zip(group, encode_group(batch, lengths), strict=True):
                per_turn[turn].append(codes)
        out = []
        for parts in per_turn:
            codes = torch.cat(parts).cpu() if parts else torch.zeros(0, n_q, dtype=torch.long)
            out.append(pad_codes_to_group(codes) if pad_to_group else codes)
        return out

    # --- decoding --------------------------------------------------------------------------------
    def check_codes(self, codes: torch.Tensor | np.ndarray, *, name: str = "codes") -> torch.Tensor:
        """Validate (T, n) integer codes, 1 <= n <= num_quantizers, each inside its codebook."""
        codes = torch.as_tensor(codes)
        if codes.dim() != 2:
            raise ValueError(f"{name} must have shape (T, n_codebooks), got {tuple(codes.shape)}")
        if codes.shape[1] < 1:
            raise ValueError(f"{name} has no codebook column: shape {tuple(codes.shape)}")
        try:
            self.encoder.quantizer.check_codes(codes)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        return codes.long()

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., n) -> the decoder's input, the sum of the selected codebook entries (fp32)."""
        return self.encoder.quantizer.decode(codes.to(self.device))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """Offline decode: codes (T, n) -> float32 waveform of T * 960 samples.

        Official semantics: independent 1500-token (60 s) segments, each decoded whole (batched
        here in one call), concatenated.
        """
        codes = self.check_codes(codes)
        if codes.shape[0] == 0:
            return np.zeros(0, np.float32)
        segments = list(codes.split(DECODE_SEGMENT_TOKENS))
        return np.concatenate([w for w in self.decode_sequences(segments)])

    @torch.no_grad()
    def decode_sequences(self, sequences: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Decode independent code sequences (T_i, n) in one batched forward; each as if alone."""
        if not sequences:
            return []
        lengths = torch.tensor([s.shape[0] for s in sequences], device=self.device)
        if bool((lengths == 0).any()):
            raise ValueError("cannot decode an empty code sequence in a batch")
        embeddings = nn.utils.rnn.pad_sequence([self.embed_codes(s) for s in sequences], batch_first=True)
        wav, wav_lengths = self.decoder(embeddings, lengths)
        wav = wav.float().cpu().numpy()
        return [wav[i, : int(n)] for i, n in enumerate(wav_lengths.tolist())]

    # --- streaming decode (see streaming.py) -----------------------------------------------------
    def decode_cache_bytes(self) -> int:
        """Bytes of a decode stream's decoder KV cache (bounded: one 60 s segment)."""
        return decode_cache_bytes(self.config, self.decoder.dtype)

    def new_decode_stream(self, schedule: DecodeSchedule | None = None) -> DecodeStream:
        """A fresh per-stream decoding state (one response); ``schedule=None``: the default (with
        :attr:`streaming_prior`, when there is one)."""
        return DecodeStream(self, schedule or DecodeSchedule())

    def decode_streams(self, items: Sequence[tuple[DecodeStream, torch.Tensor]]) -> list[np.ndarray]:
        """Feed new codes to several streams at once: ``[(stream, codes (n, q)), ...]`` -> one float32
        array per stream (empty when that stream has nothing to play yet). The chunks that fall due
        are decoded in batched forwards, one per design."""
        return decode_streams(self, list(items))

    def finish_stream(self, stream: DecodeStream) -> np.ndarray:
        """End a stream: decode and return all audio it still holds back."""
        return self.finish_streams([stream])[0]

    def finish_streams(self, streams: Sequence[DecodeStream]) -> list[np.ndarray]:
        """End several streams in batched forwards; the held-back audio of each."""
        return finish_streams(self, list(streams))


def pad_codes_to_group(codes: torch.Tensor, group: int = GROUP_SIZE) -> torch.Tensor:
    """Pad (T, n) codes to a multiple of ``group`` rows by repeating the last row (official)."""
    short = (-codes.shape[0]) % group
    if codes.shape[0] == 0 or short == 0:
        return codes
    return torch.cat([codes, codes[-1:].expand(short, -1)])


Segment = tuple[int, torch.Tensor]


def _group_by_budget(items: list[Segment], budget: int) -> list[list[Segment]]:
    """Consecutive groups of segments holding at most ``budget`` frames each (at least one segment)."""
    groups: list[list[Segment]] = []
    used = 0
    for item in items:
        n = item[1].shape[0]
        if not groups or used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += n
    return groups


# --- construction, loading, saving ---------------------------------------------------------------
def init_random_weights(tok: MiMoAudioTokenizer, seed: int = 0) -> MiMoAudioTokenizer:
    """Seeded random weights (PyTorch's default initialisation) and N(0, 1) codebooks.

    The global RNG is left untouched. The same seed gives the same weights (built on the CPU).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in tok.modules():
            if module is not tok and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        with torch.no_grad():
            for q in range(tok.config.num_quantizers):
                tok.encoder.quantizer.codebook(q).normal_(0.0, 1.0)
    return tok


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return ckpt.parse_dtype(dtype)


def load_audio_tokenizer(
    path: str | os.PathLike | None = None,
    preset: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    streaming_prior: bool = True,
) -> MiMoAudioTokenizer:
    """A tokenizer in eval mode from a checkpoint (local directory or hub id) or a preset.

    ``path=None`` builds ``preset`` (default ``tiny``) with seeded random weights. ``dtype``
    defaults to bf16 on CUDA and fp32 on the CPU; the codebooks and the mel front end stay fp32.
    A checkpoint's ``streaming_prior.json`` (:mod:`agent.codec.prior`) becomes
    :attr:`MiMoAudioTokenizer.streaming_prior`, unless ``streaming_prior=False``.
    Raises :class:`agent.checkpoint.CheckpointError` naming the file, key or shape at fault.
    """
    device = ckpt.parse_device(device)
    dtype = _resolve_dtype(dtype, device)
    if path is None:
        config = preset_config(preset or "tiny")
        tok = init_random_weights(MiMoAudioTokenizer(config), seed)
        return tok.to(device=device, dtype=dtype).eval()
    if preset is not None:
        raise ckpt.CheckpointError(f"give a checkpoint or a preset, not both ({path!r}, preset {preset!r})")
    directory = ckpt.resolve_checkpoint_dir(path)

    what = ckpt.CODEC_CHECKPOINT
    raw = ckpt.read_config(directory, what)
    ckpt.check_kind(Path(directory), raw, what)
    try:
        config = AudioTokenizerConfig.from_dict(raw)
    except ConfigError as exc:
        raise ckpt.CheckpointError(f"{Path(directory) / ckpt.CONFIG_NAME}: {exc}") from exc
    with torch.device("meta"):
        tok = MiMoAudioTokenizer(config)
    tok = tok.to(dtype=dtype).to_empty(device=device)
    state = ckpt.load_state_dict(directory, what=what)
    ckpt.load_into_module(
        tok, state, source=f"{what} {directory}", ignore_unexpected=TRAINING_ONLY_KEYS, keep_fp32=CODEBOOK_KEYS
    )
    if streaming_prior:
        tok.streaming_prior = load_streaming_prior(directory, tok)
    return tok.eval()


def official_state_dict(tok: MiMoAudioTokenizer, *, training_buffers: bool = True) -> dict[str, torch.Tensor]:
    """The state dict in the official layout: our weights, plus (``training_buffers``) the buffers the
    official model also stores (``istft.window``; per codebook ``embed_avg``, ``cluster_size``,
    ``inited``) so that the official code loads the result without missing keys."""
    state = dict(tok.state_dict())
    if training_buffers:
        state["decoder.vocoder.head.istft.window"] = torch.hann_window(tok.config.nfft, periodic=True)
        for q in range(tok.config.num_quantizers):
            prefix = f"encoder.quantizer.vq.layers.{q}._codebook."
            embed = state[prefix + "embed"]
            state[prefix + "embed_avg"] = embed.clone()
            state[prefix + "cluster_size"] = torch.zeros(embed.shape[0])
            state[prefix + "inited"] = torch.ones(1)
    return state


def save_audio_tokenizer(
    tok: MiMoAudioTokenizer,
    directory: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write ``config.json`` and safetensors in the official layout (codebooks always fp32)."""
    state = official_state_dict(tok)
    if dtype is not None:
        target = ckpt.parse_dtype(dtype)
        state = {
            k: v.to(target) if v.is_floating_point() and "_codebook" not in k else v for k, v in state.items()
        }
    return ckpt.save_checkpoint(directory, state, tok.config.to_dict(), max_shard_bytes=max_shard_bytes)
