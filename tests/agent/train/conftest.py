"""A small corpus of the real synthesisers, shared by the training tests.

The voices come from Debian packages (``.ci/run`` installs them): without them these tests skip
saying what is missing, and fail instead under ``MIMO_REQUIRE_VOICES=1`` (CI sets it).
"""

from __future__ import annotations

import os
import shutil

import pytest

from agent.train.data import CorpusRecipe, generate
from agent.train.voices import PACKAGES


def require_voices() -> None:
    missing = [tool for tool in ("espeak-ng", "flite", "festival", "text2wave", "sox") if shutil.which(tool) is None]
    if missing:
        packages = " ".join(dict.fromkeys(PACKAGES.get(t, "festival") for t in missing))
        message = f"{', '.join(missing)} not installed (apt-get install {packages})"
        if os.environ.get("MIMO_REQUIRE_VOICES") == "1":
            pytest.fail(f"voice tests required but {message}", pytrace=False)
        pytest.skip(message)


#: the smallest corpus with every held-out voice and a few training utterances
SMALL = {"train_minutes": 0.1, "held_out_per_voice": 1}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    require_voices()
    out = tmp_path_factory.mktemp("corpus")
    generate(out, CorpusRecipe(seed=3, **SMALL), log=lambda _: None)
    return out
