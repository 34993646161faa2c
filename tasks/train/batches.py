"""Which records each optimizer step trains on, and how they become tensors and a loss.

Data order: epoch e visits the records in `randperm(seed + e)`; its tail is filled from
its head so every step is full. The data position is therefore the step number alone, and
a resumed job goes straight to it. With group_by_length a step gets records of similar
length, in an order that is still a function of the seed and the epoch.

A step's records become micro-batches: grad_accum of batch_size records each (padded
rows, or one packed row), or, on a GPU, what the fast path (tasks/train/fastpath.py) forms
within its token budget. The loss of a micro-batch is a sum over its label tokens; the
loop divides by the label tokens of the whole step.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from tasks.config import TrainConfig
from tasks.formatting import IGNORE, pack_batch, pad_batch

GROUP_STEPS = 16  # length grouping sorts the records of 16 steps at a time


@functools.lru_cache(maxsize=2)
def epoch_order(
    n: int, epoch: int, seed: int, per_step: int, lengths: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """The epoch's record order. With `lengths` (group_by_length), each window of 16 steps
    is sorted by length and the steps are then shuffled, so a step's records have similar
    lengths (little padding) while the steps still come in a seeded random order."""
    import torch

    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is not None:
        window = per_step * GROUP_STEPS
        order = [
            i
            for w in range(0, n, window)
            for i in sorted(order[w : w + window], key=lengths.__getitem__, reverse=True)
        ]
        steps = [order[i : i + per_step] for i in range(0, n, per_step)]
        order = [i for k in torch.randperm(len(steps), generator=g).tolist() for i in steps[k]]
    total = math.ceil(n / per_step) * per_step
    while len(order) < total:  # fill the last step from the epoch's head
        order += order[: total - len(order)]
    return tuple(order)


def step_indices(
    n: int, step: int, cfg: TrainConfig, rank: int, world: int, lengths: tuple | None = None
) -> list[int]:
    """Row indices of this process's records for optimizer step `step` (0-based)."""
    per_rank = cfg.batch_size * cfg.grad_accum
    per_step = per_rank * world
    epoch, in_epoch = divmod(step, math.ceil(n / per_step))
    start = in_epoch * per_step + rank * per_rank
    return list(epoch_order(n, epoch, cfg.seed, per_step, lengths)[start : start + per_rank])


def collate(records: list[dict], packing: bool, pad_id: int) -> dict[str, Any]:
    return pack_batch(records) if packing else pad_batch(records, pad_id)


def micro_batches(
    records: list[dict], cfg: TrainConfig, plan: Any, pad_id: int, device: Any
) -> list[tuple[dict[str, Any], int, int]]:
    """One step's records → [(micro-batch on the device, label tokens, input tokens)]."""
    if plan is not None and plan.batches:
        from tasks.train import fastpath

        mbs = fastpath.micro_batches(records, plan, cfg.batch_size, pad_id, device)
        return [(mb, mb["num_targets"], mb["num_tokens"]) for mb in mbs]
    out = []
    for i in range(0, len(records), cfg.batch_size):
        batch = collate(records[i : i + cfg.batch_size], cfg.packing, pad_id)
        tokens = batch["input_ids"].numel() if cfg.packing else batch["attention_mask"].sum()
        out.append((to_device(batch, device), int(label_tokens(batch)), int(tokens)))
    return out


def micro_loss(model: Any, batch: dict[str, Any], plan: Any) -> Any:
    if plan is not None and plan.batches:
        from tasks.train import fastpath

        return fastpath.loss_sum(model, batch, plan)
    return loss_sum(model, batch)


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def label_tokens(batch: dict[str, Any]) -> Any:
    return (batch["labels"][:, 1:] != IGNORE).sum()


def loss_sum(model: Any, batch: dict[str, Any]) -> Any:
    """Σ cross-entropy over the micro-batch's label tokens (labels shifted by one)."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE,
        reduction="sum",
    )
