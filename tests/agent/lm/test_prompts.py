"""Prompt builders against the layouts the official builders produce (fixtures/official_prompts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agent.lm.prompts import LAYOUT_FILL, Prompt, PromptBuilder, normalize_case, pad_codes_to_patches

OFFICIAL = load_file(str(Path(__file__).parent / "fixtures" / "official_prompts.safetensors"))


def _codes(name: str) -> torch.Tensor:
    return OFFICIAL[f"codes_{name}"].long()


@pytest.fixture(scope="module")
def builder(tiny) -> PromptBuilder:
    _, config, tok = tiny
    return PromptBuilder(tok, config)


def _cases(b: PromptBuilder) -> dict[str, Prompt]:
    a, bb, voice = _codes("a"), _codes("b"), _codes("voice")
    messages = [
        {"role": "user", "content": a},
        {
            "role": "assistant",
            "content": {"text": "Sure, here is a long answer to that.", "audio": _codes("reply")},
        },
        {"role": "user", "content": bb},
    ]
    examples = [
        (_codes("ex1_in"), "Hi", _codes("ex1_out")),
        (_codes("ex2_in"), "A much longer transcription here", _codes("ex2_out")),
    ]
    return {
        "asr": b.asr(a),
        "tts_en": b.tts("hello world"),
        "tts_zh": b.tts("你好，世界"),
        "tts_instruct": b.tts("Good Morning", instruct="whisper softly"),
        "tts_instruct_voice": b.tts("Good Morning", instruct="happy", voice_codes=voice),
        "dialogue": b.spoken_dialogue(a, system_prompt="Be brief.", voice_codes=voice),
        "dialogue_plain": b.spoken_dialogue(bb),
        "dialogue_next_turn": b.next_dialogue_turn(bb),
        "multiturn": b.spoken_dialogue_multiturn(messages, system_prompt="Be brief.", voice_codes=voice),
        "s2t": b.speech_to_text_dialogue(a),
        "s2t_thinking": b.speech_to_text_dialogue(a, thinking=True),
        "understanding": b.audio_understanding(bb, "What is the speaker's mood?"),
        "in_context": b.in_context_s2s("Translate to French.", examples, _codes("q")),
    }


CASE_NAMES = [k for k in OFFICIAL if not k.startswith("codes_")]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_builder_matches_the_official_layout(builder, name) -> None:
    prompt = _cases(builder)[name]
    want = OFFICIAL[name].long()
    got = prompt.to_layout()
    assert got.shape == want.shape
    assert torch.equal(got, want)
    back = Prompt.from_layout(want)  # and the layout converts back to the same patches
    assert torch.equal(back.text_ids, prompt.text_ids) and torch.equal(back.codes, prompt.codes)


def test_every_case_is_covered(builder) -> None:
    assert sorted(_cases(builder)) == sorted(CASE_NAMES)


def test_interleaved_stream_structure(builder) -> None:
    s = builder.specials
    codes = _codes("reply")  # 7 speech patches
    text = "one two three four five six seven"
    ids = builder.tokenizer.encode(text)
    p = builder.interleaved(text, codes)
    t = p.text_ids.tolist()
    chunks = [ids[i : i + 5] for i in range(0, len(ids), 5)]
    chunks[-1] = chunks[-1] + [s.eot]
    want = [s.sostm]
    for i, chunk in enumerate(chunks):
        want += chunk
        if i < 2:
            want += [s.empty] * (5 if i == 0 else 2)
    want += [s.eostm]
    assert t == want
    assert torch.equal(p.codes[p.text_ids == s.empty].reshape(-1, 8), codes)


def test_layout_rows_and_fill(builder) -> None:
    p = builder.text("ab") + builder.audio(_codes("b"))
    layout = p.to_layout()
    assert layout.shape == (9, 4 * len(p))
    assert (layout[0].view(-1, 4)[:, 1:] == LAYOUT_FILL).all()
    assert layout[1:, :8].eq(torch.tensor(builder.config.speech_empty_ids)[:, None]).all()  # text patches


def test_codes_checks_and_padding(builder) -> None:
    with pytest.raises(ValueError, match="whole number of 4-frame patches"):
        builder.audio(torch.zeros(6, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be \(T, 8\)"):
        builder.audio(torch.zeros(8, 7, dtype=torch.long))
    bad = torch.zeros(8, 8, dtype=torch.long)
    bad[5, 3] = 128  # the empty id of channel 3 is not a code
    with pytest.raises(ValueError, match=r"code 128 at frame 5, channel 3 is outside 0\.\.127"):
        builder.audio(bad)
    padded = pad_codes_to_patches(torch.arange(6 * 8).view(6, 8) % 100)
    assert padded.shape == (8, 8) and torch.equal(padded[6], padded[5]) and torch.equal(padded[7], padded[5])
    assert normalize_case("HELLO THERE") == "Hello there" and normalize_case("Mixed Case") == "Mixed Case"


def test_heard_speech_keeps_the_configured_codebooks(tiny) -> None:
    """A config's ``input_speech_codebooks`` applies to the speech the model hears (user turns,
    voice prompts: the ``<|sosp|>`` segments), never to the speech it speaks, and leaves the
    caller's codes alone."""
    import dataclasses

    from agent.conversation import ConversationRenderer, Item, Role
    from agent.lm.config import ConfigError, MiMoAudioConfig

    _, config, tok = tiny
    b = PromptBuilder(tok, dataclasses.replace(config, input_speech_codebooks=2))
    codes = _codes("a")
    before = codes.clone()
    heard = b.audio(codes).codes[1:-1]  # without sosp / eosp
    empty = torch.tensor(config.speech_empty_ids)
    assert torch.equal(heard[..., :2], codes.view(-1, 4, 8)[..., :2])
    assert (heard[..., 2:] == empty[2:]).all() and torch.equal(codes, before)
    assert torch.equal(b.speech(codes).codes, codes.view(-1, 4, 8))  # what the assistant says: whole
    # the server's renderer of a user turn reads the same
    rendered = ConversationRenderer(b).render([Item("u0", Role.USER, codes=codes)], instructions=None).prompt
    assert torch.equal(rendered.codes[(rendered.text_ids == tok.specials.empty)], heard.reshape(-1, 4, 8))
    # all codebooks by default (the official behaviour), and a clear error for a wrong count
    assert torch.equal(PromptBuilder(tok, config).audio(codes).codes[1:-1], codes.view(-1, 4, 8))
    with pytest.raises(ConfigError, match="input_speech_codebooks=9 must be between 1 and audio_channels=8"):
        MiMoAudioConfig.from_dict({**config.to_dict(), "input_speech_codebooks": 9},
                                  empty_token_id=config.empty_token_id)
    again = MiMoAudioConfig.from_dict(b.config.to_dict(), empty_token_id=config.empty_token_id)
    assert again.input_speech_codebooks == 2 and "input_speech_codebooks" not in config.to_dict()  # official: absent
