"""The pieces both training commands share."""

from pathlib import Path

import pytest

from agent.train.common import check_resume_recipe, run_record


def test_resume_with_another_recipe_is_refused_naming_the_changed_fields():
    saved = {"seed": 0, "steps": 100, "lr": 1e-3}
    check_resume_recipe(dict(saved), saved, Path("run/train_state.pt"))  # same recipe: accepted
    with pytest.raises(ValueError, match=r"run/train_state.pt .*changed: lr, steps\)"):
        check_resume_recipe(saved, {"seed": 0, "steps": 200, "lr": 2e-3}, Path("run/train_state.pt"))
    with pytest.raises(ValueError, match=r"changed: batch\)"):
        check_resume_recipe(saved, {**saved, "batch": 8}, Path("s.pt"))
    # a field a later version added, at its default (None), resumes a run saved before it existed
    check_resume_recipe(saved, {**saved, "tts_share": None}, Path("s.pt"))
    with pytest.raises(ValueError, match=r"changed: tts_share\)"):
        check_resume_recipe(saved, {**saved, "tts_share": 0.2}, Path("s.pt"))


def test_run_record_reports_the_mean_of_the_last_losses():
    record = run_record(7, [{"text": 1.0, "speech": 3.0}, {"text": 2.0, "speech": 5.0}], 12.34)
    assert record["steps"] == 7
    assert record["final_losses"] == {"text": 1.5, "speech": 4.0}
    assert record["train_seconds"] == 12.3
    assert record["threads"] >= 1 and record["torch"]
