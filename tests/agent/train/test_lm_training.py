"""``mimo-agent train dialogue-data`` and ``train lm``: what is trained is what is served.

The training sequences are the prompts the server and the offline commands build (the official
layouts), the training forward computes what prefill and the patch decoder compute at inference,
the loss goes down, a resumed run is the same run, and the checkpoint loads through ``load_lm``
and answers through ``mimo-agent dialogue``.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from agent.checkpoint import load_lm
from agent.codec import load_audio_tokenizer, save_audio_tokenizer
from agent.engine import AddUserText, Configure
from agent.lm.model import MiMoAudioLM
from agent.lm.patch_encoder import embed_patches
from agent.lm.prompts import ASR_TEMPLATES, DEFAULT_SYSTEM_PROMPT, TTS_TEMPLATES, PromptBuilder
from agent.train import dialogue
from agent.train.data import ENGINE_WEIGHTS, HELD_OUT_VOICES, TRAIN_VOICES, AugmentRecipe
from agent.train.lexicon import WORDS
from agent.train.lm import (
    BEST,
    PUBLISHED,
    LMRecipe,
    LMTrainer,
    SequenceBuilder,
    backbone_hidden,
    embed_speech_patches,
    init_training_weights,
    length_groups,
    lm_config,
    losses,
    patch_decoder_logits,
    publish_checkpoint,
    tokenizer_texts,
    train_tokenizer,
    trained_agent_voice,
    typed_text,
)
from agent.train.voices import Augmentation, synthesize
from streaming.cli import main
from tests.agent.test_engine import Client, make_engine

from .conftest import require_voices

#: a few steps of the smallest model on a corpus of a few dozen utterances
TINY = ["--size", "micro", "--batch", "4", "--lr", "0.01", "--warmup", "1", "--log-every", "4", "--threads", "1",
        "--save-minutes", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    require_voices()
    out = tmp_path_factory.mktemp("dialogues")
    assert main(["train", "dialogue-data", "--out", str(out), "--seed", "5", "--scale", "0.01"]) == 0
    return out


@pytest.fixture(scope="module")
def parts(corpus):
    manifest, codes = dialogue.read_corpus(corpus)
    tokenizer = train_tokenizer(tokenizer_texts(manifest, 0), 1024)
    config = lm_config("micro", tokenizer)
    builder = PromptBuilder(tokenizer, config)
    lm = MiMoAudioLM(config)
    init_training_weights(lm, 0)
    return manifest, codes, builder, lm


def test_publishing_keeps_the_link_on_a_whole_checkpoint(tmp_path):
    out, link = tmp_path / "run", tmp_path / "current"
    out.mkdir()
    for name in PUBLISHED:
        (out / name).write_text(name)
    first = publish_checkpoint(out, link, 2712)
    # a new run publishes lower steps to the same link: its copies replace the old run's
    for step in (1136, 2000, 2000):
        (out / "config.json").write_text(f"step {step}")
        publish_checkpoint(out, link, step)
        assert (link / "config.json").read_text() == f"step {step}"
    assert not first.exists() and len(list((tmp_path / "current.d").iterdir())) == 2


def test_answers_follow_the_domain_rules():
    qs = dialogue.questions()
    three_plus_four = next(q for q in qs["plus"] if q.text == "What is three plus four?")
    assert dialogue.answer(three_plus_four) == ("seven", 7)
    two_minus_five = next(q for q in qs["minus"] if q.text == "What is two minus five?")
    assert dialogue.answer(two_minus_five) == ("minus three", -3)
    plus_one = next(q for q in qs["follow_up"] if q.text == "And plus one more?")
    assert dialogue.answer(plus_one, previous=20) == ("twenty one", 21)
    with pytest.raises(ValueError, match="previous number"):
        dialogue.answer(plus_one)
    assert dialogue.answer(next(q for q in qs["after"] if q.text == "What comes after nine?")) == ("ten", 10)


def test_corpus_is_seeded_and_keeps_held_out_voices_out(corpus, tmp_path):
    manifest, codes = dialogue.read_corpus(corpus)
    assert not {u["voice"] for u in manifest["users"]} & set(HELD_OUT_VOICES)
    assert {a["voice"] for a in manifest["agents"]} == {dialogue.AGENT_VOICE}
    assert {h["voice"] for h in manifest["held_out"]} == set(HELD_OUT_VOICES)
    assert all((corpus / h["file"]).is_file() for h in manifest["held_out"])
    multi = [d for d in manifest["dialogues"] if len(d.get("turns", ())) > 1]
    assert multi and all(codes[t["user"]].shape[1] == 8 for d in multi for t in d["turns"])
    again = tmp_path / "again"
    assert main(["train", "dialogue-data", "--out", str(again), "--seed", "5", "--scale", "0.01"]) == 0
    second, codes2 = dialogue.read_corpus(again)
    for key in ("users", "agents", "dialogues", "held_out"):
        assert manifest[key] == second[key]
    assert all(np.array_equal(codes[k], codes2[k]) for k in codes)


def test_sequences_are_the_official_dialogue_layout(parts):
    manifest, codes, builder, _ = parts
    sequences = SequenceBuilder(builder, codes)
    d = next(d for d in manifest["dialogues"] if len(d.get("turns", ())) > 1)
    first, second = d["turns"][:2]
    seq = sequences.dialogue(d["turns"][:2], DEFAULT_SYSTEM_PROMPT)
    # the first turn's prompt is what `mimo-agent dialogue` feeds for the same question
    opening = builder.spoken_dialogue(codes[first["user"]], system_prompt=DEFAULT_SYSTEM_PROMPT)
    # the second turn's prompt is the official multi-turn prompt with the first answer in the history
    messages = [{"role": "user", "content": codes[first["user"]]},
                {"role": "assistant", "content": {"text": first["answer"], "audio": codes[first["agent"]]}},
                {"role": "user", "content": codes[second["user"]]}]
    history = builder.spoken_dialogue_multiturn(messages, system_prompt=DEFAULT_SYSTEM_PROMPT)
    answer = builder.interleaved(second["answer"], codes[second["agent"]])[1:]  # generated after <|sostm|>
    for prefix in (opening, history, history + answer):
        assert torch.equal(seq.prompt.text_ids[: len(prefix)], prefix.text_ids)
        assert torch.equal(seq.prompt.codes[: len(prefix)], prefix.codes)
    # the loss is on the generated patches only: each answer's stream, <|eostm|> included
    first_answer = builder.interleaved(first["answer"], codes[first["agent"]])[1:]
    expected = torch.zeros(len(seq.prompt), dtype=torch.bool)
    expected[len(opening) : len(opening) + len(first_answer)] = True
    expected[len(history) : len(history) + len(answer)] = True
    assert torch.equal(seq.generated, expected)
    tokenizer = builder.tokenizer
    assert tokenizer.decode(seq.prompt.text_ids[len(history) : len(history) + len(answer)].tolist()) == second["answer"]
    assert int(seq.prompt.text_ids[len(history) + len(answer) - 1]) == tokenizer.specials.eostm


def test_a_typed_user_turn_is_what_the_engine_feeds_for_typed_text():
    """A typed question in training is the served model's prompt for the same text sent as an
    ``input_text`` item (the page's example prompts): the engine's slot holds the same patches."""
    from agent.runtime import load_runtime

    runtime = load_runtime(preset="tiny-speech", device="cpu")
    builder = PromptBuilder(runtime.tokenizer, runtime.lm.config)
    question = "What is three plus four?"
    agent = np.random.default_rng(0).integers(0, 128, (24, 8))
    turn = {"user": "unused: typed", "text": question, "answer": "seven", "agent": "a0"}
    seq = SequenceBuilder(builder, {"a0": agent}).dialogue([turn], DEFAULT_SYSTEM_PROMPT, typed=[True])
    engine = make_engine(runtime)
    try:
        c = Client(engine)
        c.submit(Configure(instructions=DEFAULT_SYSTEM_PROMPT))
        c.submit(AddUserText("u1", question))
        c.respond("r1", max_output_patches=2)
        served = c.state.cached
    finally:
        engine.stop()
    start = int(seq.generated.nonzero()[0, 0])  # the first patch the model writes, after <|sostm|>
    assert len(served) >= start
    assert torch.equal(served.text_ids[:start], seq.prompt.text_ids[:start])
    assert torch.equal(served.codes[:start], seq.prompt.codes[:start])
    assert not bool((seq.prompt.text_ids[:start] == builder.specials.empty).any())  # no speech in the question
    assert builder.tokenizer.decode(seq.prompt.text_ids[seq.generated].tolist()) == "seven"


def test_the_tts_share_of_the_examples_is_the_recipe_s(corpus, tmp_path):
    """The corpora hold one TTS sentence per ~9 dialogues, so at the ASR share that teaches hearing
    (0.6) the model sees a TTS example one time in 22 and never learns to read a sentence it has not
    heard; ``tts_share`` sets how many of the examples are TTS, the rest staying dialogues and ASR."""
    def shares(**recipe) -> tuple[float, float]:
        trainer = LMTrainer(LMRecipe(size="micro", seed=1, **recipe), [corpus], tmp_path / "out")
        tokenizer = trainer.tokenizer
        kinds = []
        for _ in range(600):
            text = tokenizer.decode(trainer.example().prompt.text_ids.tolist())
            kinds.append("tts" if TTS_TEMPLATES["en"] in text else "asr" if ASR_TEMPLATES["en"] in text
                         else "dialogue")
        return kinds.count("tts") / len(kinds), kinds.count("asr") / len(kinds)

    manifest = json.loads((corpus / "manifest.json").read_text())
    held = sum(d["task"] == "tts" for d in manifest["dialogues"]) / len(manifest["dialogues"])
    tts, asr = shares(asr_share=0.6)  # the default: the corpora's own mix
    assert abs(tts - 0.4 * held) < 0.05 and abs(asr - 0.6) < 0.06, (tts, asr, held)
    tts, asr = shares(asr_share=0.5, tts_share=0.3)
    assert abs(tts - 0.3) < 0.06 and abs(asr - 0.5) < 0.06, (tts, asr)
    with pytest.raises(ValueError, match=r"tts_share 0.6 must be in 0..0.5"):
        LMTrainer(LMRecipe(size="micro", asr_share=0.5, tts_share=0.6), [corpus], tmp_path / "out")


def test_the_asr_share_can_rise_on_a_schedule(corpus, tmp_path):
    """``asr_share_from`` holds until the ramp's first step, then moves linearly to ``asr_share``
    by its last: a run learns the task from dialogues first, hearing from ASR examples later."""
    trainer = LMTrainer(LMRecipe(size="micro", seed=1, asr_share_from=0.0, asr_share=1.0, asr_ramp=(10, 20)),
                        [corpus], tmp_path / "out")
    assert [trainer.asr_share(s) for s in (0, 9, 10, 15, 20, 99)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]

    def asr_examples(step: int) -> int:
        trainer.step = step
        return sum(ASR_TEMPLATES["en"] in trainer.tokenizer.decode(trainer.example().prompt.text_ids.tolist())
                   for _ in range(200))

    assert asr_examples(5) == 0 and asr_examples(20) == 200 and 60 < asr_examples(15) < 140
    # the TTS share must leave room for dialogues at the largest ASR share of the schedule
    with pytest.raises(ValueError, match=r"tts_share 0.5 must be in 0..0.4"):
        LMTrainer(LMRecipe(size="micro", asr_share_from=0.6, asr_share=0.1, tts_share=0.5), [corpus], tmp_path / "o")
    with pytest.raises(ValueError, match=r"asr_ramp 20..10"):
        LMTrainer(LMRecipe(size="micro", asr_share_from=0.1, asr_ramp=(20, 10)), [corpus], tmp_path / "o")
    with pytest.raises(ValueError, match=r"asr_share_from 1.5 must be in 0..1"):
        LMTrainer(LMRecipe(size="micro", asr_share_from=1.5), [corpus], tmp_path / "o")


def test_wide_voices_are_a_recorded_option_that_keeps_held_out_voices_out(tmp_path):
    """``--voices wide`` adds espeak-ng variants and flite:awb_time to the user voices and draws
    more flite and festival utterances (the held-out voices heard worst are theirs); without it
    the recipe and its draws are those of the corpora made before the option, so they reproduce."""
    def draws(recipe: dialogue.DialogueRecipe) -> list[str]:
        rng = random.Random(3)
        return [recipe.draw_voice(rng) for _ in range(3000)]

    def recipe(*options: str) -> dialogue.DialogueRecipe:
        parser = argparse.ArgumentParser()
        dialogue.add_arguments(parser)
        return dialogue.recipe_of(parser.parse_args(["--out", str(tmp_path), "--seed", "3", *options]))

    default, wide = recipe(), recipe("--voices", "wide")
    assert asdict(default) == asdict(dialogue.DialogueRecipe(seed=3))
    assert default.engine_weights == ENGINE_WEIGHTS and default.extra_voices == ()
    old = {e: [v for v in vs if v != dialogue.AGENT_VOICE and v not in HELD_OUT_VOICES]
           for e, vs in TRAIN_VOICES.items()}
    assert default.user_voices() == old
    seen = draws(wide)
    assert not set(seen) & set(HELD_OUT_VOICES) and dialogue.AGENT_VOICE not in seen
    assert "flite:awb_time" in seen and len(set(seen) - set(draws(default))) > 200
    assert not [v for v in dialogue.WIDE_VOICES if "+f4" in v or "+m6" in v or "+steph" in v]
    assert sum(v.startswith("espeak-ng:") for v in seen) / len(seen) == pytest.approx(0.5, abs=0.04)
    with pytest.raises(ValueError, match="held-out voice"):
        dialogue.DialogueRecipe(extra_voices=("flite:rms",)).user_voices()


def test_formant_shift_is_a_recorded_option_of_the_user_utterances(tmp_path):
    """``--formant-shift LO HI`` moves the formants of ``--formant-share`` of the user utterances
    (more speakers than the installed voices); the recipe records it, the rest of the recipe is the
    default's, and without it nothing is drawn for it."""
    parser = argparse.ArgumentParser()
    dialogue.add_arguments(parser)
    shifted = dialogue.recipe_of(parser.parse_args(["--out", str(tmp_path), "--formant-shift", "0.85", "1.18",
                                                    "--formant-share", "0.5"]))
    assert (shifted.augment.formant_probability, shifted.augment.formant_shift) == (0.5, (0.85, 1.18))
    assert asdict(replace(shifted, augment=AugmentRecipe())) == asdict(dialogue.DialogueRecipe())
    assert dialogue.recipe_of(parser.parse_args(["--out", str(tmp_path)])).augment.formant_probability == 0.0
    rng = random.Random(0)
    drawn = [shifted.augment.draw(rng).formant_shift for _ in range(400)]
    assert sum(f != 1.0 for f in drawn) / len(drawn) == pytest.approx(0.5, abs=0.07)
    assert all(f == 1.0 or 0.85 <= f <= 1.18 for f in drawn)


def test_every_wide_voice_engine_speaks(tmp_path):
    """An espeak-ng variant espeak-ng does not know would fall back to its default voice silently:
    the wide voices must be real, different voices."""
    require_voices()
    sizes = set()
    for voice in ("espeak-ng:en-us+Alex", "espeak-ng:en-gb-x-gbclan+grandma", "espeak-ng:en-us", "flite:awb_time"):
        path = tmp_path / f"{voice.replace(':', '_')}.wav"
        synthesize(voice, "What is three plus four?", path, Augmentation())
        sizes.add(path.read_bytes())
    assert len(sizes) == 4


def test_a_tts_only_corpus_adds_sentences_to_the_dialogue_corpora(corpus, tmp_path):
    """``--tts-only --tts-sentences N``: N lexicon sentences in the agent's voice and nothing else
    (the speech of new sentences is learnt from many sentences), recorded in the manifest, and a
    run reads it next to the dialogue corpora."""
    require_voices()
    tts = tmp_path / "tts"
    assert main(["train", "dialogue-data", "--out", str(tts), "--seed", "9", "--tts-only", "--tts-sentences", "6"]) == 0
    manifest, codes = dialogue.read_corpus(tts)
    assert manifest["command"].endswith(f"--seed 9 --scale 1 --agent-voice {dialogue.AGENT_VOICE} --tts-sentences 6 "
                                        "--tts-only")
    assert manifest["recipe"]["tts_sentences"] == 6 and manifest["recipe"]["multi_turn"] == 0
    assert manifest["users"] == [] and manifest["held_out"] == []
    assert [d["task"] for d in manifest["dialogues"]] == ["tts"] * 6
    assert {a["voice"] for a in manifest["agents"]} == {dialogue.AGENT_VOICE} and len(codes) == len(manifest["agents"])
    trainer = LMTrainer(LMRecipe(size="micro", seed=1, asr_share=0.5, tts_share=0.3), [corpus, tts], tmp_path / "out")
    held = sum(d["task"] == "tts" for d in dialogue.read_corpus(corpus)[0]["dialogues"])
    assert len(trainer.tts_dialogues) == 6 + held
    assert trainer.validation_sets()


def test_asr_sentences_are_user_speech_for_hearing_only(corpus, tmp_path):
    """``--asr-sentences N``: N lexicon sentences in the training user voices (augmented, never a
    held-out voice or the agent's), in no dialogue, drawn last from their own stream so the rest of
    the corpus is the same seed's; ``--asr-only`` makes a corpus of them alone, and a run's ASR
    examples hear them next to the questions."""
    require_voices()
    plain, more, only = tmp_path / "plain", tmp_path / "more", tmp_path / "only"
    assert main(["train", "dialogue-data", "--out", str(plain), "--seed", "4", "--scale", "0.003"]) == 0
    assert main(["train", "dialogue-data", "--out", str(more), "--seed", "4", "--scale", "0.003",
                 "--asr-sentences", "3"]) == 0
    (p, p_codes), (m, m_codes) = dialogue.read_corpus(plain), dialogue.read_corpus(more)
    assert m["command"].endswith(f"--seed 4 --scale 0.003 --agent-voice {dialogue.AGENT_VOICE} --asr-sentences 3")
    assert m["recipe"]["asr_sentences"] == 3
    added = m["users"][len(p["users"]):]
    assert m["users"][: len(p["users"])] == p["users"] and [u["kind"] for u in added] == ["sentence"] * 3
    for name in ("agents", "dialogues", "held_out"):
        assert m[name] == p[name], name
    assert all(np.array_equal(m_codes[k], v) for k, v in p_codes.items())
    used = {t["user"] for d in m["dialogues"] for t in d.get("turns", [])}
    assert not used & {u["key"] for u in added}

    assert main(["train", "dialogue-data", "--out", str(only), "--seed", "9", "--asr-only",
                 "--asr-sentences", "8"]) == 0
    manifest, codes = dialogue.read_corpus(only)
    assert manifest["command"].endswith(f"--seed 9 --scale 1 --agent-voice {dialogue.AGENT_VOICE} --asr-sentences 8 "
                                        "--asr-only")
    assert manifest["dialogues"] == manifest["agents"] == manifest["held_out"] == []
    users = manifest["users"]
    assert len(users) == 8 and {u["kind"] for u in users} == {"sentence"} and len(codes) == 8
    allowed = {v for voices in dialogue.DialogueRecipe().user_voices().values() for v in voices}
    assert {u["voice"] for u in users} <= allowed and not {u["voice"] for u in users} & set(HELD_OUT_VOICES)
    assert any(u["augment"] != Augmentation().to_dict() for u in users)
    for u in users:
        words = u["text"].rstrip(".?").replace(",", "").replace(":", "").lower().split()
        assert set(words) <= WORDS, u["text"]
        assert 0 < len(codes[u["key"]]) == u["frames"]
    trainer = LMTrainer(LMRecipe(size="micro", seed=1, asr_share=1.0), [corpus, only], tmp_path / "out")
    assert len(trainer.users) == len(dialogue.read_corpus(corpus)[0]["users"]) + 8
    heard = " ".join(trainer.tokenizer.decode(trainer.example().prompt.text_ids.tolist()) for _ in range(300))
    assert sum(u["text"] in heard for u in users) >= 4



def test_train_refuses_bad_options_and_missing_corpora_in_one_line(tmp_path, capsys):
    """What a train stage refuses is one line on stderr naming the stage and the problem, exit
    status 2, nothing written: no traceback."""
    refused = {
        ("dialogue-data", "--asr-only"): "mimo-agent train dialogue-data: --asr-only needs --asr-sentences",
        ("dialogue-data", "--asr-sentences", "-1"): "mimo-agent train dialogue-data: --asr-sentences -1 must be >= 0",
        ("dialogue-data", "--asr-only", "--asr-sentences", "2", "--tts-sentences", "2"):
            "mimo-agent train dialogue-data: --asr-only makes no TTS sentences",
        ("dialogue-data", "--tts-sentences", "-2"): "mimo-agent train dialogue-data: --tts-sentences -2 must be >= 0",
        ("dialogue-data", "--formant-shift", "1.2", "0.9"):
            "mimo-agent train dialogue-data: --formant-shift 1.2 0.9 must be LO <= HI within 0.5..2",
        ("dialogue-data", "--formant-shift", "0.9", "1.1", "--formant-share", "0"):
            "mimo-agent train dialogue-data: --formant-share 0 must be in (0, 1]",
        ("dialogue-data", "--formant-share", "0.5"):
            "mimo-agent train dialogue-data: --formant-share needs --formant-shift LO HI",
        ("dialogue-data", "--agent-voice", "flite:rms"):
            "mimo-agent train dialogue-data: --agent-voice flite:rms is a held-out voice",
        ("dialogue-data", "--agent-voice", "kal16"):
            "mimo-agent train dialogue-data: --agent-voice: voice 'kal16' must",
        ("lm", "--data", str(tmp_path / "missing")):
            f"mimo-agent train lm: {tmp_path / 'missing' / 'manifest.json'} not found",
    }
    for i, (argv, message) in enumerate(refused.items()):
        out = tmp_path / f"out{i}"
        assert main(["train", *argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists() or not any(out.iterdir()), argv


def test_corpora_of_different_codecs_cannot_train_one_lm(corpus, tmp_path):
    """An LM reads and writes one codec's codes: corpora encoded by two codecs (or a corpus of one
    codec and ``--init`` weights trained on another's) are refused by name, not mixed silently."""
    packaged = load_audio_tokenizer(dialogue.DEFAULT_CODEC, dtype="fp32", device="cpu")
    assert json.loads((corpus / "manifest.json").read_text())["codec_digest"] == packaged.codes_digest()
    # another codec: the same architecture with other weights (a decoder-only change keeps the digest)
    other_codec = load_audio_tokenizer(preset="tiny-speech", seed=3, dtype="fp32", device="cpu")
    assert other_codec.codes_digest() != packaged.codes_digest()
    decoder_only = load_audio_tokenizer(dialogue.DEFAULT_CODEC, dtype="fp32", device="cpu")
    torch.nn.init.zeros_(next(decoder_only.decoder.parameters()))
    assert decoder_only.codes_digest() == packaged.codes_digest()
    codec_dir = save_audio_tokenizer(other_codec, tmp_path / "other-codec")
    other = tmp_path / "other"
    assert main(["train", "dialogue-data", "--out", str(other), "--seed", "6", "--scale", "0.003",
                 "--codec", str(codec_dir)]) == 0
    assert json.loads((other / "manifest.json").read_text())["codec_digest"] == other_codec.codes_digest()
    with pytest.raises(ValueError, match=rf"{other} and {corpus} hold the codes of different codecs"):
        LMTrainer(LMRecipe(size="micro"), [corpus, other], tmp_path / "mixed")
    first = tmp_path / "first"
    assert main(["train", "lm", "--data", str(corpus), *TINY, "--out", str(first), "--steps", "1"]) == 0
    with pytest.raises(ValueError, match=r"--init .*first's corpus\) hold the codes of different codecs"):
        LMTrainer(LMRecipe(size="micro"), [other], tmp_path / "again", init=first)
    LMTrainer(LMRecipe(size="micro"), [corpus, corpus], tmp_path / "same")  # one codec twice: fine


def test_the_agent_voice_is_a_recorded_option_and_one_lm_speaks_in_one(corpus, tmp_path):
    """``--agent-voice V``: the agent speaks in V (recorded in the recipe and the command), V leaves
    the user voices and the default agent voice joins them, each draw of the same engine as before
    (the rest of the corpus draws what the same seed drew); corpora of two agent voices cannot train
    one LM, and a trained LM says which voice it speaks in (what ``bench-quality``'s ceiling is
    measured on)."""
    require_voices()
    voice = "flite:slt"  # not the default
    parser = argparse.ArgumentParser()
    dialogue.add_arguments(parser)
    chosen = dialogue.recipe_of(parser.parse_args(["--out", str(tmp_path), "--agent-voice", voice]))
    default = dialogue.recipe_of(parser.parse_args(["--out", str(tmp_path)]))
    assert chosen.agent_voice == voice and default.agent_voice == dialogue.AGENT_VOICE != voice
    assert voice not in chosen.user_voices()["flite"] and dialogue.AGENT_VOICE in chosen.user_voices()["flite"]

    def draws(recipe: dialogue.DialogueRecipe) -> list[str]:
        rng = random.Random(4)
        return [recipe.draw_voice(rng) for _ in range(2000)]

    assert [v.split(":")[0] for v in draws(default)] == [v.split(":")[0] for v in draws(chosen)]
    assert voice not in draws(chosen) and dialogue.AGENT_VOICE in draws(chosen)

    other = tmp_path / "other"
    assert main(["train", "dialogue-data", "--out", str(other), "--seed", "6", "--scale", "0.003",
                 "--agent-voice", voice]) == 0
    manifest = json.loads((other / "manifest.json").read_text())
    assert f"--scale 0.003 --agent-voice {voice}" in manifest["command"] and manifest["recipe"]["agent_voice"] == voice
    assert {a["voice"] for a in manifest["agents"]} == {voice}
    assert voice not in {u["voice"] for u in manifest["users"]}
    with pytest.raises(ValueError, match=rf"{other}'s agent speaks in {voice} and {corpus}'s in "
                                         rf"{dialogue.AGENT_VOICE}: the model speaks in one voice"):
        LMTrainer(LMRecipe(size="micro"), [corpus, other], tmp_path / "mixed")
    run = tmp_path / "run"
    assert main(["train", "lm", "--data", str(other), *TINY, "--out", str(run), "--steps", "1"]) == 0
    assert trained_agent_voice(run) == voice
    assert trained_agent_voice(tmp_path) is None  # no training record: a preset, an official checkpoint


def test_typed_questions_vary_as_people_type_them():
    rng = random.Random(0)
    seen = {typed_text("What is three plus four?", rng) for _ in range(200)}
    assert {"What is three plus four?", "what is 3 plus 4", "What is 3 plus 4?", "what is three plus four?"} <= seen
    # the word to repeat is the answer: never turned into digits
    assert {typed_text("Repeat after me: seven.", rng).lower().rstrip(".") for _ in range(50)} == {
        "repeat after me: seven"}


def test_training_forward_is_the_serving_computation(parts):
    manifest, codes, builder, lm = parts
    seq = SequenceBuilder(builder, codes).dialogue(manifest["dialogues"][0]["turns"], DEFAULT_SYSTEM_PROMPT)
    text_ids, patch_codes = seq.prompt.batch()
    with torch.no_grad():
        assert torch.allclose(embed_speech_patches(lm, text_ids, patch_codes), embed_patches(lm, text_ids, patch_codes),
                              atol=1e-6)
        h = backbone_hidden(lm, text_ids, patch_codes)[0]
    cache = lm.allocate_cache(1, len(seq.prompt) + 1)
    served = lm.prefill(cache, 0, lm.embed_patches(text_ids, patch_codes))
    assert torch.allclose(h[-1], served[0], atol=1e-4)
    # the teacher-forced patch decoder, fed its own greedy codes, predicts each of them
    greedy = lm.decode_patch(h[-3:])  # (3, G, C)
    with torch.no_grad():
        logits = patch_decoder_logits(lm, h[-3:], greedy)
    sched = lm.schedule
    picked = [(f, c) for t in range(sched.steps) for c, f in zip(sched.channels[t], sched.frames[t], strict=True)]
    for (f, c), step_logits in zip(picked, logits, strict=True):
        assert torch.equal(step_logits.argmax(-1), greedy[:, f, c]), (f, c)


def test_a_batch_run_in_length_groups_gives_the_padded_batch_s_losses_and_gradients(corpus, tmp_path):
    """The short ASR examples and the long dialogues of a batch run trimmed, in two groups: the
    same losses and gradients as the whole batch padded to its longest row, on fewer positions."""
    trainer = LMTrainer(LMRecipe(size="micro", seed=3, asr_share=0.5), [corpus], tmp_path / "out")
    batch = trainer.batch()
    lengths = batch["lengths"].tolist()
    groups = length_groups(lengths)
    assert len(groups) == 2 and sorted(groups[0] + groups[1]) == list(range(len(lengths)))
    assert max(lengths[i] for i in groups[0]) <= min(lengths[i] for i in groups[1])
    grouped = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert grouped <= 0.8 * len(lengths) * max(lengths), (grouped, lengths)

    def run(b):
        trainer.lm.zero_grad(set_to_none=True)
        out = losses(trainer.lm, b)
        out["loss"].backward()
        return out, {n: p.grad.clone() for n, p in trainer.lm.named_parameters() if p.grad is not None}

    trainer.lm.eval()  # no dropout: the two runs must see the same function
    split, split_grads = run(batch)
    whole, whole_grads = run({k: v for k, v in batch.items() if k != "lengths"})
    for k in whole:
        assert torch.allclose(split[k], whole[k], rtol=1e-5, atol=1e-6), k
    assert split_grads.keys() == whole_grads.keys()
    for n in whole_grads:
        assert torch.allclose(split_grads[n], whole_grads[n], rtol=1e-4, atol=1e-6), n


def test_loss_goes_down_resume_is_exact_and_the_checkpoint_answers(corpus, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ["train", "lm", "--data", str(corpus), *TINY, "--text-user-share", "0.5", "--validate-every", "4"]
    assert main([*args, "--out", str(straight), "--steps", "16"]) == 0
    assert main([*args, "--out", str(split), "--steps", "16", "--stop-at", "5"]) == 0  # saved at 5
    assert main([*args, "--out", str(split), "--steps", "16", "--resume"]) == 0
    a, b = (load_lm(d, dtype="fp32", device="cpu")[0].state_dict() for d in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # validated every 4 steps on the held-out questions, spoken and typed; the best one kept apart
    validation = json.loads((straight / "training.json").read_text())["validation"]
    assert [v["step"] for v in validation["history"]] == [4, 8, 12, 16]
    assert validation == json.loads((split / "training.json").read_text())["validation"]
    best = validation["best"]
    assert {"spoken_acc", "typed_acc", "spoken_text", "typed_text"} < set(best)
    assert best == max(validation["history"], key=lambda v: (v["spoken_acc"] + v["typed_acc"], -v["spoken_text"]))
    assert json.loads((straight / BEST / "training.json").read_text())["steps"] == best["step"]
    load_lm(straight / BEST, dtype="fp32", device="cpu")
    rows = [line.split("\t") for line in (straight / "losses.tsv").read_text().splitlines()[1:]]
    assert float(rows[-1][2]) < float(rows[0][2]) - 0.5, rows
    manifest = json.loads((straight / "training.json").read_text())
    assert manifest["steps"] == 16 and manifest["command"].startswith("mimo-agent train lm")
    assert manifest["data"][0]["recipe"]["seed"] == 5 and set(manifest["final_losses"]) >= {"text", "speech"}
    # a run can start from another's weights and tokenizer; this one hears the user's coarse
    # codebook only (recorded in config.json, so that serving reads the same) and does more ASR
    again = tmp_path / "again"
    assert main([*args, "--out", str(again), "--steps", "2", "--init", str(straight), "--input-codebooks", "1",
                 "--asr-share", "0.5", "--asr-share-from", "0.1", "--asr-ramp", "1", "2", "--tts-share", "0.25"]) == 0
    assert (again / "tokenizer.json").read_text() == (straight / "tokenizer.json").read_text()
    again_manifest = json.loads((again / "training.json").read_text())
    assert again_manifest["init"]["training"]["steps"] == 16
    assert again_manifest["recipe"]["input_codebooks"] == 1 and again_manifest["recipe"]["asr_share"] == 0.5
    assert again_manifest["recipe"]["tts_share"] == 0.25 and manifest["recipe"]["tts_share"] is None
    assert again_manifest["recipe"]["asr_share_from"] == 0.1 and again_manifest["recipe"]["asr_ramp"] == [1, 2]
    assert "--asr-share 0.5 --asr-share-from 0.1 --asr-ramp 1 2 --tts-share 0.25 --input-codebooks 1" \
        in again_manifest["command"]
    assert load_lm(again, dtype="fp32", device="cpu")[0].config.input_speech_codebooks == 1
    assert load_lm(straight, dtype="fp32", device="cpu")[0].config.input_speech_codebooks is None
    # the official layout, served by the offline dialogue command with the shipped codec
    held_out = json.loads((corpus / "manifest.json").read_text())["held_out"][0]
    capsys.readouterr()
    assert main(["dialogue", "--model", str(straight), "--tokenizer", dialogue.DEFAULT_CODEC, "--input",
                 str(corpus / held_out["file"]), "--greedy", "--max-patches", "12"]) == 0
    assert "patches" in capsys.readouterr().err
