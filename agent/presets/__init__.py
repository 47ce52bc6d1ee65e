"""The built-in models whose weights ship in the package, in the official checkpoint layout.

``tiny-speech`` is the language model in ``tiny-speech/`` (``config.json``, ``model.safetensors``,
``tokenizer.json``) with the audio tokenizer in ``tiny-speech-codec/``, both trained here
(``mimo-agent train ...``) on a closed spoken domain. They load through the same code as a
downloaded checkpoint (:func:`agent.checkpoint.load_lm`, :func:`agent.codec.load_audio_tokenizer`):
a packaged preset *is* a checkpoint, only its place is known. Presets with random weights
(``tiny``, ``mimo-audio-7b``) are built in code instead (:func:`agent.lm.model.build_preset`).

No torch here: ``serve --help`` lists the presets without loading anything.
"""

from __future__ import annotations

from pathlib import Path

#: where the packaged presets live (tests point it at a stand-in directory)
PRESETS_DIR = Path(__file__).resolve().parent
#: packaged preset -> (its LM directory, its audio tokenizer directory), under :data:`PRESETS_DIR`
TRAINED_PRESETS = {"tiny-speech": ("tiny-speech", "tiny-speech-codec")}
#: presets built in code with seeded random weights
RANDOM_PRESETS = ("tiny", "mimo-audio-7b")
ALL_PRESETS = (*TRAINED_PRESETS, *RANDOM_PRESETS)
#: what a directory needs to count as packaged (the weights may be missing from a source checkout)
REQUIRED_FILES = ("config.json", "model.safetensors")


class PresetMissing(FileNotFoundError):
    """A packaged preset asked for by name whose files are not in this install."""


def preset_dirs(name: str) -> tuple[Path, Path]:
    """The (LM, audio tokenizer) directories of the packaged preset ``name``; raises
    :class:`PresetMissing` naming the missing file when this install lacks them."""
    if name not in TRAINED_PRESETS:
        raise ValueError(f"{name!r} is not a packaged preset; those are: {', '.join(TRAINED_PRESETS)}")
    dirs = tuple(PRESETS_DIR / part for part in TRAINED_PRESETS[name])
    for directory in dirs:
        for file in REQUIRED_FILES:
            if not (directory / file).is_file():
                raise PresetMissing(f"the {name} preset's weights are not in this install ({directory / file} is "
                                    f"missing); use --preset tiny (random weights) or --model DIR")
    return dirs  # type: ignore[return-value]


def is_packaged(name: str) -> bool:
    try:
        preset_dirs(name)
    except PresetMissing:
        return False
    return True


def default_preset() -> str:
    """``tiny-speech`` (the trained model) when its weights are packaged, else ``tiny`` (random weights)."""
    return "tiny-speech" if is_packaged("tiny-speech") else "tiny"
