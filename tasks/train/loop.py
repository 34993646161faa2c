"""One training job, in every process of it: setup → train → save → clean up.

`python -m tasks.train --spec spec.json` calls `train_job(spec)`; under `torchrun` or
`accelerate launch` every process runs it, and accelerate's `Accelerator` supplies DDP or
DeepSpeed. The loop is plain PyTorch so that every step is in view: the steps and the
clock that times them are tasks/train/steps.py; which records a step takes, and how they
become tensors and a loss (one path, CPU and GPU): tasks/train/batches.py; the kernels
the plan switches on: tasks/train/fastpath.py.
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

from tasks.config import TrainConfig

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
    plan: Any  # tasks.train.fastpath.Plan: the kernels the batch path calls
    state: dict[str, Any] = field(default_factory=dict)
    objective: Any = None  # tasks.train.preference.Objective for dpo/orpo/simpo, else None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @functools.cached_property
    def record_lengths(self) -> tuple[int, ...]:
        """Tokens of each train record: a step's tokens are counted from these."""
        import pyarrow.compute as pc

        lengths = pc.list_value_length(self.rows.column("input_ids"))
        if "rejected_input_ids" in self.rows.column_names:  # a pair trains on both answers
            lengths = pc.add(lengths, pc.list_value_length(self.rows.column("rejected_input_ids")))
        return tuple(lengths.to_pylist())

    @property
    def lengths(self) -> tuple[int, ...] | None:
        """Record lengths for group_by_length (packed rows have no padding to save)."""
        if not self.cfg.group_by_length or self.cfg.packing:
            return None
        return self.record_lengths


def setup(spec: Spec) -> Job:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_scheduler

    from tasks.train import batches, fastpath, methods
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
    if cfg.num_epochs == "auto":  # a spec not written by tasks.train.run: sized as it would
        from tasks.train import budget

        cfg = spec.train = budget.resolve(cfg, rows.num_rows).train
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
    # the kernels the batch path calls (varlen attention, fused LoRA and loss, Liger)
    plan = fastpath.prepare(model, cfg, acc.device, deepspeed)
    # fused: one kernel for all tensors on the GPU; DeepSpeed may step on the CPU instead
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=plan.fused_adamw)
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
    batches.check_packing(model, plan, acc.device)  # before a step mixes records
    if cfg.compile:
        plan.compile = fastpath.compile_layers(model) > 0
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
        "fast_path": plan.describe(),
    }
    job = Job(
        spec, cfg, acc, model, optimizer, scheduler, params, tokenizer, rows, dev_rows,
        total_steps, steps_per_epoch, info, plan,
    )  # fmt: skip
    if cfg.objective != "sft":
        from tasks.train.preference import Objective

        job.objective = Objective(job)
    return job


# ----------------------------------------------------------------------------- the job


def train_job(spec: Spec) -> dict[str, Any]:
    import torch

    from tasks.train import checkpoint, early_stop, methods, report, steps

    started = time.time()
    job = setup(spec)
    acc = job.accelerator
    job.state = checkpoint.resume(job)
    # the model, tokenizer and libraries are ~10⁶ long-lived objects: frozen, they are no
    # longer walked by every full collection (tens of ms each) the training steps trigger
    gc.collect()
    gc.freeze()
    log = steps.Log(job)
    preference: dict[str, Any] = {}
    if job.objective:  # before the first update: DPO's reference and the held-out start
        job.objective.take_reference(spec.output_dir / "checkpoints")
        fresh = job.state["step"] == 0
        dev_ref = job.objective.dev_reference() if fresh else None
        preference["before"] = job.objective.held_out() if fresh else None
    clock = steps.Clock(job.state, acc.device)  # the reference pass is not training time
    steps.train_steps(job, log, clock)
    if job.objective:
        preference["after"] = job.objective.held_out(dev_ref)
        preference |= {"objective": job.cfg.objective, "beta": job.objective.beta}

    after = steps.evaluate(job, log, clock, job.state["step"])
    after = early_stop.keep_best(job, after)  # the best evaluation's weights, if patience set
    folder = spec.output_dir / methods.output_folder(job.cfg.method)
    weights = acc.get_state_dict(job.model)  # gathers ZeRO-3 shards: every process calls it
    if acc.is_main_process:
        drop_tied_copies(acc.unwrap_model(job.model), weights)
        acc.unwrap_model(job.model).save_pretrained(
            folder, state_dict=weights, safe_serialization=True
        )
        job.tokenizer.save_pretrained(folder)
    log(job.state["step"], {"save_seconds": round(clock.lap("save"), 4)})
    state, history = job.state, job.state["log_history"]
    train_losses = [h["loss"] for h in history if "loss" in h]
    peak = torch.cuda.max_memory_allocated() / 2**30 if job.info["device"] == "cuda" else None
    metrics = {
        "method": job.cfg.method,
        "dev_loss": {"before": state["dev_loss_before"], "after": after},
        "train_loss": train_losses[-1] if train_losses else None,
        "steps": state["step"],
        "trained_tokens": state["tokens"],
        # the steps' tokens over the steps' time: evaluating and saving are counted apart;
        # times to 4 decimals as in the log: the three parts then add up to the whole
        "tokens_per_second": round(state["tokens"] / max(state["step_seconds"], 1e-9), 1),
        "step_seconds": round(state["step_seconds"], 4),
        "eval_seconds": round(state["eval_seconds"], 4),
        "save_seconds": round(state["save_seconds"], 4),
        "train_wall_seconds": round(state["train_wall_seconds"], 4),  # the three, end to end
        "wall_seconds": round(time.time() - started, 2),  # the job's, setup included
        "cpu_seconds": round(time.process_time(), 1),  # this process, all threads, since start
        "peak_gpu_memory_gib": None if peak is None else round(peak, 3),
        "resumed_from_step": state["resumed_from_step"],
    } | {k: job.info[k] for k in ("device", "precision", "processes", "deepspeed", "fast_path")}
    metrics |= {k: job.info[k] for k in ("trainable_parameters", "total_parameters")}
    if preference:
        metrics["preference"] = preference
    if acc.is_main_process:
        report.write_outputs(spec, metrics, history, job.info)
    acc.wait_for_everyone()
    if acc.is_main_process and not job.cfg.keep_checkpoints:
        checkpoint.remove_all(spec.output_dir)
    acc.end_training()
    return metrics
