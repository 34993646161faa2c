"""Training budget: how many optimizer steps a recipe gives this dataset, and why.

A recipe fixed in epochs trains a small dataset for a handful of steps: 2 epochs of 72
records at batch 8 are 18 optimizer steps, too few for LoRA to teach a 135M model a new
name, while the same recipe on 239 records gives 60 steps and teaches it. With
`train.num_epochs: auto` the epochs come from the data instead:

    records per step = batch_size × grad_accum × num_processes × nodes
    steps per epoch  = ceil(train records / records per step)
    epochs           = train.budget.epochs, or ceil(train.budget.min_steps / steps per epoch)
                       when those give fewer than min_steps steps, at most budget.max_epochs

So a large dataset trains for `budget.epochs` and a small one for at least `min_steps`
steps. An explicit `train.num_epochs: N` or `train.max_steps: N` wins, as given.

The train stage resolves 'auto' before it makes its key (tasks/train/__init__.py `key`):
the key holds the epochs that are trained, never the word 'auto', so the same recipe on a
dataset whose budget differs is a different artifact. The train record count is the data
stage's (report.json); the rare record that tokenization drops (a prompt longer than
cutoff_len) shortens an epoch by a fraction of a step and does not change the epochs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from tasks.config import TrainConfig
from tasks.store import Ref

OVERRIDE = "override: --set train.num_epochs=N or --set train.max_steps=N"


@dataclass(frozen=True)
class Budget:
    """The resolved budget: the train section to run, and the arithmetic behind it."""

    train: TrainConfig  # num_epochs is a number here, never 'auto'
    records: int
    records_per_step: int
    steps_per_epoch: int
    steps: int
    chosen_by: str  # "auto", "num_epochs" or "max_steps"
    why: str

    @property
    def line(self) -> str:
        """What `llmft run` prints, e.g. "budget: 72 train records, batch 8 → 9 steps/epoch;
        2 epochs would give 18 steps < min 60 → 7 epochs = 63 steps (override: ...)"."""
        t = self.train
        batch = f"batch {t.batch_size}"
        if t.grad_accum > 1:
            batch += f" × accum {t.grad_accum}"
        if t.num_processes * t.nodes > 1:
            batch += f" × {t.num_processes * t.nodes} processes"
        if self.records_per_step != t.batch_size:
            batch += f" = {self.records_per_step} records/step"
        line = (
            f"budget: {self.records} train records, {batch} → {self.steps_per_epoch} "
            f"steps/epoch; {self.why} ({OVERRIDE})"
        )
        if t.early_stopping_patience:
            line += (
                f"; early stopping: dev loss every {t.eval_steps} steps, stop after "
                f"{t.early_stopping_patience} without improvement, keep the best"
            )
        return line

    def to_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "records_per_step": self.records_per_step,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.train.num_epochs,
            "steps": self.steps,
            "chosen_by": self.chosen_by,
            "line": self.line,
        }


def resolve(t: TrainConfig, records: int) -> Budget:
    """The budget for `records` training records under the train section `t`.

    With early stopping and no eval_steps, the dev loss is measured once per epoch; that
    cadence is resolved here too, so it enters the key as a number."""
    per_step = t.batch_size * t.grad_accum * t.num_processes * t.nodes
    per_epoch = max(1, math.ceil(records / per_step))
    if t.early_stopping_patience and not t.eval_steps:
        t = t.model_copy(update={"eval_steps": per_epoch})
    if t.max_steps:
        why = f"train.max_steps={t.max_steps} as set → {t.max_steps} steps"
        return Budget(t, records, per_step, per_epoch, t.max_steps, "max_steps", why)
    if t.num_epochs != "auto":
        steps = math.ceil(t.num_epochs * per_epoch)
        why = f"train.num_epochs={t.num_epochs:g} as set → {steps} steps"
        return Budget(t, records, per_step, per_epoch, steps, "num_epochs", why)
    b = t.budget
    planned = math.ceil(b.epochs * per_epoch)
    if planned >= b.min_steps:
        epochs = b.epochs
        why = f"{b.epochs:g} epochs give {planned} steps ≥ min {b.min_steps} → {b.epochs:g} epochs"
    else:
        needed = math.ceil(b.min_steps / per_epoch)
        epochs = min(needed, b.max_epochs)
        steps = math.ceil(epochs * per_epoch)
        why = (
            f"{b.epochs:g} epochs would give {planned} steps < min {b.min_steps} → "
            f"{epochs:g} epochs = {steps} steps"
        )
        if needed > b.max_epochs:  # a tiny set: more passes would only memorise it
            why += f", capped by train.budget.max_epochs={b.max_epochs:g}"
    resolved = t.model_copy(update={"num_epochs": float(epochs)})
    steps = math.ceil(epochs * per_epoch)
    return Budget(resolved, records, per_step, per_epoch, steps, "auto", why)


def train_records(data: Ref) -> int:
    """Records in the data stage's train split (its report; the split file if no report)."""
    report = data.dir / "report.json"
    if report.is_file():
        count = json.loads(report.read_text(encoding="utf-8")).get("train")
        if isinstance(count, int):
            return count
    return len(json.loads((data.dir / "train.json").read_text(encoding="utf-8")))
