"""Which records each optimizer step trains on, and the one way they become tensors and a loss.

Data order: epoch e visits the records in `randperm(seed + e)`; its tail is filled from
its head so every step is full. The data position is therefore the step number alone, and
a resumed job goes straight to it. With group_by_length a step gets records of similar
length, in an order that is still a function of the seed and the epoch.

Batches, the same on CPU and GPU. A step's records (batch_size × grad_accum per process)
become micro-batches: with packing, balanced padding-free rows of at most
`plan.token_budget` tokens (batch_size × cutoff_len, more where the GPU holds more);
without, rows of batch_size records, right-padded. The step trains on the same records
either way, so packing changes speed and never the maths. A packed row:

    input_ids     a0 a1 a2 b0 b1 c0 c1 c2 c3
    position_ids   0  1  2  0  1  0  1  2  3     (reset per record: RoPE sees each alone)
    cu_seq_lens    0 3 5 9                       (record boundaries, for varlen attention)
    shift_labels  a1 a2  ∅ b1  ∅ c1 c2 c3  ∅     (shifted within a record, never across)

Labels are shifted here, once, per record, in both layouts: `shift_labels[t]` is what
position t predicts, so the loss never shifts again and a record's last token never
learns to predict the next record's first. `∅` is IGNORE (-100), as are prompt tokens
unless train_on_prompt. `target_index` lists the positions that carry a label, computed
on the CPU so the loss needs no device sync to find them.

The records of a row must not attend to each other. `llmft_varlen` attention reads the
boundaries; transformers' sdpa and eager build a block-diagonal mask from the restarting
position ids (only with no attention mask and no KV cache: `use_cache=False`). An
attention that does neither would mix records silently, so `check_packing` tries the
model once and refuses packing on it.

`loss_sum` is a micro-batch's summed cross-entropy over its label tokens; the loop
divides by the label tokens of the whole step. The plan (tasks/train/fastpath.py) only
picks its kernels: full logits, or the LM head fused with the loss at labelled positions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from tasks.config import TrainConfig, UserError
from tasks.formatting import IGNORE
from tasks.train import kernels

GROUP_STEPS = 16  # length grouping sorts the records of 16 steps at a time
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class PackingError(UserError):
    """Packed rows would let records attend to each other with this model's attention."""


# ----------------------------------------------------------------------------- data order


@functools.lru_cache(maxsize=2)
def epoch_order(
    n: int, epoch: int, seed: int, per_step: int, lengths: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """The epoch's record order. With `lengths` (group_by_length), each window of 16 steps
    is sorted by length and the steps are then shuffled, so a step's records have similar
    lengths (little padding) while the steps still come in a seeded random order."""
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
    n: int, step: int, cfg: TrainConfig, rank: int | None, world: int, lengths: tuple | None = None
) -> list[int]:
    """Row indices of process `rank`'s records for optimizer step `step` (0-based); with
    rank None, every process's."""
    per_rank = cfg.batch_size * cfg.grad_accum
    per_step = per_rank * world
    epoch, in_epoch = divmod(step, math.ceil(n / per_step))
    start = in_epoch * per_step + (rank or 0) * per_rank
    size = per_step if rank is None else per_rank
    return list(epoch_order(n, epoch, cfg.seed, per_step, lengths)[start : start + size])


# ----------------------------------------------------------------------------- tensors


def plan_microbatches(
    lengths: Sequence[int], token_budget: int, rows: int | None = None
) -> list[list[int]]:
    """Group record indices into as few micro-batches of ≤ token_budget tokens as the
    greedy longest-first fill allows, with the load balanced between them.

    Balanced rather than first-fit: 16.5k tokens with an 8k budget gives three rows of
    ~5.5k, not 8k + 8k + 0.5k (a tiny last row runs at a fraction of the GPU's rate).
    A record longer than the budget gets a row of its own. `rows` fixes the number of
    micro-batches instead (DeepSpeed counts them itself), still balanced.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    if not lengths:
        return []
    total = sum(lengths)
    n_bins = rows or max(1, -(-total // token_budget))
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    while True:
        bins: list[list[int]] = [[] for _ in range(n_bins)]
        loads = [0] * n_bins
        overflow = False
        for i in order:
            b = min(range(n_bins), key=loads.__getitem__)
            if loads[b] + lengths[i] > token_budget and loads[b] > 0 and not rows:
                overflow = True
                break
            bins[b].append(i)
            loads[b] += lengths[i]
        if not overflow:
            # keep the records of a row in their original order (deterministic, readable)
            return [sorted(b) for b in bins if b]
        n_bins += 1


def shifted(labels: Sequence[int]) -> list[int]:
    """labels[t+1] at position t; the last position of a record predicts nothing."""
    return [*labels[1:], IGNORE]


def _targets(shift_labels: torch.Tensor, num_tokens: int) -> dict[str, Any]:
    flat = shift_labels.flatten()
    target_index = (flat != IGNORE).nonzero().flatten()
    return {
        "shift_labels": shift_labels,
        "target_index": target_index,
        "targets": flat[target_index],
        "num_tokens": num_tokens,
        "num_targets": int(target_index.numel()),
    }


def pack(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate tokenized records (`input_ids`, `labels`) into one padding-free row."""
    input_ids: list[int] = []
    position_ids: list[int] = []
    shift_labels: list[int] = []
    cu = [0]
    for rec in records:
        ids, labels = list(rec["input_ids"]), list(rec["labels"])
        if len(ids) != len(labels) or not ids:
            raise ValueError("each record needs non-empty input_ids and labels of equal length")
        input_ids += ids
        position_ids += range(len(ids))
        shift_labels += shifted(labels)
        cu.append(cu[-1] + len(ids))
    longest = max(b - a for a, b in zip(cu, cu[1:], strict=False))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32),
        "cu_seq_lens_k": torch.tensor(cu, dtype=torch.int32),
        "max_length_q": longest,
        "max_length_k": longest,
    } | _targets(torch.tensor([shift_labels], dtype=torch.long), len(input_ids))


def pad(records: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """The usual batch: right-padded to the longest record, with an attention mask.

    Labels are shifted per record as in `pack`, so both layouts train on the very same
    (position, target) pairs and give the same loss.
    """
    width = max(len(r["input_ids"]) for r in records)
    ids = torch.full((len(records), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(records), width), dtype=torch.long)
    labels = torch.full((len(records), width), IGNORE, dtype=torch.long)
    for row, rec in enumerate(records):
        n = len(rec["input_ids"])
        ids[row, :n] = torch.tensor(rec["input_ids"])
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(shifted(list(rec["labels"])))
    return {"input_ids": ids, "attention_mask": mask} | _targets(labels, int(mask.sum()))


def step_batches(
    records: Sequence[dict[str, Any]],
    token_budget: int,
    packing: bool,
    pad_id: int = 0,
    batch_size: int | None = None,
    rows: int | None = None,
) -> list[dict[str, Any]]:
    """One optimizer step's records → its micro-batches, on the CPU.

    packing: balanced padding-free rows of ≤ token_budget tokens (or exactly `rows` of
    them). Otherwise the usual layout: consecutive groups of batch_size records (default:
    as many of the longest record as fit the budget), right-padded.
    """
    if not records:
        return []
    lengths = [len(r["input_ids"]) for r in records]
    if packing:
        groups = plan_microbatches(lengths, token_budget, rows)
        return [pack([records[i] for i in g]) for g in groups]
    per_row = batch_size or max(1, token_budget // max(lengths))
    return [pad(records[i : i + per_row], pad_id) for i in range(0, len(records), per_row)]


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The batch's tensors on the device. On CUDA from pinned memory: that copy is queued
    behind the GPU's work, where one from pageable memory would make the host wait for
    the GPU to drain first (and the GPU then for the host)."""
    pin = torch.device(device).type == "cuda"
    return {
        k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if torch.is_tensor(v) else v
        for k, v in batch.items()
    }


def micro_batches(
    records: list[dict[str, Any]], plan: Any, batch_size: int, pad_id: int, device: Any
) -> list[dict[str, Any]]:
    """One optimizer step's records → its micro-batches on the device (their number may
    differ from grad_accum when packing fills a token budget)."""
    mbs = step_batches(
        records, plan.token_budget, plan.packing, pad_id, batch_size=batch_size, rows=plan.rows
    )
    return [to_device(mb, device) for mb in mbs]


# ----------------------------------------------------------------------------- the loss


def model_inputs(batch: dict[str, Any], plan: Any) -> dict[str, Any]:
    """What the model's forward gets: ids, mask or positions, and the record boundaries
    when the attention reads them."""
    keys = ["input_ids", "attention_mask", "position_ids"]
    if plan.attention == kernels.ATTN_NAME:
        keys += BOUNDARY_KEYS
    return {k: batch[k] for k in keys if k in batch}


def loss_sum(model: Any, batch: dict[str, Any], plan: Any) -> torch.Tensor:
    """Summed token cross-entropy of one micro-batch (divide by the step's label tokens).

    plan.fused_loss 'off': the model's logits at every position, in fp32. Otherwise the
    model's own forward with the head bypassed, and the hidden states at labelled
    positions only (prompt tokens never reach the vocabulary-wide head) go through the
    loss fused with the head. Both read the same shifted labels. Either way the top-level
    module's forward runs, so DDP hooks, torch.compile and peft see a normal call.
    """
    inputs = model_inputs(batch, plan)
    if plan.fused_loss == "off":
        logits = model(**inputs, use_cache=False).logits
        logits = logits.float().reshape(-1, logits.shape[-1])
        labels = batch["shift_labels"].reshape(-1)
        return torch.nn.functional.cross_entropy(
            logits, labels, ignore_index=IGNORE, reduction="sum"
        )
    head = kernels.unwrap(model).get_output_embeddings()
    with kernels.HeadBypass(head):
        hidden = model(**inputs, use_cache=False).logits
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
    # outside autocast the hidden states arrive in fp32 (accelerate's output conversion):
    # the head's matmuls in fp32 would be ~10× slower than in bf16 (2·d·V = 0.5 GFLOP per
    # labelled token each way at 128k vocabulary), so they run in the training's dtype
    dtype = kernels.compute_dtype(h)
    if not torch.is_autocast_enabled(h.device.type) and plan.compute_dtype is not None:
        dtype = getattr(torch, plan.compute_dtype)
    return kernels.linear_cross_entropy_sum(
        h.to(dtype), head.weight.to(dtype), batch["targets"], plan.fused_loss
    )


def check_packing(model: Any, plan: Any, device: Any) -> None:
    """Refuse packing when this model's attention lets a row's records see each other.

    Two packed rows, [a, b] and [a', b], differ only in their first record: with records
    kept apart, b's logits are the same in both (bit for bit on the kernels here; the
    tolerance is 1000× below what 4 foreign tokens do to them). Two no-grad forwards of
    8 tokens, called as `loss_sum` calls the model; every process runs them (ZeRO-3
    gathers weights with all of them).
    """
    if not plan.packing:
        return
    b = [11, 12, 13, 14]
    logits = []
    was_training = model.training
    model.eval()  # no dropout, no NEFTune noise
    with torch.no_grad():
        for a in ([3, 4, 5, 6], [7, 8, 9, 10]):
            row = pack([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}])
            out = model(**model_inputs(to_device(row, device), plan), use_cache=False)
            logits.append(out.logits[0, len(a) :].float())
    model.train(was_training)
    change = float((logits[0] - logits[1]).abs().max() / logits[1].abs().max().clamp(min=1e-12))
    if change > 1e-3:
        raise PackingError(
            f"train.packing=true, but with this model's attention implementation "
            f"({plan.attention!r}) the records packed in one row attend to each other: a "
            f"record's logits moved by {change:.1%} when only the record before it changed "
            "(fix: --set train.packing=false, or a model whose attention reads record "
            "boundaries from position ids, as transformers' sdpa, eager and flash "
            "attention do)"
        )
