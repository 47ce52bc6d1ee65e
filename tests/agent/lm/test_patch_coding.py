"""Patch encoder (bidirectional inside a patch) and patch decoder (the delayed schedule)."""

from __future__ import annotations

import torch

from agent.lm.patch_decoder import DelaySchedule
from agent.lm.prompts import PromptBuilder
from agent.lm.sampling import SamplingParams

from .conftest import random_codes


def test_delay_schedule_matches_the_spec(tiny) -> None:
    _, config, _ = tiny
    sched = DelaySchedule(config)
    # spec 2.6: t0:{c0}, t1:{c0,c1}, t2:{c0..c2}, t3:{c0..c3}, t4:{c1..c4}, ..., t10:{c7}
    want = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6], [4, 5, 6, 7],
            [5, 6, 7], [6, 7], [7]]  # fmt: skip
    assert sched.channels == want
    assert sched.frames == [[t - c for c in chans] for t, chans in enumerate(want)]
    assert sched.num_codes == 32 and sched.steps == 11
    # every (frame, channel) is sampled exactly once
    pairs = sorted(
        (f, c)
        for fs, cs in zip(sched.frames, sched.channels, strict=True)
        for f, c in zip(fs, cs, strict=True)
    )
    assert pairs == [(f, c) for f in range(4) for c in range(8)]


def test_patch_decoder_samples_each_channel_at_its_steps_and_feeds_codes_back(tiny, monkeypatch) -> None:
    lm, config, _ = tiny
    head_calls: list[int] = []
    inputs: list[torch.Tensor] = []
    heads = lm.speech_heads.select  # the 8 heads, one matmul: the channels whose logits a step takes

    def select(x, which):
        head_calls.extend(which)
        return heads(x, which)

    monkeypatch.setattr(lm.speech_heads, "select", select)
    hooks = [lm.local_transformer.layers[0].input_layernorm.register_forward_hook(
        lambda m, a, o: inputs.append(a[0].clone()))]  # fmt: skip
    try:
        h = torch.randn(2, config.hidden_size, generator=torch.Generator().manual_seed(0))
        codes = lm.decode_patch(
            h, SamplingParams(temperature=1.0), [torch.Generator().manual_seed(s) for s in (1, 2)]
        )
    finally:
        for hook in hooks:
            hook.remove()
    sched = lm.schedule
    assert head_calls == [c for chans in sched.channels for c in chans]
    assert len(inputs) == 11
    torch.testing.assert_close(inputs[0][:, 0], lm.hidden_states_downcast(h))
    for t in range(10):  # input of step t+1 = sum of the embeddings of the codes sampled at step t
        want = sum(
            lm.speech_embeddings[c](codes[:, f, c])
            for f, c in zip(sched.frames[t], sched.channels[t], strict=True)
        )
        torch.testing.assert_close(inputs[t + 1][:, 0], want)
    assert codes.shape == (2, 4, 8)
    empty = torch.tensor(config.speech_empty_ids)
    assert bool((codes >= 0).all()) and bool((codes < empty).all())  # the empty id is never sampled


def test_patch_decoder_rows_are_independent_and_seeded(tiny) -> None:
    lm, config, _ = tiny
    h = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=1.5, top_p=0.9)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = lm.decode_patch(h, params, gens(7, 8, 9))
    assert torch.equal(batch, lm.decode_patch(h, params, gens(7, 8, 9)))  # reproducible
    for row, seed in enumerate((7, 8, 9)):  # a row does not depend on its batch neighbours
        assert torch.equal(batch[row], lm.decode_patch(h[row : row + 1], params, gens(seed))[0])
    assert not torch.equal(batch, lm.decode_patch(h, params, gens(1, 2, 3)))
    greedy = lm.decode_patch(h)
    assert torch.equal(greedy, lm.decode_patch(h, None, gens(1, 2, 3)))  # greedy ignores the noise


def test_patch_encoder_is_bidirectional_inside_a_patch(tiny) -> None:
    """The input local transformer's frame-0 output depends on frame 3 (input_full_attention)."""
    lm, config, tok = tiny
    builder = PromptBuilder(tok, config)
    codes = random_codes(config, 4, seed=3)
    changed = codes.clone()
    changed[3] = (changed[3] + 1) % torch.tensor(config.speech_empty_ids)
    inputs, outputs = [], []

    def record(module, args, output) -> None:
        inputs.append(args[0].clone())
        outputs.append(output.clone())

    hook = lm.input_local_transformer.register_forward_hook(record)
    try:
        for c in (codes, changed):
            lm.embed_patches(*builder.speech(c).batch())
    finally:
        hook.remove()
    assert torch.equal(inputs[0][0, :3], inputs[1][0, :3])  # only frame 3 differs on the way in
    assert not torch.allclose(outputs[0][0, 0], outputs[1][0, 0], atol=1e-4)
    # the check can tell: causal attention would leave frame 0 unchanged
    causal = [lm.input_local_transformer(x, causal=True) for x in inputs]
    torch.testing.assert_close(causal[0][0, 0], causal[1][0, 0])


def test_patch_encoder_text_and_speech_patches(tiny) -> None:
    """A text patch is its token embedding alone (codes ignored); a speech patch has no text part."""
    lm, config, tok = tiny
    builder = PromptBuilder(tok, config)
    text = builder.text("a")
    emb = lm.embed_patches(*text.batch())
    torch.testing.assert_close(emb[0, 0], lm.model.embed_tokens.weight[text.text_ids[0]])
    noisy = text.codes.clone()
    noisy[0, 1, 2] = 5
    torch.testing.assert_close(lm.embed_patches(text.text_ids[None], noisy[None]), emb)
    speech = builder.speech(random_codes(config, 4, seed=4))
    encoded = []
    hook = lm.input_local_transformer.register_forward_hook(lambda m, a, o: encoded.append(o))
    try:
        got = lm.embed_patches(*speech.batch())
    finally:
        hook.remove()
    want = lm.speech_group_downcast(encoded[0].reshape(1, -1))  # frames concatenated in time order
    torch.testing.assert_close(got[0], want)
