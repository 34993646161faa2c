"""One training job, in every process of it: setup → train → save → clean up.

`python -m tasks.train --spec spec.json` calls `train_job(spec)`; under `torchrun` or
`accelerate launch` every process runs it, and accelerate's `Accelerator` supplies DDP or
DeepSpeed. The loop is plain PyTorch so that every step is in view:

    one optimizer step = batch_size × grad_accum records per process, in grad_accum
    micro-batches of batch_size records (padded rows, or one packed row with packing)
    loss = Σ token cross-entropy / (label tokens of the step over all processes)

The loss is a token mean over the whole step, not a mean of micro-batch means, so
grad_accum and the number of processes change the speed and never the maths. Which
records a step takes, and how they become tensors: tasks/train/batches.py.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.train.batches import (
    epoch_order,  # noqa: F401  (bench/train_gpu.py reads the order from here)
    label_tokens,
    loss_sum,
    micro_batches,
    micro_loss,
    step_indices,
    to_device,
)
from tasks.config import TrainConfig
from tasks.formatting import pad_batch

COMPUTE_DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class Spec:
    """What one training job needs; written as JSON by `tasks.train.run`."""

    train: TrainConfig
    model_dir: Path
    tokens_dir: Path
    output_dir: Path
    keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Spec:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(
            train=TrainConfig.model_validate(raw["train"]),
            model_dir=Path(raw["model_dir"]),
            tokens_dir=Path(raw["tokens_dir"]),
            output_dir=Path(raw["output_dir"]),
            keys=raw.get("keys", {}),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "train": self.train.model_dump(mode="json"),
            "model_dir": str(self.model_dir),
            "tokens_dir": str(self.tokens_dir),
            "output_dir": str(self.output_dir),
            "keys": self.keys,
        }


def resolve_device(cfg: TrainConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def resolve_precision(cfg: TrainConfig, device: str) -> str:
    """accelerate's mixed_precision: 'no' (fp32), 'bf16' or 'fp16'."""
    import torch

    if cfg.precision == "auto":
        if device != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no" if cfg.precision == "fp32" else cfg.precision


def dev_loss(job: Job) -> float | None:
    """Token-mean loss over the dev rows (sharded over processes), or None without rows."""
    import torch

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
            batch = to_device(pad_batch(rows or job.dev_rows[:1], job.pad_id), acc.device)
            loss = loss_sum(job.model, batch).double()
            if rows:  # a stand-in batch keeps step with the others and counts for nothing
                totals[0] += loss
                totals[1] += label_tokens(batch)
    job.model.train()
    totals = acc.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


def drop_tied_copies(model: Any, weights: dict[str, Any]) -> None:
    """Keep one name per shared tensor (a tied LM head is saved as the embedding alone,
    as save_pretrained does by itself; a gathered DeepSpeed state dict names both)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in names.values():
        for copy in group[1:]:
            weights.pop(copy, None)


def add_neftune(model: Any, alpha: float) -> None:
    """NEFTune: uniform noise of size alpha/√(L·d) on the input embeddings while training,
    L the sequence length. In a packed row (position_ids restarting at 0 for each record)
    L is each record's own length, so packing does not shrink the noise a record gets."""
    import torch

    embeddings = model.get_input_embeddings()
    seen: dict[str, Any] = {"position_ids": None}

    def remember(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen["position_ids"] = kwargs.get("position_ids")

    def hook(module: Any, args: Any, output: Any) -> Any:
        positions, seen["position_ids"] = seen["position_ids"], None
        if not module.training:
            return output
        d = output.size(2)
        lengths = record_lengths(positions, output.size(1))
        if lengths is None:
            magnitude = alpha / math.sqrt(output.size(1) * d)
            return output + torch.zeros_like(output).uniform_(-magnitude, magnitude)
        magnitude = (alpha / torch.sqrt(lengths.to(output.dtype) * d)).view(1, -1, 1)
        return output + torch.zeros_like(output).uniform_(-1, 1) * magnitude

    # the module that embeds the tokens is the one called with position_ids
    owners = [m for m in model.modules() if getattr(m, "embed_tokens", None) is embeddings]
    for owner in owners:
        owner.register_forward_pre_hook(remember, with_kwargs=True)
    embeddings.register_forward_hook(hook)


def record_lengths(position_ids: Any, length: int) -> Any:
    """For a packed row (one row, positions restarting at 0): each token's record length;
    None for anything else."""
    import torch

    if position_ids is None or position_ids.dim() != 2 or position_ids.size(0) != 1:
        return None
    starts = position_ids[0] == 0
    if position_ids.size(1) != length or int(starts.sum()) < 2:
        return None
    record = torch.cumsum(starts.long(), 0) - 1
    return torch.bincount(record)[record]


# ----------------------------------------------------------------------------- setup


@dataclass
class Job:
    spec: Spec
    cfg: TrainConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    params: list
    tokenizer: Any
    rows: Any  # pyarrow Table, memory-mapped
    dev_rows: list[dict]
    total_steps: int
    steps_per_epoch: int
    info: dict[str, Any]
    plan: Any = None  # tasks.train.fastpath.Plan on a GPU
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @functools.cached_property
    def lengths(self) -> tuple[int, ...] | None:
        """Record lengths for group_by_length (packed rows have no padding to save)."""
        if not self.cfg.group_by_length or self.cfg.packing:
            return None
        import pyarrow.compute as pc

        return tuple(pc.list_value_length(self.rows.column("input_ids")).to_pylist())


def setup(spec: Spec) -> Job:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_scheduler

    from tasks.train import methods
    from tasks.train.tokens import load_tokenizer, read_table

    cfg = spec.train
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    acc = Accelerator(
        cpu=device == "cpu", mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum
    )
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(spec.model_dir)
    rows = read_table(spec.tokens_dir, "train")
    dev_rows = read_table(spec.tokens_dir, "dev").to_pylist()
    per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
    steps_per_epoch = math.ceil(rows.num_rows / per_step)
    total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * steps_per_epoch)

    dtype = getattr(torch, COMPUTE_DTYPES[precision])
    model = methods.load(cfg, spec.model_dir, dtype, acc.device)
    trainable, total = methods.trainable_parameters(model)
    if cfg.neftune_alpha > 0:
        add_neftune(model, cfg.neftune_alpha)
    params = [p for p in model.parameters() if p.requires_grad]

    # no weight decay on biases and norm scales; under ZeRO-3 a parameter is an empty shard
    # from the moment it is loaded and its real shape is `ds_shape`
    def is_matrix(p: Any) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    groups = [
        {"params": [p for p in params if is_matrix(p)], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if not is_matrix(p)], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]  # DeepSpeed drops an empty group
    plan = None
    if device == "cuda":  # GPU levers (packing rows, fused LoRA and loss, Liger): tasks/train/fastpath.py
        from tasks.train import fastpath

        plan = fastpath.prepare(model, cfg, acc.device, deepspeed)
    # fused: one kernel for all tensors on the GPU; DeepSpeed may step on the CPU instead
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, fused=device == "cuda" and not deepspeed
    )
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    if deepspeed:  # what accelerate cannot fill in without a DataLoader
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds["train_batch_size"] = per_step
        ds["gradient_clipping"] = cfg.max_grad_norm
    # the scheduler stays unprepared: accelerate would step it once per process
    model, optimizer = acc.prepare(model, optimizer)
    if cfg.compile:
        model = torch.compile(model)
    info = {
        "device": device,
        "precision": precision,
        "processes": acc.num_processes,
        "deepspeed": deepspeed,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_rows": rows.num_rows,
        "dev_rows": len(dev_rows),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "fast_path": None if plan is None else plan.describe(),
    }
    return Job(
        spec, cfg, acc, model, optimizer, scheduler, params, tokenizer, rows, dev_rows,
        total_steps, steps_per_epoch, info, plan,
    )  # fmt: skip


# ----------------------------------------------------------------------------- train


class Log:
    """log_history.jsonl: one JSON line per logging step and per dev evaluation."""

    def __init__(self, job: Job) -> None:
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


def train_steps(job: Job, log: Log) -> None:
    import torch
    from tqdm import tqdm

    from tasks.train import checkpoint

    acc, cfg, state = job.accelerator, job.cfg, job.state
    rank, world = acc.process_index, acc.num_processes
    step = state["step"]
    if step == 0 and state["dev_loss_before"] is None:
        state["dev_loss_before"] = dev_loss(job)
        log(0, {"dev_loss": state["dev_loss_before"]})

    def batches_for(step: int) -> list[tuple[dict[str, Any], int, int]]:
        indices = step_indices(job.rows.num_rows, step, cfg, rank, world, job.lengths)
        records = job.rows.take(indices).to_pylist()
        return micro_batches(records, cfg, job.plan, job.pad_id, acc.device)

    job.model.train()
    bar = tqdm(total=job.total_steps, initial=step, disable=not acc.is_main_process, unit="step")
    window = torch.zeros(2, dtype=torch.float64, device=acc.device)  # Σ step losses, tokens
    window_steps, window_started = 0, time.time()
    upcoming = batches_for(step) if step < job.total_steps else []
    while step < job.total_steps:
        micro = upcoming
        # a fill, not torch.tensor(x, device=...): that copies from pageable memory and
        # makes the host wait for the GPU at the start of every step
        labels = torch.full((), float(sum(m[1] for m in micro)), device=acc.device)
        labels = (acc.reduce(labels, reduction="sum") if world > 1 else labels).clamp(min=1)
        if not job.info["deepspeed"]:  # the fast path may form more or fewer micro-batches
            acc.gradient_accumulation_steps = len(micro)
        acc.step = 0  # accumulate() syncs gradients on this step's last micro-batch
        for batch, _, tokens in micro:
            with acc.accumulate(job.model):
                loss = micro_loss(job.model, batch, job.plan)
                # backward divides by the micro-batch count and DDP averages over processes:
                # undo both, so the gradient is that of the step's token mean
                acc.backward(loss / labels * (world * acc.gradient_accumulation_steps))
            window[0] += loss.detach().double() / labels
            window[1] += tokens
        grad_norm = acc.clip_grad_norm_(job.params, cfg.max_grad_norm)
        job.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: the step did not happen
            job.scheduler.step()
        job.optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        # the next step's rows are packed and queued while the GPU still works on this
        # one, before logging below waits for it
        upcoming = batches_for(step) if step < job.total_steps else []
        bar.update(1)

        if step % cfg.logging_steps == 0 or step == job.total_steps:
            sums = acc.reduce(window, reduction="sum") if world > 1 else window
            seconds = time.time() - window_started
            state["train_seconds"] += seconds
            state["tokens"] += int(sums[1])
            entry = log(
                step,
                {
                    "loss": round(float(sums[0]) / window_steps, 5),
                    "lr": job.scheduler.get_last_lr()[0],
                    "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
                    "tokens": state["tokens"],
                    "tokens_per_second": round(float(sums[1]) / max(seconds, 1e-9), 1),
                },
            )
            bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_second']:.0f}")
            window.zero_()
            window_steps, window_started = 0, time.time()
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < job.total_steps:
            log(step, {"dev_loss": dev_loss(job)})
            window_started = time.time()
        if step % cfg.save_steps == 0 and step < job.total_steps:
            state["step"] = step
            checkpoint.save(job)
            window_started = time.time()
    bar.close()
    state["step"] = step


# ----------------------------------------------------------------------------- the job


def train_job(spec: Spec) -> dict[str, Any]:
    import torch

    from tasks.train import checkpoint, methods, report

    started = time.time()
    job = setup(spec)
    acc = job.accelerator
    job.state = checkpoint.resume(job)
    # the model, tokenizer and libraries are ~10⁶ long-lived objects: frozen, they are no
    # longer walked by every full collection (tens of ms each) the training steps trigger
    gc.collect()
    gc.freeze()
    log = Log(job)
    train_steps(job, log)

    after = dev_loss(job)
    log(job.state["step"], {"dev_loss": after})
    folder = spec.output_dir / methods.output_folder(job.cfg.method)
    weights = acc.get_state_dict(job.model)  # gathers ZeRO-3 shards: every process calls it
    if acc.is_main_process:
        drop_tied_copies(acc.unwrap_model(job.model), weights)
        acc.unwrap_model(job.model).save_pretrained(
            folder, state_dict=weights, safe_serialization=True
        )
        job.tokenizer.save_pretrained(folder)
    state, history = job.state, job.state["log_history"]
    train_losses = [h["loss"] for h in history if "loss" in h]
    peak = torch.cuda.max_memory_allocated() / 2**30 if job.info["device"] == "cuda" else None
    metrics = {
        "method": job.cfg.method,
        "dev_loss": {"before": state["dev_loss_before"], "after": after},
        "train_loss": train_losses[-1] if train_losses else None,
        "steps": state["step"],
        "trained_tokens": state["tokens"],
        "tokens_per_second": round(state["tokens"] / max(state["train_seconds"], 1e-9), 1),
        "seconds": round(state["train_seconds"], 2),
        "wall_seconds": round(time.time() - started, 2),
        "cpu_seconds": round(time.process_time(), 1),  # this process, all threads, since start
        "peak_gpu_memory_gib": None if peak is None else round(peak, 3),
        "resumed_from_step": state["resumed_from_step"],
    } | {k: job.info[k] for k in ("device", "precision", "processes", "deepspeed", "fast_path")}
    metrics |= {k: job.info[k] for k in ("trainable_parameters", "total_parameters")}
    if acc.is_main_process:
        report.write_outputs(spec, metrics, history, job.info)
    acc.wait_for_everyone()
    if acc.is_main_process and not job.cfg.keep_checkpoints:
        checkpoint.remove_all(spec.output_dir)
    acc.end_training()
    return metrics
