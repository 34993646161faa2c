"""Early stopping on dev loss: stop when it has not improved for `patience` evaluations and
end with the weights of the best one.

The dev loss is measured every train.eval_steps optimizer steps (every epoch when unset:
tasks/train/budget.py resolves that). Each new best writes the trainable parameters to
checkpoints/best/ (LoRA r 8 on SmolLM2-135M: 4.9 MB; full fine-tuning: the whole model),
so a run that overshoots ends on the weights of its best evaluation rather than its last.
The best so far is read back from the log history, which checkpoints carry, so a resumed
job keeps counting where it stopped. Under DeepSpeed the parameters are partitioned over
the processes: the run still stops early, and keeps its last weights.

With patience unset nothing here does anything: the whole budget is trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FOLDER = "best"


def _folder(job: Any) -> Path:
    return job.spec.output_dir / "checkpoints" / FOLDER


def evaluations(history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, dev loss) of the evaluations made while training (not the one at step 0)."""
    return [
        (h["step"], h["dev_loss"])
        for h in history
        if h.get("dev_loss") is not None and h.get("step", 0) > 0 and "loss" not in h
    ]


def best_of(evals: list[tuple[int, float]]) -> tuple[int, float] | None:
    """The lowest dev loss, the earliest evaluation that reached it."""
    return min(evals, key=lambda e: (e[1], e[0])) if evals else None


def should_stop(history: list[dict[str, Any]], patience: int | None) -> bool:
    """True when the last `patience` evaluations all came after the best one."""
    if not patience:
        return False
    evals = evaluations(history)
    best = best_of(evals)
    return best is not None and sum(1 for step, _ in evals if step > best[0]) >= patience


def after_evaluation(job: Any, step: int) -> bool:
    """Called after each dev evaluation logged at `step`: save the weights if they are the
    best so far; True when training should stop."""
    patience = job.cfg.early_stopping_patience
    if not patience:
        return False
    history = job.state["log_history"]
    best = best_of(evaluations(history))
    if best is not None and best[0] == step and not job.info["deepspeed"]:
        _save(job, step, best[1])
    stop = should_stop(history, patience)
    if stop and job.accelerator.is_main_process:
        print(
            f"early stopping at step {step}: dev loss {best[1]:.4f} at step {best[0]} has not "
            f"improved for {patience} evaluations",
            flush=True,
        )
    return stop


def _save(job: Any, step: int, loss: float) -> None:
    from safetensors.torch import save_file

    from tasks.train.checkpoint import _trainable

    acc = job.accelerator
    if acc.is_main_process:
        folder = _folder(job)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "trainable.safetensors.tmp"
        save_file(_trainable(acc.unwrap_model(job.model)), tmp)
        os.replace(tmp, folder / "trainable.safetensors")
        (folder / "best.json").write_text(json.dumps({"step": step, "dev_loss": loss}))
    acc.wait_for_everyone()


def keep_best(job: Any, final_loss: float | None) -> float | None:
    """At the end: load the best evaluation's weights when the final ones are worse.
    Returns the dev loss of the weights the job ends with; notes the choice in job.info."""
    if not job.cfg.early_stopping_patience or final_loss is None:
        return final_loss
    folder = _folder(job)
    saved = folder / "best.json"
    stopped = job.state["step"] < job.total_steps
    note: dict[str, Any] = {"stopped_at_step": job.state["step"] if stopped else None}
    if not saved.is_file():
        job.info["early_stopping"] = note | {"kept_step": job.state["step"]}
        return final_loss
    best = json.loads(saved.read_text())
    if best["dev_loss"] >= final_loss:
        job.info["early_stopping"] = note | {"kept_step": job.state["step"]}
        return final_loss
    from safetensors.torch import load_file

    job.accelerator.unwrap_model(job.model).load_state_dict(
        load_file(folder / "trainable.safetensors"), strict=False
    )
    job.info["early_stopping"] = note | {"kept_step": best["step"], "dev_loss": best["dev_loss"]}
    if job.accelerator.is_main_process:
        print(f"kept the weights of step {best['step']} (dev loss {best['dev_loss']:.4f})")
    return best["dev_loss"]
