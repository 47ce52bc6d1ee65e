"""The MiMo-Audio speech language model: weights and the backbone's prefill and decode steps.

``MiMoAudioLM`` owns every weight under its official key name (spec 2.10), so a checkpoint loads
as a pure mapping. The model is stateless: the session state (KV cache slot, sampler generators,
generation controls) is passed in. The functional API the engine calls:

    emb = lm.embed_patches(text_ids, codes)      # [B, P], [B, P, 4, 8] -> [B, P, hidden]
    h = lm.prefill(cache, slot, emb)             # [1, P, hidden] appended to the slot -> [1, hidden]
    h = lm.decode_step(cache, slots, emb)        # [B, 1, hidden], one row per slot -> [B, hidden]
    logits = lm.text_logits(h)                   # [B, vocab]
    codes = lm.decode_patch(h, speech, gens)     # patch decoder -> [B, 4, 8]

The patch encoder and the patch decoder live in their own files; the backbone is here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from agent.lm import fused_attention, patch_decoder, patch_encoder
from agent.lm.config import MiMoAudioConfig
from agent.lm.host import to_device
from agent.lm.kv_cache import KVCache
from agent.lm.sampling import SamplingBatch, SamplingParams
from agent.lm.tokenizer import TextTokenizer
from agent.lm.transformer import FusedLinear, TransformerStack, attend, attention_bias


class MiMoAudioLM(nn.Module):
    """Backbone (``model``), patch encoder and patch decoder, with the official attribute names."""

    def __init__(self, config: MiMoAudioConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        local, input_local = config.local(), config.input_local()
        # backbone: MiMo-7B (Qwen2), one position per patch
        self.model = TransformerStack(
            config.backbone(), max_positions=config.max_position_embeddings, vocab_size=config.vocab_size
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # patch encoder: speech embeddings -> bidirectional transformer per patch -> group downcast
        self.speech_embeddings = nn.ModuleList(
            nn.Embedding(size, input_local.hidden_size) for size in config.speech_vocab_sizes
        )
        self.input_local_transformer = TransformerStack(input_local, max_positions=config.group_size)
        self.speech_group_downcast = nn.Linear(
            input_local.hidden_size * config.group_size, config.hidden_size, bias=False
        )
        # patch decoder: backbone hidden -> local transformer, 11 delayed steps -> 8 heads
        self.hidden_states_downcast = nn.Linear(config.hidden_size, local.hidden_size, bias=False)
        self.local_transformer = TransformerStack(local, max_positions=config.local_steps)
        self.local_transformer_lm_heads = nn.ModuleList(
            nn.Linear(local.hidden_size, size, bias=False) for size in config.speech_vocab_sizes
        )
        # the 8 heads as one matmul per step (views of one weight, see FusedLinear)
        self.speech_heads = FusedLinear(*self.local_transformer_lm_heads)
        self.schedule = patch_decoder.DelaySchedule(config)
        self.requires_grad_(False)  # an inference model: weights are never trained here

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.speech_heads.refuse()  # a dtype or device move copies each head on its own
        return out

    # ------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def allocate_cache(self, num_slots: int, max_positions: int) -> KVCache:
        """A KV cache on this model's device and dtype."""
        return KVCache.allocate(self.config, num_slots, max_positions, self.device, self.dtype)

    # ---------------------------------------------------------------------------- patch encoder
    @torch.inference_mode()
    def embed_patches(self, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Input embeddings of patches: text_ids (B, P), codes (B, P, 4, 8) -> (B, P, hidden).

        A patch whose text id is ``<|empty|>`` is a speech patch (its codes count); any other
        patch is a text patch (its codes are ignored). Spec 2.4.
        """
        return patch_encoder.embed_patches(self, text_ids, codes)

    # --------------------------------------------------------------------------------- backbone
    @torch.inference_mode()
    def prefill(self, cache: KVCache, slot: int, emb: torch.Tensor) -> torch.Tensor:
        """Run ``emb`` (1, P, hidden) at the next P positions of ``slot``; return the last hidden (1, hidden).

        Callable repeatedly on one slot (chunked prefill): each call continues where the slot's
        history ends and attends to all of it.
        """
        B, P, _ = emb.shape
        if B != 1:
            raise ValueError(
                f"prefill takes one slot's patches, shape (1, P, hidden); got {tuple(emb.shape)}"
            )
        if P == 0:
            raise ValueError("prefill needs at least one patch")
        cache.reserve([slot], P)
        start = cache.length(slot)
        end = start + P
        positions = torch.arange(start, end, device=emb.device)
        cos, sin = self.model.rope.at(positions, emb.dtype)
        # query i (position start+i) sees keys 0..start+i; with no history that is plain causal
        mask = (
            None
            if start == 0
            else attention_bias(
                (torch.arange(end, device=emb.device)[None, :] <= positions[:, None]).view(1, 1, P, end), emb.dtype)
        )

        def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_cache, v_cache = cache.k[i], cache.v[i]
            k_cache[slot, :, start:end] = k[0]
            v_cache[slot, :, start:end] = v[0]
            keys, values = k_cache[slot : slot + 1, :, :end], v_cache[slot : slot + 1, :, :end]
            return attend(q, keys, values, mask, causal=start == 0)

        h = self.model.run(emb, cos.unsqueeze(0), sin.unsqueeze(0), attention)[:, -1]
        cache.advance([slot], to_device([slot], cache.device), P)
        return h

    @torch.inference_mode()
    def decode_step(
        self, cache: KVCache, slots: torch.Tensor | Sequence[int], emb: torch.Tensor
    ) -> torch.Tensor:
        """One patch for each of B slots: emb (B, 1, hidden) -> last hidden (B, hidden).

        Row b is written at position ``length(slots[b])`` of its slot and attends to that slot's
        history only; rows may have different lengths. ``slots`` are host values (a CPU tensor or
        a list): the attention span comes from the cache's host lengths, so no device sync.
        """
        B = emb.shape[0]
        slot_list = decode_slots(emb, slots)
        cache.reserve(slot_list, 1)
        lengths = [cache.length(s) for s in slot_list]
        lo = slot_list[0]
        contiguous = slot_list == list(range(lo, lo + B))  # then the history is a view of the slot range
        slots_dev = to_device(slot_list, cache.device)
        # rows of one length see every key of the span: no mask needed (always so at batch 1)
        h = slot_step(self, cache, slots_dev, emb, max(lengths) + 1, window=lo if contiguous else None,
                      masked=len(set(lengths)) > 1)
        cache.advance(slot_list, slots_dev, 1)
        return h

    @torch.inference_mode()
    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Text-channel logits (B, vocab) from backbone hidden states (B, hidden), in fp32."""
        return self.lm_head(h).float()

    # ---------------------------------------------------------------------------- patch decoder
    @torch.inference_mode()
    def decode_patch(
        self,
        h: torch.Tensor,
        speech_sampling: SamplingBatch | SamplingParams | Sequence[SamplingParams] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> torch.Tensor:
        """The patch decoder: backbone hidden (B, hidden) -> codes (B, 4, 8), already de-delayed.

        ``speech_sampling`` holds per-row sampling settings (greedy when None); ``generators``
        one seeded generator per row (None: torch's default generator).
        """
        return patch_decoder.decode_patch(self, h, speech_sampling, generators)


def slot_step(lm: MiMoAudioLM, cache: KVCache, slots: torch.Tensor, emb: torch.Tensor, span: int, *,
              window: int | None, masked: bool) -> torch.Tensor:
    """The backbone's decode position, shared by :meth:`MiMoAudioLM.decode_step` and the CUDA-graph
    step: emb (N, 1, hidden) -> hidden (N, hidden), row n written at position ``lengths[slots[n]]``
    of slot ``slots[n]`` (device values; nothing read on the host). Does not advance the lengths.

    Keys are the first ``span`` positions of the rows' slots. With ``window`` = w, row n attends in
    place over slot w + n (a view: the history is read where it lies, never copied); a row whose
    slot is not w + n (a padding row writing to a scratch slot) attends there too, to a result
    that is dropped. With ``window`` None each row's slot is gathered (a copy of N x span
    positions), for rows scattered over the cache. ``masked``: rows see their own slot's prefix
    only (rows of different lengths), else every key of the span.
    """
    N = emb.shape[0]
    pos = cache.lengths.index_select(0, slots)  # (N,)
    cos, sin = lm.model.rope.at(pos.view(N, 1), emb.dtype)  # (N, 1, d)
    if fused_attention.enabled(emb.device):  # each row over its own slot up to its position: no span, no mask
        def fused(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return fused_attention.rope_attend(q, k, v, cos, sin, cache.k, cache.v, i, slots, pos)

        return lm.model.run(emb, None, None, fused)[:, -1]
    mask = None
    if masked:
        lengths = pos if window is None else cache.lengths[window : window + N]
        mask = attention_bias((torch.arange(span, device=emb.device) <= lengths[:, None]).view(N, 1, 1, span),
                              emb.dtype)

    def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = cache.k[i], cache.v[i]
        k_cache[slots, :, pos] = k[:, :, 0]
        v_cache[slots, :, pos] = v[:, :, 0]
        if window is None:
            keys = k_cache[:, :, :span].index_select(0, slots)  # (N, Hkv, span, d)
            values = v_cache[:, :, :span].index_select(0, slots)
        else:
            keys, values = k_cache[window : window + N, :, :span], v_cache[window : window + N, :, :span]
        return attend(q, keys, values, mask)

    return lm.model.run(emb, cos, sin, attention)[:, -1]


def decode_slots(emb: torch.Tensor, slots: torch.Tensor | Sequence[int]) -> list[int]:
    """The host list of a decode step's slots, checked against its embeddings (B, 1, hidden)."""
    B, T, _ = emb.shape
    slot_list = [int(s) for s in (slots.tolist() if isinstance(slots, torch.Tensor) else slots)]
    if T != 1 or len(slot_list) != B:
        raise ValueError(
            f"decode_step takes emb (B, 1, hidden) with B = len(slots) = {len(slot_list)}; got {tuple(emb.shape)}"
        )
    if len(set(slot_list)) != B:
        raise ValueError(f"decode_step slots must be distinct, got {slot_list}")
    return slot_list


def init_weights(lm: MiMoAudioLM, seed: int) -> None:
    """Random weights for a preset, seeded and device-independent in distribution.

    Linear layers draw N(0, 1/fan_in) so activations keep their scale through the stacks; the
    output heads draw N(0, 4/fan_in) so text and code logits have a spread of a few nats (peaked
    but not one-hot); biases are small; norms are ones. Embeddings are N(0, 1), the speech tables
    N(0, 1/8) because eight of them are summed.
    """
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    heads = {id(lm.lm_head.weight)} | {id(h.weight) for h in lm.local_transformer_lm_heads}
    speech = {id(e.weight) for e in lm.speech_embeddings}
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02, generator=gen)
            elif id(p) in speech:
                p.normal_(0.0, 8**-0.5, generator=gen)
            elif p.dim() == 2 and "embed_tokens" in name:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                scale = 2.0 if id(p) in heads else 1.0
                p.normal_(0.0, scale * p.shape[1] ** -0.5, generator=gen)


def empty_model(config: MiMoAudioConfig, dtype: torch.dtype, device: torch.device | str) -> MiMoAudioLM:
    """A model with uninitialised weights of ``dtype`` on ``device`` (no extra copy on the way).
    fp16 is refused (:func:`agent.checkpoint.check_lm_dtype`)."""
    from agent.checkpoint import check_lm_dtype

    check_lm_dtype(dtype)
    with torch.device("meta"):
        lm = MiMoAudioLM(config)
    return lm.to(dtype).to_empty(device=device).eval()


def build_preset(
    name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[MiMoAudioLM, MiMoAudioConfig, TextTokenizer]:
    """The preset ``name`` with its seeded random weights, and its byte-level tokenizer."""
    from agent.lm.config import preset
    from agent.lm.tokenizer import MIMO_SPECIAL_IDS, ByteTokenizer

    p = preset(name)
    tokenizer = ByteTokenizer() if name == "tiny" else ByteTokenizer(MIMO_SPECIAL_IDS)
    lm = empty_model(p.config, dtype, device)
    init_weights(lm, p.seed)
    return lm, p.config, tokenizer
