"""The speech corpus the built-in codec is trained on: ``mimo-agent train data``.

Sentences from :class:`agent.train.lexicon.SentenceGenerator`, each spoken by a voice drawn from
:data:`TRAIN_VOICES` (espeak-ng accents x variants, flite, festival) with a drawn augmentation
(pitch, tempo, room, level), written as 24 kHz pcm16 WAVs. :data:`HELD_OUT_VOICES` never occur in
the training split: they make the ``held_out`` split the evaluation uses. Everything is drawn from
the seed (one ``random.Random`` per utterance), so the same seed and tools give the same bytes;
``manifest.json`` records the recipe, the tool versions and every utterance.
"""

from __future__ import annotations

import json
import random
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..codec.audio import load_wav
from .common import read_manifest_of
from .lexicon import SentenceGenerator
from .voices import Augmentation, synthesize, tool_versions

MANIFEST = "manifest.json"
FORMAT = "mimo-agent speech corpus"
SPLITS = ("train", "held_out")

ESPEAK_ACCENTS = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)
ESPEAK_VARIANTS = (
    "", "m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f5", "Andy", "annie", "belinda", "benjamin",
    "david", "linda", "robert", "paul", "quincy", "travis", "edward", "victor", "klatt",
)
#: held-out variants and speakers: never in the training split
HELD_OUT_VOICES = (
    "espeak-ng:en-gb-x-rp+f4", "espeak-ng:en-us+m6", "espeak-ng:en-gb-scotland+steph", "flite:rms",
    "festival:ked_diphone",
)
TRAIN_VOICES = {
    "espeak-ng": tuple(
        f"espeak-ng:{a}+{v}" if v else f"espeak-ng:{a}" for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS
    ),
    "flite": ("flite:kal", "flite:kal16", "flite:awb", "flite:slt"),
    "festival": ("festival:kal_diphone", "festival:cmu_us_slt_arctic_hts"),
}
#: share of training utterances per engine (festival is the slowest to run)
ENGINE_WEIGHTS = {"espeak-ng": 0.6, "flite": 0.25, "festival": 0.15}


@dataclass
class AugmentRecipe:
    """Ranges the per-utterance augmentation is drawn from (uniformly)."""

    pitch_probability: float = 0.7
    pitch_cents: tuple[float, float] = (-300.0, 300.0)
    tempo: tuple[float, float] = (0.85, 1.2)
    room_probability: float = 0.4
    reverberance: tuple[float, float] = (10.0, 70.0)
    room_scale: tuple[float, float] = (10.0, 100.0)
    pre_delay_ms: tuple[float, float] = (0.0, 30.0)
    peak_db: tuple[float, float] = (-12.0, -1.0)
    #: share of utterances whose formants move (:func:`~.voices.shift_formants`), and by how much;
    #: at 0 nothing is drawn for it, so a recipe without it draws what it always drew
    formant_probability: float = 0.0
    formant_shift: tuple[float, float] = (0.85, 1.18)

    def draw(self, rng: random.Random) -> Augmentation:
        pitch = round(rng.uniform(*self.pitch_cents)) if rng.random() < self.pitch_probability else 0.0
        tempo = round(rng.uniform(*self.tempo), 3)
        room = rng.random() < self.room_probability
        reverb, scale, delay = (round(rng.uniform(*r)) for r in (self.reverberance, self.room_scale, self.pre_delay_ms))
        peak = round(rng.uniform(*self.peak_db), 1)
        formants = 1.0
        if self.formant_probability > 0 and rng.random() < self.formant_probability:
            formants = round(rng.uniform(*self.formant_shift), 3)
        return Augmentation(
            pitch_cents=pitch, tempo=tempo, reverb=reverb if room else 0.0, room_scale=scale if room else 0.0,
            pre_delay_ms=delay if room else 0.0, peak_db=peak, formant_shift=formants,
        )


@dataclass
class CorpusRecipe:
    seed: int = 0
    train_minutes: float = 20.0
    held_out_per_voice: int = 8
    held_out_voices: tuple[str, ...] = HELD_OUT_VOICES
    train_voices: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(TRAIN_VOICES))
    engine_weights: dict[str, float] = field(default_factory=lambda: dict(ENGINE_WEIGHTS))
    augment: AugmentRecipe = field(default_factory=AugmentRecipe)
    sample_rate: int = 24000

    def __post_init__(self) -> None:
        overlap = set(self.held_out_voices) & {v for vs in self.train_voices.values() for v in vs}
        if overlap:
            raise ValueError(f"held-out voices also in the training voices: {sorted(overlap)}")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _duration(path: Path) -> float:
    with wave.open(str(path), "rb") as f:
        return f.getnframes() / f.getframerate()


def generate(out: str | Path, recipe: CorpusRecipe, *, log=print) -> dict:
    """Write the corpus of ``recipe`` under ``out`` (``train/``, ``held_out/``, ``manifest.json``)."""
    out = Path(out)
    items: list[dict] = []
    started = time.monotonic()
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    # held-out first: its size is fixed, the training split runs to a duration
    texts = SentenceGenerator(recipe.seed * 2 + 1)
    index = 0
    for voice in recipe.held_out_voices:
        for _ in range(recipe.held_out_per_voice):
            items.append(_utterance(out, "held_out", index, voice, " ".join(texts.sentences(2)), recipe))
            index += 1
    texts = SentenceGenerator(recipe.seed * 2)
    engines, weights = zip(*recipe.engine_weights.items(), strict=True)
    total, index = 0.0, 0
    while total < recipe.train_minutes * 60:
        rng = random.Random(f"{recipe.seed}/voice/{index}")
        voice = rng.choice(recipe.train_voices[rng.choices(engines, weights)[0]])
        text = " ".join(texts.sentences(rng.randint(1, 3)))
        item = _utterance(out, "train", index, voice, text, recipe)
        items.append(item)
        total += item["seconds"]
        index += 1
        if index % 100 == 0:
            log(f"train: {index} utterances, {total / 60:.1f} of {recipe.train_minutes:g} min")
    manifest = {
        "format": FORMAT,
        "version": 1,
        "command": f"mimo-agent train data --out DIR --seed {recipe.seed} --minutes {recipe.train_minutes:g} "
                   f"--held-out-per-voice {recipe.held_out_per_voice}",
        "recipe": recipe.to_dict(),
        "tools": tool_versions(),
        "minutes": {s: round(sum(i["seconds"] for i in items if i["split"] == s) / 60, 3) for s in SPLITS},
        "utterances": items,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"wrote {len(items)} utterances to {out} in {time.monotonic() - started:.0f} s: {manifest['minutes']}")
    return manifest


def _utterance(out: Path, split: str, index: int, voice: str, text: str, recipe: CorpusRecipe) -> dict:
    augment = recipe.augment.draw(random.Random(f"{recipe.seed}/{split}/{index}"))
    rel = f"{split}/{index:05d}.wav"
    synthesize(voice, text, out / rel, augment, recipe.sample_rate)
    return {"file": rel, "split": split, "voice": voice, "text": text, "augment": augment.to_dict(),
            "seconds": round(_duration(out / rel), 4)}


# --- reading ---------------------------------------------------------------------------------------
def read_manifest(corpus: str | Path) -> dict:
    return read_manifest_of(Path(corpus) / MANIFEST, FORMAT, f"mimo-agent train data --out {corpus}")


def split_entries(corpus: str | Path, split: str) -> list[dict]:
    """The manifest entries of ``split``, in the manifest's order (what seeded draws index)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [u for u in read_manifest(corpus)["utterances"] if u["split"] == split]


def load_entries(corpus: str | Path, entries: list[dict], sample_rate: int = 24000) -> list[tuple[dict, np.ndarray]]:
    """(manifest entry, float32 audio) of each entry."""
    return [(u, load_wav(Path(corpus) / u["file"], sample_rate)) for u in entries]


def load_split(corpus: str | Path, split: str, sample_rate: int = 24000) -> list[tuple[dict, np.ndarray]]:
    """(manifest entry, float32 audio) of each utterance of ``split``."""
    return load_entries(corpus, split_entries(corpus, split), sample_rate)


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="corpus directory to write (train/, held_out/, manifest.json)")
    parser.add_argument("--seed", type=int, default=0, help="draws sentences, voices and augmentation (default 0)")
    parser.add_argument("--minutes", type=float, default=20.0, help="minutes of training speech (default 20)")
    parser.add_argument("--held-out-per-voice", type=int, default=8,
                        help=f"utterances per held-out voice (default 8; voices: {', '.join(HELD_OUT_VOICES)})")


def run(args) -> int:
    recipe = CorpusRecipe(seed=args.seed, train_minutes=args.minutes, held_out_per_voice=args.held_out_per_voice)
    generate(args.out, recipe)
    return 0
