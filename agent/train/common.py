"""Pieces the training commands share: the learning-rate schedule, the optimizer step and the run
loop (:class:`TrainLoop`), the losses a manifest reports, and reading a corpus manifest."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
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


def check_resume_recipe(saved: dict[str, Any], recipe: Any, state_path: Path) -> None:
    """Refuse to ``--resume`` the run saved at ``state_path`` with another ``recipe`` (a dataclass
    whose fields all have defaults), naming the fields that changed. A field absent from the saved
    recipe was added by a later version: the saved run ran with its default."""
    saved = {**asdict(type(recipe)()), **saved}
    current = asdict(recipe)
    changed = sorted(k for k in current.keys() | saved.keys() if saved.get(k) != current.get(k))
    if changed:
        raise ValueError(f"--resume of {state_path} with a different recipe (changed: {', '.join(changed)})")


#: the log of every logged step's mean losses, next to each run's manifest
LOSS_LOG = "losses.tsv"


class TrainLoop:
    """The step and the loop both trainers run. A trainer sets ``out``, ``recipe`` (with ``steps``
    and ``grad_clip``), ``opt``, ``sched``, ``step``, ``seconds`` and ``history``, and provides
    :meth:`batch_losses`, :meth:`parameters` and :attr:`LOSS_COLUMNS` (the losses in ``losses.tsv``)."""

    LOSS_COLUMNS: tuple[str, ...] = ("loss",)

    def batch_losses(self) -> dict[str, torch.Tensor]:
        """The losses of one fresh batch (``"loss"`` is the one optimized)."""
        raise NotImplementedError

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        out = self.batch_losses()
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), self.recipe.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in out.items()}

    def final_losses(self) -> dict[str, float]:
        """Mean of each loss over the last (up to) 100 steps."""
        return mean_losses(self.history)

    def train(self, save: Callable[[], None], *, log_every: int, stop_at: int | None,
              max_seconds: float | None, save_every: int | None = None, save_minutes: float | None = None,
              log: Callable[[str], None] = print, after_step: Callable[[], None] | None = None) -> Path:
        """Train to ``recipe.steps`` (or stop, saved and resumable, at ``stop_at`` or after
        ``max_seconds``), logging the mean losses every ``log_every`` steps, calling ``after_step``
        after each step (before any save) and ``save`` every ``save_every`` steps, every
        ``save_minutes`` and at the end."""
        self.out.mkdir(parents=True, exist_ok=True)
        losses_path = self.out / LOSS_LOG
        if self.step == 0:
            losses_path.write_text("\t".join(("step", "seconds", *self.LOSS_COLUMNS, "lr")) + "\n")
        started = last_save = time.monotonic()
        base = self.seconds
        end = self.recipe.steps if stop_at is None else min(stop_at, self.recipe.steps)
        window: list[dict[str, float]] = []
        while self.step < end:
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                log(f"stopping at step {self.step} after {max_seconds:.0f} s (resume with --resume)")
                break
            row = self.train_step()
            self.seconds = base + time.monotonic() - started
            window.append(row)
            self.history = [*self.history, row][-100:]
            if self.step % log_every == 0 or self.step == end:
                mean = mean_losses(window)
                window = []
                cells = [f"{self.step}", f"{self.seconds:.1f}", *(f"{mean[k]:.5f}" for k in self.LOSS_COLUMNS),
                         f"{self.sched.get_last_lr()[0]:.6f}"]
                with losses_path.open("a") as f:
                    f.write("\t".join(cells) + "\n")
                log(f"step {self.step}/{self.recipe.steps} {self.seconds:.0f}s " +
                    " ".join(f"{k} {v:.4f}" for k, v in mean.items()))
            if after_step is not None:
                after_step()
            if (save_every and self.step % save_every == 0) or (
                    save_minutes and time.monotonic() - last_save > save_minutes * 60):
                save()
                last_save = time.monotonic()
        save()
        return self.out
