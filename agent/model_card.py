"""What the loaded model is and what to expect of it: the ``serve`` start-up line, ``/healthz``
and the demo page all say it from one :class:`ModelCard`.

A checkpoint may carry its own card, ``model_card.json`` next to its ``config.json``::

    {"summary": "answers arithmetic questions about numbers up to ten",
     "examples": ["what is three plus four?", "what comes after seven?"]}

(``summary``: one sentence on what it does, ``examples``: things to say to it, which the demo
offers as prompts). A checkpoint without one is described as a MiMo-Audio checkpoint; the
presets' random weights are said to be random, with no examples, since nothing they say means
anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODEL_CARD_NAME = "model_card.json"
#: the longest summary and example, and the most examples, a card may hold (the page shows them all)
MAX_SUMMARY_CHARS = 300
MAX_EXAMPLE_CHARS = 120
MAX_EXAMPLES = 12

RANDOM_WEIGHTS_SUMMARY = (
    "random weights: every stage runs for real, but what it says is noise and babble, and its "
    "transcripts are random characters; nothing it answers means anything (serve a trained "
    "checkpoint with --model and --tokenizer for that)"
)
CHECKPOINT_SUMMARY = "a MiMo-Audio checkpoint: it listens to speech and answers in speech, with a transcript"
#: the packaged ``tiny-speech`` preset: what it was trained on (``mimo-agent train lm``), so what to ask it
TINY_SPEECH_SUMMARY = (
    "a tiny model trained on a closed domain: greetings, adding and subtracting numbers up to ten, what comes "
    "after a number, repeating a word, and \"and plus one more?\" on the last answer; it answers in words. "
    "Typed questions it gets right; spoken ones in a voice it never heard about eight times in ten. It does not "
    "read a text aloud (tts speaks in its voice, not the words). English only"
)
TINY_SPEECH_EXAMPLES = (
    "What is three plus four?", "What is nine minus two?", "What comes after seven?", "Repeat after me: garden.",
    "Hello, how are you?", "And plus one more?",
)


class ModelCardError(ValueError):
    """A ``model_card.json`` that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    #: "random" (a preset's seeded initialisation) or "trained"
    weights: str
    summary: str
    examples: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        return {**asdict(self), "examples": list(self.examples)}

    def describe(self) -> str:
        """One line for the terminal."""
        line = f"{self.name}: {self.summary}"
        if self.examples:
            line += "; try saying: " + " / ".join(f'"{e}"' for e in self.examples[:3])
        return line


def model_card(model: str | None, preset: str | None, packaged: str | None) -> ModelCard:
    """The card of what is loaded: the packaged trained preset ``packaged`` (its LM checkpoint
    directory ``model``), else the random-weight preset ``preset`` when ``model`` is None, else the
    checkpoint ``model`` (a directory or a hub id already fetched)."""
    if packaged is not None:
        return packaged_card(model, f"mimo-audio-{packaged}")
    if model is None:
        return preset_card(f"mimo-audio-{preset}" if preset == "tiny" else preset)
    from agent.checkpoint import resolve_checkpoint_dir

    return checkpoint_card(resolve_checkpoint_dir(model), Path(model.rstrip("/")).name or model)


def preset_card(name: str) -> ModelCard:
    """The card of a built-in preset (seeded random weights)."""
    return ModelCard(name=name, weights="random", summary=RANDOM_WEIGHTS_SUMMARY)


def packaged_card(directory: str | os.PathLike, name: str) -> ModelCard:
    """The card of a packaged trained preset: its directory's ``model_card.json``, else what it was
    trained to do (the ``tiny-speech`` domain)."""
    if (Path(directory) / MODEL_CARD_NAME).is_file():
        return checkpoint_card(directory, name)
    return ModelCard(name=name, weights="trained", summary=TINY_SPEECH_SUMMARY, examples=TINY_SPEECH_EXAMPLES)


def checkpoint_card(directory: str | os.PathLike, name: str) -> ModelCard:
    """The card of the checkpoint in ``directory``: its ``model_card.json``, else a plain description."""
    path = Path(directory) / MODEL_CARD_NAME
    if not path.is_file():
        return ModelCard(name=name, weights="trained", summary=CHECKPOINT_SUMMARY)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{path}: cannot read it as JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelCardError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    summary = raw.get("summary", CHECKPOINT_SUMMARY)
    if not isinstance(summary, str) or not summary.strip() or len(summary) > MAX_SUMMARY_CHARS:
        raise ModelCardError(f"{path}: summary must be a non-empty string of at most {MAX_SUMMARY_CHARS} "
                             f"characters, got {summary!r:.80}")
    examples = raw.get("examples", [])
    if (not isinstance(examples, list) or len(examples) > MAX_EXAMPLES
            or not all(isinstance(e, str) and e.strip() and len(e) <= MAX_EXAMPLE_CHARS for e in examples)):
        raise ModelCardError(f"{path}: examples must be a list of at most {MAX_EXAMPLES} non-empty strings of at "
                             f"most {MAX_EXAMPLE_CHARS} characters, got {examples!r:.80}")
    return ModelCard(name=name, weights="trained", summary=summary.strip(), examples=tuple(e.strip() for e in examples))
