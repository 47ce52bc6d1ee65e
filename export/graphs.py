"""The exported computations, as modules whose ``forward`` is a pure function of tensors.

Each module wraps the live model (no weight copies) and composes its parts the way the PyTorch
path does, with the session state as explicit inputs and outputs, so ``torch.onnx.export`` sees
one fixed graph with symbolic batch and length axes:

``PatchEncoder``      codes (N, 4, 8) -> backbone input embedding of a speech patch (N, hidden):
                      what ``embed_patches`` computes for a patch whose text id is ``<|empty|>``.
``BackboneStep``      one backbone decode position for B sessions: the patch embeddings, each
                      row's position and history in; the hidden state and the new position's
                      keys and values out (``MiMoAudioLM.decode_step``; the slotted cache stays
                      on the host, which gathers the histories and writes the new entries).
``PatchDecoderStep``  one position of the 11-step patch decoder, its KV cache in and out
                      (``agent.lm.patch_decoder.local_step``).
``PatchDecoder``      the whole patch: 11 steps, the 8 heads, the delay pattern and sampling, with
                      the rows' uniform noise and sampling settings as inputs, so the codes are
                      exactly ``decode_patch``'s for the same generators
                      (``agent.lm.patch_decoder.decode_patch``).
``CodecEncoder``      log-mel (B, T, n_mels) -> RVQ codes (``AudioEncoder.encode``).
``CodecDecoderChunk`` a pass of the "cached" streaming decode (``agent.codec.streaming``): codes,
                      the 50 Hz transformer's KV cache, the GroupNorm running moments, the
                      previous frame and the vocoder's mel left context in; the new state and the
                      vocoder head's spectrum of the window's played frames out.

What stays on the host, and why: sampling noise (drawn from the sessions' generators, so seeded
results do not depend on the backend); the log-mel STFT and the vocoder's inverse STFT (ONNX
Runtime's DFT kernel is a direct O(n^2) transform for n_fft = 960: 60x slower than torch's FFT);
the codec's per-stream bookkeeping (schedule, cross-fades).

Host-side branches of the PyTorch code become graph inputs or dense masks: ``all_greedy`` and
``any_filter`` are boolean inputs of :func:`agent.lm.sampling.sample_tokens`, which turns them into
``torch.cond`` over its two code paths; the codec's attention uses dense masks where PyTorch picks
"no mask" or a blockwise sliding window from the lengths (the same keys are visible either way).
Every module here is checked against the PyTorch path by :mod:`export.exporter` right after export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agent.codec.decoder import apply_group_norm, group_norm_moments, moments_to_stats, valid_mask
from agent.codec.transformer import AttentionMask, LayerKV, rope_cos_sin
from agent.lm.patch_decoder import StepTables, local_step, run_patch
from agent.lm.sampling import sample_tokens
from agent.lm.transformer import attend


def _warm_rope_tables(*stacks: nn.Module) -> None:
    """Build the RoPE tables eagerly: tracing must read them as constants, never create (and
    cache) them under the exporter's fake tensors."""
    for stack in stacks:
        stack.rope.get(torch.device("cpu"))


# ----------------------------------------------------------------------------------- language model
class PatchEncoder(nn.Module):
    """codes (N, group, channels) int64 -> (N, hidden): the speech half of ``embed_patches``.

    For a speech patch ``embed_patches`` multiplies by ``is_speech`` = 1 and adds a zeroed text
    embedding, both exact no-ops, so this is its result for such a patch bit for bit.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        _warm_rope_tables(lm.input_local_transformer)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        lm, cfg = self.lm, self.lm.config
        N, G, _ = codes.shape
        frames = None
        for c, (table, empty) in enumerate(zip(lm.speech_embeddings, cfg.speech_empty_ids, strict=True)):
            ids = codes[..., c]  # (N, G)
            emb = table(ids).masked_fill((ids == empty).unsqueeze(-1), 0.0)  # (N, G, D)
            frames = emb if frames is None else frames + emb
        assert frames is not None
        encoded = lm.input_local_transformer(frames, causal=not cfg.input_full_attention)  # (N, G, D)
        return lm.speech_group_downcast(encoded.reshape(N, G * encoded.shape[-1]))  # (N, hidden)


class BackboneStep(nn.Module):
    """emb (B, 1, hidden), pos (B,) int64, past_k/past_v (layers, B, kv_heads, span, head_dim) ->
    (hidden (B, hidden), new_k/new_v (layers, B, kv_heads, head_dim)).

    Row b sits at position ``pos[b]``; its history is the first ``pos[b]`` entries of its past
    (rows of different lengths share one span, the rest masked), and it attends to that history
    and to its own new key, as ``decode_step`` does with the cache's slot prefix.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        _warm_rope_tables(lm.model)

    def forward(
        self, emb: torch.Tensor, pos: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stack = self.lm.model
        B, S = emb.shape[0], past_k.shape[3]
        cos, sin = stack.rope.at(pos.view(B, 1), emb.dtype)  # (B, 1, d)
        past = torch.arange(S, device=emb.device) < pos.view(B, 1)  # (B, S)
        mask = torch.cat([past, torch.ones_like(past[:, :1])], dim=1).view(B, 1, 1, S + 1)
        new_k, new_v = [], []

        def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            new_k.append(k[:, :, 0])  # k, v (B, Hkv, 1, d)
            new_v.append(v[:, :, 0])
            keys, values = torch.cat([past_k[i], k], dim=2), torch.cat([past_v[i], v], dim=2)
            return attend(q, keys, values, mask)

        h = stack.run(emb, cos, sin, attention)[:, -1]
        return h, torch.stack(new_k), torch.stack(new_v)


class PatchDecoderStep(nn.Module):
    """One patch-decoder position: x (B, D), step () int64, caches (layers, B, H, steps, d) ->
    (hidden (B, D), caches with position ``step`` written): ``local_step`` on copies of the caches."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        _warm_step_tables(lm)

    def forward(
        self, x: torch.Tensor, step: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return local_step(self.lm, x.unsqueeze(1), step, k_cache.clone(), v_cache.clone())


class PatchDecoder(nn.Module):
    """The whole patch decoder: h (B, hidden) and the rows' sampling inputs -> codes (B, group, channels).

    Inputs after ``h``: ``uniform`` (B, codes per patch) fp32, the one uniform number per code that
    ``decode_patch`` draws from the rows' generators (ignored when ``all_greedy``);
    ``temperature`` (B,) fp32, ``top_k`` (B,) int64, ``top_p`` (B,) fp32, ``greedy`` (B,) bool;
    ``all_greedy`` and ``any_filter`` () bool, the host flags of :class:`SamplingBatch`, which
    choose the branch to run (ONNX ``If``), as they choose the code path in PyTorch. The loop is
    ``run_patch`` and the sampler ``sample_tokens``, the very functions ``decode_patch`` runs.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        _warm_step_tables(lm)
        sched = lm.schedule
        for t, groups in enumerate(sched.groups):
            for i in range(len(groups)):
                # (n, V): each channel's empty id, banned after filtering (as ``decode_patch`` does)
                self.register_buffer(f"empty_{t}_{i}", sched.banned(t, i, torch.device("cpu")).clone(),
                                     persistent=False)

    def forward(
        self,
        h: torch.Tensor,
        uniform: torch.Tensor,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        greedy: torch.Tensor,
        all_greedy: torch.Tensor,
        any_filter: torch.Tensor,
    ) -> torch.Tensor:
        def sampler(t: int, i: int, g, logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            return sample_tokens(logits, noise, temperature, top_k, top_p, greedy, getattr(self, f"empty_{t}_{i}"),
                                 all_greedy=all_greedy, any_filter=any_filter)

        return run_patch(self.lm, h.to(self.lm.dtype), sampler, uniform)


def _warm_step_tables(lm: nn.Module) -> None:
    """The patch decoder's per-step tables, built eagerly (see :func:`_warm_rope_tables`)."""
    _warm_rope_tables(lm.local_transformer)
    StepTables.of(lm, torch.device("cpu"), lm.dtype)


# ------------------------------------------------------------------------------------- audio codec
def dense_sequence_mask(
    lengths: torch.Tensor, T: int, *, causal: bool = False, window: tuple[int, int] = (-1, -1)
) -> AttentionMask:
    """``agent.codec.transformer.sequence_mask`` always as a dense (B, 1, T, T) mask.

    PyTorch skips the mask when every row is full and takes a blockwise path for sliding windows;
    both decisions read lengths on the host. The keys each query sees are the same here.
    """
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    pos = torch.arange(T, device=lengths.device)
    i, j = pos[:, None], pos[None, :]
    allowed = j[None] < lengths[:, None, None]  # (B, 1, T): keys inside the row
    if right >= 0:
        allowed = allowed & (j <= i + right)
    if left >= 0:
        allowed = allowed & (j >= i - left)
    allowed = allowed.expand(lengths.shape[0], T, T)
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # padded queries: anything (output dropped)
    return AttentionMask(dense=allowed[:, None])


class CodecEncoder(nn.Module):
    """mel (B, T, n_mels) fp32, lengths (B,) -> codes (B, T25, n_q) int64, lengths (B,) at 25 Hz.

    ``AudioEncoder.forward`` then ``encode`` with the first ``n_q`` codebooks; rows past their
    length hold codes of padding (the host drops them).
    """

    def __init__(self, tok: nn.Module, n_q: int) -> None:
        super().__init__()
        self.encoder = tok.encoder
        self.n_q = n_q

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder
        cfg = enc.config
        B, T, _ = mel.shape
        x = mel.to(enc.conv1.weight.dtype).masked_fill(~valid_mask(lengths, T)[..., None], 0.0)
        x = F.gelu(enc.conv1(x.transpose(1, 2)))  # (B, d, T)
        x = x.masked_fill(~valid_mask(lengths, T)[:, None, :], 0.0)  # conv2 sees zeros past the end
        x = F.gelu(enc.conv2(x)).transpose(1, 2)  # (B, T50, d)
        len50, len25 = enc.output_lengths(lengths)
        T50 = x.shape[1]
        positions = torch.arange(T50, device=x.device)[None, :].expand(B, T50)
        rope = rope_cos_sin(positions, cfg.d_model // cfg.encoder_attention_heads, cfg.rope_theta, x.dtype)
        mask = dense_sequence_mask(len50, T50, causal=cfg.encoder_causal,
                                   window=tuple(cfg.encoder_attn_window_size))
        skip = None
        for idx, layer in enumerate(enc.layers):
            x = layer(x, rope, mask)
            if cfg.encoder_skip_layer_id is not None and idx == cfg.encoder_skip_layer_id - 1:
                skip = x
        if skip is not None:
            x = x + skip
        x = enc.layer_norm(x).masked_fill(~valid_mask(len50, T50)[..., None], 0.0)
        x = F.pad(x, (0, 0, 0, T50 % cfg.avg_pooler))  # (B, T50 + pad, d): whole pooling windows
        x = enc.down_sample_layer(x.transpose(1, 2)).transpose(1, 2)  # (B, T25, d)
        features = enc.down_sample_norm(x).float()
        N, T25, D = features.shape
        codes = enc.quantizer.encode(features.reshape(N * T25, D), self.n_q)  # (B*T25, n_q)
        return codes.view(N, T25, self.n_q), len25


class CodecDecoderChunk(nn.Module):
    """A "cached"-mode streaming decode pass for B streams: ``_advance_decoder``, then the vocoder.

    Inputs:

    - ``codes`` (B, N, q) the tokens to run, ``new_tokens`` (B,) how many are real (0: the row only
      re-runs its vocoder window);
    - ``past_frames`` (B,) 50 Hz frames in each row's KV cache, whose keys and values come last,
      per decoder layer ``past_key_i``/``past_value_i`` (B, H, P, d);
    - the GroupNorm moments ``moments1``/``moments2`` (B, 3) fp64 (count, sum, sum of squares:
      zeros, or a prior's pseudo-moments, for a new stream), and ``keep_moments1``/``keep_moments2``
      (B,) bool: normalise with them as they are (frozen statistics; a refresh that re-runs
      history already counted) instead of adding this chunk's first;
    - ``prev_hidden`` (B, d) the last transformer frame (zeros for a new stream);
    - the vocoder's window: frames ``window_index`` (B, W) of [``left_mel`` (B, L, n_mels), then
      the new coarse-mel frames], ``window_frames`` (B,) of them valid; ``spectrum_index`` (B, K)
      the window frames whose spectrum to return.

    Outputs: ``spectrum_real``/``spectrum_imag`` (B, n_fft/2+1, K) the vocoder head's spectrum of
    those frames (the vocoder's transformer needs the whole window, but only the frames whose
    samples are played need the head and the inverse STFT); ``mel`` (B, 4N, n_mels) the new
    coarse-mel frames, ``moments1_out``/``moments2_out``, ``last_hidden`` (B, d) and per layer
    ``new_key_i``/``new_value_i`` (B, H, 2N, d).
    """

    def __init__(self, tok: nn.Module) -> None:
        super().__init__()
        self.tok = tok
        self.decoder = tok.decoder
        cfg = tok.config
        if not cfg.decoder_causal:
            raise ValueError("cached streaming decode needs a causal decoder (decoder_causal=true)")
        self.num_layers = cfg.decoder_layers

    def forward(
        self,
        codes: torch.Tensor,
        new_tokens: torch.Tensor,
        past_frames: torch.Tensor,
        moments1: torch.Tensor,
        moments2: torch.Tensor,
        keep_moments1: torch.Tensor,
        keep_moments2: torch.Tensor,
        prev_hidden: torch.Tensor,
        left_mel: torch.Tensor,
        window_index: torch.Tensor,
        window_frames: torch.Tensor,
        spectrum_index: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        dec = self.decoder
        B, N, Q = codes.shape
        L = self.num_layers
        # RVQ embedding: the sum of the selected entries, in fp32 (``ResidualVectorQuantizer.decode``)
        emb = torch.zeros(B, N, self.tok.config.d_model, dtype=torch.float32, device=codes.device)
        for i in range(Q):
            emb = emb + self.tok.encoder.quantizer.codebook(i)[codes[..., i]]
        emb = emb.to(dec.dtype)
        has_new = new_tokens > 0

        # dconv1 (kernel = stride: chunks do not overlap), GroupNorm with running moments
        y, len50 = dec.dconv1.upsample(emb, new_tokens)  # (B, 2N, d)
        len50 = torch.where(has_new, len50, torch.zeros_like(len50))
        x, moments1_out = self._normalise(y, len50, moments1, keep_moments1 | ~has_new, dec.dconv1.norm)

        # the causal transformer, continuing each row's KV cache
        caches = [LayerKV(past[2 * i], past[2 * i + 1]) for i in range(L)]
        P = past[0].shape[2]
        h = dec.transform(x, len50, caches, past_frames)  # (B, 2N, d)
        new_kv = []
        for kv in caches:
            new_kv += [kv.k[:, :, P:], kv.v[:, :, P:]]  # (B, H, 2N, d)

        # dconv2 (kernel 3, stride 2): the previous frame first, keep the frames of the new inputs
        y2, _ = dec.dconv2.upsample(torch.cat([prev_hidden[:, None].to(h.dtype), h], dim=1), len50 + 1)
        s = dec.dconv2.stride
        len100 = len50 * s
        y2 = y2[:, s : s + h.shape[1] * s]  # (B, 4N, n_mels)
        mel, moments2_out = self._normalise(y2, len100, moments2, keep_moments2 | ~has_new, dec.dconv2.norm)
        last = h.gather(1, (len50 - 1).clamp_min(0)[:, None, None].expand(B, 1, h.shape[2]))[:, 0]
        last_hidden = torch.where(has_new[:, None], last, prev_hidden.to(h.dtype))

        # the vocoder over each row's window, gathered from its left context and the new frames
        both = torch.cat([left_mel.to(mel.dtype), mel], dim=1)  # (B, L + 4N, n_mels)
        W = window_index.shape[1]
        source = window_index.clamp(0, both.shape[1] - 1)
        window = both.gather(1, source[..., None].expand(B, W, both.shape[2]))  # (B, W, n_mels)
        window = window.masked_fill(~valid_mask(window_frames, W)[..., None], 0.0)
        hidden = self._vocoder_hidden(window, window_frames)  # (B, W, dim)
        index = spectrum_index.clamp(0, W - 1)  # (B, K)
        hidden = hidden.gather(1, index[..., None].expand(B, index.shape[1], hidden.shape[2]))  # (B, K, dim)
        spectrum = dec.vocoder.head.spectrum(hidden)  # (B, n_fft/2+1, K)
        return (spectrum.real, spectrum.imag, mel, moments1_out, moments2_out, last_hidden, *new_kv)

    @staticmethod
    def _normalise(y, lengths, moments, keep, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """``streaming._normalise``: add this chunk's moments unless ``keep``; normalise with the sums."""
        count, total, squares = group_norm_moments(y, lengths)
        fresh = moments + torch.stack([count, total, squares], dim=1)
        moments = torch.where(keep[:, None], moments, fresh)  # (B, 3) fp64
        mean, var = moments_to_stats(moments[:, 0], moments[:, 1], moments[:, 2])
        out = apply_group_norm(y, mean, var, norm)
        return out.masked_fill(~valid_mask(lengths, y.shape[1])[..., None], 0.0), moments

    def _vocoder_hidden(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``TransformerVocos.hidden`` with a dense sliding-window mask."""
        voc = self.decoder.vocoder
        cfg = voc.config
        B, T, _ = mel.shape
        x = voc.embeddings(mel.to(voc.embeddings.weight.dtype))
        positions = torch.arange(T, device=x.device)[None, :].expand(B, T)
        rope = rope_cos_sin(positions, cfg.vocoder_dim // cfg.vocoder_attention_heads, cfg.rope_theta, x.dtype)
        mask = dense_sequence_mask(lengths, T, window=tuple(cfg.vocoder_attn_window_size))
        for layer in voc.layers:
            x = layer(x, rope, mask)
        return voc.layer_norm(x)
