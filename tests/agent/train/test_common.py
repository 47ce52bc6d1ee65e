"""The pieces both training commands share."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.train.common import check_resume_recipe, run_record


@dataclass
class _Recipe:
    seed: int = 0
    steps: int = 100
    lr: float = 1e-3
    tts_share: float | None = None  # a field "a later version added"


def test_resume_with_another_recipe_is_refused_naming_the_changed_fields():
    saved = {"seed": 0, "steps": 100, "lr": 1e-3, "tts_share": None}
    check_resume_recipe(dict(saved), _Recipe(), Path("run/train_state.pt"))  # same recipe: accepted
    with pytest.raises(ValueError, match=r"run/train_state.pt .*changed: lr, steps\)"):
        check_resume_recipe(saved, _Recipe(steps=200, lr=2e-3), Path("run/train_state.pt"))
    with pytest.raises(ValueError, match=r"changed: batch\)"):
        check_resume_recipe({**saved, "batch": 8}, _Recipe(), Path("s.pt"))
    # a run saved before a field existed ran with its default, whatever that default is
    old = {"seed": 0, "steps": 100, "lr": 1e-3}
    check_resume_recipe(old, _Recipe(), Path("s.pt"))
    with pytest.raises(ValueError, match=r"changed: tts_share\)"):
        check_resume_recipe(old, _Recipe(tts_share=0.2), Path("s.pt"))
    check_resume_recipe({k: v for k, v in saved.items() if k != "lr"}, _Recipe(), Path("s.pt"))
    with pytest.raises(ValueError, match=r"changed: lr\)"):
        check_resume_recipe({k: v for k, v in saved.items() if k != "lr"}, _Recipe(lr=2e-3), Path("s.pt"))


def test_run_record_reports_the_mean_of_the_last_losses():
    record = run_record(7, [{"text": 1.0, "speech": 3.0}, {"text": 2.0, "speech": 5.0}], 12.34)
    assert record["steps"] == 7
    assert record["final_losses"] == {"text": 1.5, "speech": 4.0}
    assert record["train_seconds"] == 12.3
    assert record["threads"] >= 1 and record["torch"]
