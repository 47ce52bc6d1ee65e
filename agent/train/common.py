"""Pieces the training commands share: the learning-rate schedule, the losses a manifest
reports, and reading a corpus manifest."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def warmup_cosine(step: int, warmup: int, steps: int, final_fraction: float) -> float:
    """The learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, then a cosine
    down to ``final_fraction`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def mean_losses(history: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each loss over ``history`` (the manifest's final losses: the last steps)."""
    if not history:
        return {}
    return {k: round(sum(h[k] for h in history) / len(history), 5) for k in history[0]}


def read_manifest_of(path: Path, fmt: str, command: str) -> dict:
    """The JSON manifest at ``path``, which must say it is ``fmt``; ``command`` makes one."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make it with `{command}`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != fmt:
        raise ValueError(f"{path} is not a {fmt} manifest")
    return manifest


def run_record(step: int, history: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    """What every training manifest ends with: how far the run got, its final losses (means over
    ``history``, the last steps), its wall time and the threads and torch it ran on."""
    return {
        "steps": step,
        "final_losses": mean_losses(history),
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def check_resume_recipe(saved: dict[str, Any], recipe: dict[str, Any], state_path: Path) -> None:
    """Refuse to ``--resume`` the run saved at ``state_path`` with another recipe, naming the
    fields that changed."""
    if saved != recipe:
        changed = sorted(k for k in recipe.keys() | saved.keys() if saved.get(k) != recipe.get(k))
        raise ValueError(f"--resume of {state_path} with a different recipe (changed: {', '.join(changed)})")
