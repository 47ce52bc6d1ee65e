"""The trained ``tiny-speech`` language model committed under ``agent/presets/``: it loads through
the official-layout loader with its own ``tokenizer.json``, as a MiMo-Audio checkpoint does, and
fits the package's size budget with its codec."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from agent.checkpoint import load_lm
from agent.codec.audio import load_wav
from agent.lm.tokenizer import MIMO_ADDED_TOKENS, REQUIRED_TOKENS
from agent.train.lexicon import WORDS
from agent.train.lm import SIZES
from streaming.cli import main

PRESETS = Path(__file__).resolve().parents[3] / "agent" / "presets"
TRAINED = PRESETS / "tiny-speech"
CODEC = PRESETS / "tiny-speech-codec"
SPEECH = Path(__file__).resolve().parents[2] / "data" / "codec" / "speech_en.wav"  # espeak-ng: not the domain


def test_the_trained_lm_loads_as_an_official_checkpoint():
    _, config, tokenizer = load_lm(TRAINED, dtype="fp32", device="cpu")
    for name, value in SIZES["tiny-speech"].items():
        assert getattr(config, name) == value, name
    assert config.speech_vocab_sizes == (1025, 1025, 129, 129, 129, 129, 129, 129)
    assert config.delays == tuple(range(8)) and config.group_size == 4
    # the special tokens follow the vocabulary in the official order, none added by the loader
    ids = [tokenizer.token_id(t) for t in (*REQUIRED_TOKENS, *MIMO_ADDED_TOKENS)]
    assert ids == list(range(ids[0], ids[0] + len(ids))) and not tokenizer.added_tokens
    assert tokenizer.decode(tokenizer.encode("What is three plus four? seven")) == "What is three plus four? seven"
    training = json.loads((TRAINED / "training.json").read_text())
    assert training["steps"] > 0 and {"text", "speech"} <= set(training["final_losses"])
    assert training["command"].startswith("mimo-agent train lm")
    assert (TRAINED / "losses.tsv").is_file()
    size = sum(p.stat().st_size for d in (TRAINED, CODEC) for p in d.iterdir())
    assert size <= 32 * 2**20, f"the built-in model and codec weigh {size / 2**20:.1f} MiB"


def test_the_trained_lm_answers_in_the_domain_format_and_stops(tmp_path, capsys):
    """Whatever it understood, the answer is what it was trained to say: words of the domain as
    text, then speech, then ``<|eostm|>`` (random weights babble until the budget runs out).
    Whether the answer is *right* is measured by ``mimo-agent bench-quality``."""
    out = tmp_path / "answer.wav"
    capsys.readouterr()
    assert main(["dialogue", "--model", str(TRAINED), "--tokenizer", str(CODEC), "--input", str(SPEECH),
                 "--greedy", "--threads", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    words = re.findall(r"[a-z]+", captured.out.lower())
    assert words and set(words) <= WORDS, captured.out
    assert "stop: stop_token" in captured.err, captured.err
    speech = int(re.search(r"\((\d+) speech", captured.err).group(1))
    assert speech >= 3 and np.abs(load_wav(out)).max() > 0.05


def test_the_default_server_answers_the_pages_typed_example_prompts():
    """The demo's example prompts, typed (``input_text``, as the page sends a click) to a real
    server running the default model: each answer is the one the domain's rules compute from the
    question (:func:`agent.train.dialogue.answer`), and the follow-up one more than the question
    before it. The model was trained on typed turns too (``--text-user-share``); spoken questions
    in new voices are measured, not promised, by ``mimo-agent bench-quality``."""
    import asyncio

    from agent.model_card import TINY_SPEECH_EXAMPLES
    from agent.quality.recognize import normalize
    from agent.train.dialogue import answer, questions
    from streaming.client import connect
    from tests.streaming.live_server import start_server

    known = {q.text: q for qs in questions().values() for q in qs}
    asked = [e for e in TINY_SPEECH_EXAMPLES if known[e].kind != "follow_up"]
    follow_up = next(e for e in TINY_SPEECH_EXAMPLES if known[e].kind == "follow_up")

    async def ask(url: str, texts: list[str]) -> list[str]:
        async with await connect(url) as client:
            out = []
            for text in texts:
                await client.send_text(text)
                await client.create_response()
                result = await client.collect_response(timeout=60)
                out.append(result.transcript or result.text)
            return out

    live = start_server(default_model=True)
    try:
        assert live.runtime.info["preset"] == "tiny-speech"
        for text in asked:
            expected, value = answer(known[text])
            turns = [text, follow_up] if value is not None else [text]
            got = asyncio.run(ask(live.ws_url, turns))
            assert normalize(got[0]) == normalize(expected), (text, got)
            if value is not None:
                assert normalize(got[1]) == normalize(answer(known[follow_up], value)[0]), (turns, got)
    finally:
        live.stop()
