"""A job's training steps, its dev loss, and where its time goes.

    one optimizer step = batch_size × grad_accum records per process, as micro-batches
    (tasks/train/batches.py: padded rows, or packed rows within a token budget)
    loss = Σ token cross-entropy / (label tokens of the step over all processes)

The loss is a token mean over the whole step, not a mean of micro-batch means, so
grad_accum, the micro-batch split and the number of processes change the speed and
never the maths.

Time is read from one monotonic clock (`Clock`): at the end of each step, once the
device has finished it, and at the end of each evaluation and each checkpoint save. Each
reading closes the interval the previous one opened, so no time falls between them: the
logged `step_seconds`, `eval_seconds` and `save_seconds` add up to the training's wall
time, and tokens per second is the steps' tokens over the steps' seconds alone.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch

from tasks.train.batches import loss_sum, micro_batches, pad, step_indices, to_device


class Clock:
    """Contiguous intervals of training time, added to the job's state by kind (step,
    eval, save), so a resumed job's totals go on from its checkpoint's."""

    def __init__(self, state: dict[str, Any], device: Any) -> None:
        self.state = state
        self.cuda = torch.device(device).type == "cuda"
        self.wall_before = state["train_wall_seconds"]
        self.started = self.last = time.monotonic()

    def lap(self, kind: str) -> float:
        """Seconds since the previous reading, read once the device has run all the work
        queued so far (a CUDA step is queued long before it has run); counted as `kind`."""
        if self.cuda:
            torch.cuda.synchronize()
        now = time.monotonic()
        seconds, self.last = now - self.last, now
        self.state[f"{kind}_seconds"] += seconds
        self.state["train_wall_seconds"] = self.wall_before + (now - self.started)
        return seconds


class Log:
    """log_history.jsonl: one JSON line per logging step, dev evaluation and save."""

    def __init__(self, job: Any) -> None:
        self.job = job
        self.path = job.spec.output_dir / "log_history.jsonl"
        self.history: list[dict] = job.state["log_history"]
        if job.accelerator.is_main_process:  # a resumed job rewrites what its checkpoint saw
            self.path.write_text("".join(json.dumps(h) + "\n" for h in self.history))

    def __call__(self, step: int, entry: dict[str, Any]) -> dict[str, Any]:
        job = self.job
        epoch = round(step / job.steps_per_epoch, 4)
        entry = {"step": step, "epoch": epoch, "max_steps": job.total_steps} | entry
        self.history.append(entry)
        if job.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        return entry


def dev_loss(job: Any) -> float | None:
    """Token-mean loss over the dev rows (sharded over processes), or None without rows."""
    acc = job.accelerator
    if not job.dev_rows:
        return None
    mine = sorted(
        job.dev_rows[acc.process_index :: acc.num_processes], key=lambda r: len(r["input_ids"])
    )
    size = job.cfg.batch_size
    # the same number of forwards on every process: under ZeRO-3 each one gathers weights
    # from all of them, so a process that stopped early would leave the others waiting
    batches = math.ceil(math.ceil(len(job.dev_rows) / acc.num_processes) / size)
    totals = torch.zeros(2, dtype=torch.float64, device=acc.device)
    job.model.eval()
    with torch.no_grad():
        for i in range(batches):
            rows = mine[i * size : (i + 1) * size]
            batch = to_device(pad(rows or job.dev_rows[:1], job.pad_id), acc.device)
            loss = loss_sum(job.model, batch, job.plan).double()
            if rows:  # a stand-in batch keeps step with the others and counts for nothing
                totals[0] += loss
                totals[1] += batch["num_targets"]
    job.model.train()
    totals = acc.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


def evaluate(job: Any, log: Log, clock: Clock, step: int) -> float | None:
    """The dev loss, logged with the seconds it took (time apart from the steps')."""
    loss = dev_loss(job)
    log(step, {"dev_loss": loss, "eval_seconds": round(clock.lap("eval"), 4)})
    return loss


def train_steps(job: Any, log: Log, clock: Clock) -> None:
    """From the job's current step to its last: steps, logging, dev loss, checkpoints."""
    from tqdm import tqdm

    from tasks.train import checkpoint, early_stop

    acc, cfg, state = job.accelerator, job.cfg, job.state
    rank, world, n = acc.process_index, acc.num_processes, job.rows.num_rows
    step = state["step"]
    if step == 0 and state["dev_loss_before"] is None:
        state["dev_loss_before"] = evaluate(job, log, clock, 0)

    def batches_for(step: int) -> list[dict[str, Any]]:
        indices = step_indices(n, step, cfg, rank, world, job.lengths)
        records = job.rows.take(indices).to_pylist()
        if job.objective:  # preference pairs: whole pairs per micro-batch
            return job.objective.batches(records, indices)
        return micro_batches(records, job.plan, cfg.batch_size, job.pad_id, acc.device)

    # the step's loss is a mean over its label tokens, or over its pairs
    compute_loss = job.objective.loss_sum if job.objective else loss_sum

    def tokens_of(step: int) -> int:  # every process's records: tokens/s is the job's
        everyone = step_indices(n, step, cfg, None, world, job.lengths)
        return sum(job.record_lengths[i] for i in everyone)

    job.model.train()
    bar = tqdm(total=job.total_steps, initial=step, disable=not acc.is_main_process, unit="step")
    window_loss = torch.zeros(1, dtype=torch.float64, device=acc.device)  # Σ step losses
    window = {"steps": 0, "seconds": 0.0, "tokens": 0}
    upcoming = batches_for(step) if step < job.total_steps else []
    while step < job.total_steps:
        micro = upcoming
        # a fill, not torch.tensor(x, device=...): that copies from pageable memory and
        # makes the host wait for the GPU at the start of every step
        units = sum(mb.get("num_pairs", mb["num_targets"]) for mb in micro)
        labels = torch.full((), float(units), device=acc.device)
        labels = (acc.reduce(labels, reduction="sum") if world > 1 else labels).clamp(min=1)
        if not job.info["deepspeed"]:  # a token budget may form more or fewer micro-batches
            acc.gradient_accumulation_steps = len(micro)
        acc.step = 0  # accumulate() syncs gradients on this step's last micro-batch
        for batch in micro:
            with acc.accumulate(job.model):
                loss = compute_loss(job.model, batch, job.plan)
                # backward divides by the micro-batch count and DDP averages over processes:
                # undo both, so the gradient is that of the step's token mean
                acc.backward(loss / labels * (world * acc.gradient_accumulation_steps))
            window_loss += loss.detach().double() / labels
        grad_norm = acc.clip_grad_norm_(job.params, cfg.max_grad_norm)
        job.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: the step did not happen
            job.scheduler.step()
        job.optimizer.zero_grad(set_to_none=True)
        tokens = tokens_of(step)
        step += 1
        # the next step's rows are packed and queued while the GPU still works on this
        # one; then the clock waits for the GPU to finish this step
        upcoming = batches_for(step) if step < job.total_steps else []
        seconds = clock.lap("step")
        state["tokens"] += tokens
        window["steps"], window["seconds"] = window["steps"] + 1, window["seconds"] + seconds
        window["tokens"] += tokens
        bar.update(1)

        if step % cfg.logging_steps == 0 or step == job.total_steps:
            losses = acc.reduce(window_loss, reduction="sum") if world > 1 else window_loss
            entry = log(
                step,
                {
                    "loss": round(float(losses) / window["steps"], 5),
                    "lr": job.scheduler.get_last_lr()[0],
                    "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
                    "tokens": state["tokens"],
                    "step_seconds": round(window["seconds"], 4),
                    "tokens_per_second": round(window["tokens"] / max(window["seconds"], 1e-9), 1),
                }
                | (job.objective.window_stats() if job.objective else {}),
            )
            bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_second']:.0f}")
            window_loss.zero_()
            window = {"steps": 0, "seconds": 0.0, "tokens": 0}
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < job.total_steps:
            evaluate(job, log, clock, step)
            if early_stop.after_evaluation(job, step):  # patience spent (off by default)
                break
        if step % cfg.save_steps == 0 and step < job.total_steps:
            state["step"] = step
            checkpoint.save(job)
            log(step, {"save_seconds": round(clock.lap("save"), 4)})
    bar.close()
    state["step"] = step
