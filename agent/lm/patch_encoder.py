"""The patch encoder: one backbone input embedding per 4-frame patch (spec 2.4).

For each patch:

1. sum the 8 channels' ``speech_embeddings`` per frame, with each channel's empty id counted as
   zero, and zero the whole patch unless it is a speech patch (text id ``<|empty|>``);
2. run ``input_local_transformer`` over the patch's 4 frames, bidirectionally when
   ``input_full_attention`` (the shipped setting), and zero the output of non-speech patches
   again (the transformer's biases make it non-zero);
3. concatenate the 4 frame vectors in time order and project with ``speech_group_downcast``;
4. add the text embedding of the patch's text id, zeroed for speech patches.

So a speech patch carries only audio and a text patch only its text token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from agent.lm.model import MiMoAudioLM


def embed_patches(lm: MiMoAudioLM, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """text_ids (B, P), codes (B, P, group, channels) -> input embeddings (B, P, hidden)."""
    cfg = lm.config
    B, P = text_ids.shape
    G, C = cfg.group_size, cfg.audio_channels
    if codes.shape != (B, P, G, C):
        raise ValueError(f"codes must have shape (B, P, {G}, {C}) = {(B, P, G, C)}, got {tuple(codes.shape)}")
    dtype = lm.dtype
    is_speech = (text_ids == cfg.empty_token_id).to(dtype).view(B, P, 1, 1)  # (B, P, 1, 1)

    frames = None
    for c, (table, empty) in enumerate(zip(lm.speech_embeddings, cfg.speech_empty_ids, strict=True)):
        ids = codes[..., c]  # (B, P, G)
        emb = table(ids).masked_fill((ids == empty).unsqueeze(-1), 0.0)  # (B, P, G, D)
        frames = emb if frames is None else frames + emb
    assert frames is not None
    frames = frames * is_speech  # (B, P, G, D)

    D = frames.shape[-1]
    encoded = lm.input_local_transformer(
        frames.reshape(B * P, G, D), causal=not cfg.input_full_attention
    )  # (B*P, G, D): each patch is its own sequence
    encoded = encoded.view(B, P, G, D) * is_speech
    speech = lm.speech_group_downcast(encoded.reshape(B, P, G * D))  # (B, P, hidden), frames in time order

    text = lm.model.embed_tokens(text_ids)  # (B, P, hidden)
    text = text.masked_fill((text_ids == cfg.empty_token_id).unsqueeze(-1), 0.0)
    return text + speech
