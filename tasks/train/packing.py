"""Padding-free batches: several records in one row, with no attention across records.

One optimizer step takes the same records whether packed or padded (batch_size ×
grad_accum of them, in the same order), so packing changes speed and never the maths.
Within a step the records are split into micro-batches of at most `token_budget` tokens
(default batch_size × cutoff_len: never more than the padded batch could hold), and each
micro-batch is one row:

    input_ids     a0 a1 a2 b0 b1 c0 c1 c2 c3
    position_ids   0  1  2  0  1  0  1  2  3     (reset per record: RoPE sees each alone)
    cu_seq_lens    0 3 5 9                       (record boundaries, for varlen attention)
    shift_labels  a1 a2  ∅ b1  ∅ c1 c2 c3  ∅     (shifted within a record, never across)

Labels are shifted here, per record, so a record's last token never learns to predict the
next record's first token. `∅` is -100 (ignored), as are prompt tokens unless
train_on_prompt. `target_index` lists the positions that carry a label, computed on the
CPU so the loss needs no device sync to find them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE = -100


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
    targets = torch.tensor(shift_labels, dtype=torch.long)
    target_index = (targets != IGNORE).nonzero().flatten()
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "shift_labels": targets.unsqueeze(0),
        "cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32),
        "cu_seq_lens_k": torch.tensor(cu, dtype=torch.int32),
        "max_length_q": max(b - a for a, b in zip(cu, cu[1:], strict=False)),
        "max_length_k": max(b - a for a, b in zip(cu, cu[1:], strict=False)),
        "target_index": target_index,
        "targets": targets[target_index],
        "num_tokens": len(input_ids),
        "num_targets": int(target_index.numel()),
    }


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
    flat = labels.flatten()
    target_index = (flat != IGNORE).nonzero().flatten()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "shift_labels": labels,
        "target_index": target_index,
        "targets": flat[target_index],
        "num_tokens": int(mask.sum()),
        "num_targets": int(target_index.numel()),
    }


def step_batches(
    records: Sequence[dict[str, Any]],
    token_budget: int,
    packing: bool,
    pad_id: int = 0,
    batch_size: int | None = None,
    rows: int | None = None,
) -> list[dict[str, Any]]:
    """One optimizer step's records → its micro-batches.

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
