"""Fidelity to the official implementation: golden outputs of its code on tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

from agent.lm.generation import GenerationControls
from agent.lm.prompts import Prompt
from agent.lm.session import LMSession
from agent.lm.tokenizer import SpecialTokens

from .reference import VARIANTS, load_reference, reference_tokenizer

CASES = [(v, b) for v in VARIANTS for b in (False, True)]
IDS = [f"{v}-{'boost' if b else 'plain'}" for v, b in CASES]


def _generated_patches(expected: dict[str, torch.Tensor]) -> Prompt:
    return Prompt.from_layout(expected["generated"])


@pytest.mark.parametrize(("variant", "boost"), CASES, ids=IDS)
def test_patch_embeddings_match(variant: str, boost: bool) -> None:
    lm, expected = load_reference(variant, boost)
    everything = Prompt.from_layout(expected["input_ids"]) + _generated_patches(expected)
    emb = lm.embed_patches(*everything.batch())
    torch.testing.assert_close(emb[0], expected["all_embeds"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("variant", "boost"), CASES, ids=IDS)
def test_prefill_logits_and_patch_decoder_match(variant: str, boost: bool) -> None:
    lm, expected = load_reference(variant, boost)
    prompt = Prompt.from_layout(expected["input_ids"])
    cache = lm.allocate_cache(1, 64)
    h = lm.prefill(cache, 0, lm.embed_patches(*prompt.batch()))
    torch.testing.assert_close(lm.text_logits(h)[0], expected["last_text_logits"], rtol=0, atol=1e-4)
    assert lm.decode_patch(h)[0].tolist() == expected["last_patch_local_codes"].tolist()


@pytest.mark.parametrize(("variant", "boost"), CASES, ids=IDS)
def test_incremental_logits_match_every_position(variant: str, boost: bool) -> None:
    """Prefill the prompt, then decode the official generated patches one by one: the text logits
    and downcast hidden state at every position equal the official full forward pass."""
    lm, expected = load_reference(variant, boost)
    prompt, generated = Prompt.from_layout(expected["input_ids"]), _generated_patches(expected)
    P = len(prompt)
    cache = lm.allocate_cache(1, 64)
    h = lm.prefill(cache, 0, lm.embed_patches(*prompt.batch()))
    for i in range(len(generated) + 1):
        torch.testing.assert_close(
            lm.text_logits(h)[0], expected["all_text_logits"][P - 1 + i], rtol=0, atol=1e-4
        )
        torch.testing.assert_close(
            lm.hidden_states_downcast(h)[0], expected["all_local_hidden"][P - 1 + i], rtol=0, atol=1e-4
        )
        if i < len(generated):
            h = lm.decode_step(cache, [0], lm.embed_patches(*generated[i : i + 1].batch()))


@pytest.mark.parametrize(("variant", "boost"), CASES, ids=IDS)
def test_greedy_generation_matches(variant: str, boost: bool) -> None:
    lm, expected = load_reference(variant, boost)
    specials: SpecialTokens = reference_tokenizer().specials
    cache = lm.allocate_cache(1, 64)
    session = LMSession(lm, cache, 0, specials)
    session.feed(Prompt.from_layout(expected["input_ids"]))
    patches = list(session.generate(GenerationControls(max_patches=6)))
    want = _generated_patches(expected)
    assert [p.text_id for p in patches] == want.text_ids.tolist()
    assert torch.equal(torch.stack([p.codes for p in patches]), want.codes)
    assert [p.is_speech for p in patches] == (want.text_ids == specials.empty).tolist()
    if boost:  # the boosted weights exercise the patch decoder and the feedback of speech patches
        assert sum(p.is_speech for p in patches) >= 2
