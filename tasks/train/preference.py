"""Preference tuning's maths: DPO, ORPO and SimPO on pairs of (chosen, rejected) answers.

A pair is two tokenized records that share the prompt: the chosen answer's and the
rejected answer's, labels on the answer only. They always travel together: a micro-batch
holds whole pairs (packed side by side in one padding-free row on the fast path, or as
two padded rows), because the loss of a pair needs both of its log-probabilities.

    logp(y|x)   sum over the answer's tokens of log p(token | everything before it)

    dpo     −log σ(β·[(logp_c − ref_c) − (logp_r − ref_r)])            Rafailov et al. 2023
    orpo    mean NLL(chosen) − λ·log σ(log odds_c − log odds_r),
            odds = p̄/(1 − p̄), p̄ = exp(mean token logp)                 Hong et al. 2024
    simpo   −log σ(β·(mean logp_c − mean logp_r) − γ)                   Meng et al. 2024

The reference log-probs of DPO (`ref_c`, `ref_r`) are those of the starting model, computed
once in a no-grad pass before the first update (`reference_logps`): no second copy of the
model is held, for LoRA, QLoRA and full training alike, and a resumed job reads them back
from its checkpoint folder. Rewards reported: β·(logp − ref) for DPO, β·mean logp for
ORPO and SimPO; accuracy is the share of pairs whose chosen reward beats the rejected one.
These few lines follow the papers' formulas (and TRL's sigmoid losses) rather than import
a trainer, so they run inside this project's own loop, batches and kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tasks.formatting import IGNORE
from tasks.train import kernels
from tasks.train.batches import model_inputs, pack, pad, plan_microbatches, to_device

METHODS = ("dpo", "orpo", "simpo")


def pair_batches(
    pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]],
    token_budget: int,
    packing: bool,
    pad_id: int,
    ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Pairs → micro-batches of whole pairs, ≤ token_budget tokens where they fit; the
    records of a micro-batch are [chosen₀, rejected₀, chosen₁, rejected₁, …]. `pair_index`
    names each pair by `ids` (its row in the split), or by its place in `pairs`."""
    lengths = [len(c["input_ids"]) + len(r["input_ids"]) for c, r in pairs]
    if packing:
        groups = plan_microbatches(lengths, token_budget)
    else:  # padded rows as wide as the longest record: 2 rows a pair
        longest = max(max(len(c["input_ids"]), len(r["input_ids"])) for c, r in pairs)
        per = max(1, token_budget // (2 * longest))
        groups = [list(range(i, min(i + per, len(pairs)))) for i in range(0, len(pairs), per)]
    batches = []
    for group in groups:
        records = [rec for i in group for rec in pairs[i]]
        batch = pack(records) if packing else pad(records, pad_id)
        batch["answer_tokens"] = torch.tensor(
            [sum(label != IGNORE for label in r["labels"][1:]) for r in records]
        )
        batch["pair_index"] = torch.tensor([ids[i] for i in group] if ids else group)
        batch["num_pairs"] = len(group)
        batches.append(batch)
    return batches


def sequence_logps(model: Any, batch: dict[str, Any], plan: Any) -> torch.Tensor:
    """Summed log-probability of each record's labelled tokens, in the batch's order.

    The head runs at labelled positions only (prompt tokens never meet the vocabulary);
    the labelled positions come grouped by record and in record order in both layouts
    (a packed row is records end to end, padded rows are one record each), so a record's
    share is a run of `answer_tokens[i]` consecutive targets.
    """
    head = kernels.unwrap(model).get_output_embeddings()
    with kernels.HeadBypass(head):
        hidden = model(**model_inputs(batch, plan), use_cache=False).logits
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
    logits = F.linear(h.to(head.weight.dtype), head.weight, getattr(head, "bias", None)).float()
    token_logps = logits.log_softmax(-1).gather(1, batch["targets"][:, None]).squeeze(1)
    counts = batch["answer_tokens"].to(token_logps.device)
    record = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    return torch.zeros(len(counts), device=token_logps.device).index_add(0, record, token_logps)


def pair_loss(
    method: str,
    logps: torch.Tensor,
    tokens: torch.Tensor,
    ref: torch.Tensor | None,
    beta: float,
    orpo_lambda: float = 1.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and rewards from interleaved [c₀, r₀, c₁, r₁, …] log-probs."""
    chosen, rejected = logps[0::2], logps[1::2]
    n_c, n_r = tokens[0::2].clamp(min=1).to(logps), tokens[1::2].clamp(min=1).to(logps)
    if method == "dpo":
        if ref is None:
            raise ValueError("dpo needs the reference log-probs")
        reward_c, reward_r = beta * (chosen - ref[0::2]), beta * (rejected - ref[1::2])
        loss = -F.logsigmoid(reward_c - reward_r)
    elif method == "simpo":
        reward_c, reward_r = beta * chosen / n_c, beta * rejected / n_r
        loss = -F.logsigmoid(reward_c - reward_r - simpo_gamma)
    elif method == "orpo":
        mean_c, mean_r = chosen / n_c, rejected / n_r
        # log(p/(1−p)) with p = exp(mean logp) < 1: log1p(−exp(x)) is exact for x < 0
        log_odds = (mean_c - mean_r) - (
            torch.log1p(-torch.exp(mean_c).clamp(max=1 - 1e-6))
            - torch.log1p(-torch.exp(mean_r).clamp(max=1 - 1e-6))
        )
        loss = -mean_c - orpo_lambda * F.logsigmoid(log_odds)
        reward_c, reward_r = beta * mean_c, beta * mean_r
    else:
        raise ValueError(f"unknown preference method {method!r}; one of {METHODS}")
    stats = {
        "reward_chosen": reward_c.detach(),
        "reward_rejected": reward_r.detach(),
        "logp_chosen": chosen.detach(),
        "logp_rejected": rejected.detach(),
    }
    return loss, stats


def summarize(stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean rewards, margin, accuracy and log-probs over a list of micro-batch stats."""
    if not stats:
        return {}
    cat = {k: torch.cat([s[k].float().cpu() for s in stats]) for k in stats[0]}
    margin = cat["reward_chosen"] - cat["reward_rejected"]
    return {
        "reward_accuracy": round(float((margin > 0).float().mean()), 4),
        "reward_margin": round(float(margin.mean()), 4),
        "reward_chosen": round(float(cat["reward_chosen"].mean()), 4),
        "reward_rejected": round(float(cat["reward_rejected"].mean()), 4),
        "logp_chosen": round(float(cat["logp_chosen"].mean()), 4),
        "logp_rejected": round(float(cat["logp_rejected"].mean()), 4),
        "pairs": int(margin.numel()),
    }


@torch.no_grad()
def reference_logps(
    model: Any, batches: list[dict[str, Any]], plan: Any, device: Any, total_pairs: int
) -> torch.Tensor:
    """[total_pairs, 2] log-probs (chosen, rejected) of the model as it stands, in eval
    mode (no dropout): DPO's reference, taken before the first update."""
    was_training = model.training
    model.eval()
    out = torch.zeros(total_pairs, 2)
    for batch in batches:
        logps = sequence_logps(model, to_device(batch, device), plan).float().cpu()
        out[batch["pair_index"]] = logps.view(-1, 2)
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_pairs(
    model: Any,
    batches: list[dict[str, Any]],
    plan: Any,
    device: Any,
    method: str,
    beta: float,
    ref: torch.Tensor | None = None,
) -> dict[str, float]:
    """Reward accuracy and margin on held-out pairs (DPO rewards need `ref`; without it,
    the implicit reward β·mean logp is used, which also ranks base and SFT models)."""
    was_training = model.training
    model.eval()
    stats = []
    for batch in batches:
        on = to_device(batch, device)
        logps = sequence_logps(model, on, plan).float()
        pair_ref = None
        if ref is not None:
            pair_ref = ref[batch["pair_index"]].to(logps).flatten()
        use = method if (method != "dpo" or pair_ref is not None) else "simpo"
        _, s = pair_loss(use, logps, on["answer_tokens"], pair_ref, beta, simpo_gamma=0.0)
        stats.append(s)
    model.train(was_training)
    return summarize(stats)


def row_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Rows of the tokenizer stage's table (chosen in input_ids/labels, the rejected answer
    in rejected_input_ids/rejected_labels) → pairs of records."""
    return [
        (
            {"input_ids": r["input_ids"], "labels": r["labels"]},
            {"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]},
        )
        for r in rows
    ]


REFERENCE_FILE = "reference_logps.safetensors"
CHUNK_PAIRS = 64  # pairs per no-grad pass when taking the reference log-probs


class Objective:
    """A preference job's loss: DPO, ORPO or SimPO on whole pairs, the reference
    log-probs of DPO, and the reward statistics of the current logging window."""

    def __init__(self, job: Any) -> None:
        self.job = job
        self.method = job.cfg.objective
        self.settings = job.cfg.preference
        self.beta = self.settings.strength(self.method)
        self.ref: torch.Tensor | None = None
        self.window: list[dict[str, torch.Tensor]] = []

    def batches(self, rows: list[dict[str, Any]], ids: Sequence[int]) -> list[dict[str, Any]]:
        job = self.job
        micro = pair_batches(row_pairs(rows), job.plan.token_budget, job.plan.packing,
                             job.pad_id, ids)  # fmt: skip
        return [to_device(mb, job.accelerator.device) for mb in micro]

    def take_reference(self, folder: Any) -> None:
        """DPO's reference: the starting model's log-probs of every train pair, taken once
        before the first update and kept beside the checkpoints, so a resumed job (whose
        model has moved) reads them instead of taking them again."""
        if self.method != "dpo":
            return
        from safetensors.torch import load_file, save_file

        path = folder / REFERENCE_FILE
        if path.is_file():
            self.ref = load_file(str(path))["logps"]
            return
        job = self.job
        n = job.rows.num_rows
        self.ref = torch.zeros(n, 2)
        for start in range(0, n, CHUNK_PAIRS):
            ids = list(range(start, min(start + CHUNK_PAIRS, n)))
            rows = job.rows.take(ids).to_pylist()
            micro = pair_batches(row_pairs(rows), job.plan.token_budget, job.plan.packing,
                                 job.pad_id, ids)  # fmt: skip
            part = reference_logps(job.model, micro, job.plan, job.accelerator.device, n)
            self.ref[ids] = part[ids]
        if job.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            save_file({"logps": self.ref.contiguous()}, str(path))

    def loss_sum(self, model: Any, batch: dict[str, Any], plan: Any) -> torch.Tensor:
        """Summed pair losses of one micro-batch (the step divides by its pairs)."""
        logps = sequence_logps(model, batch, plan)
        ref = None
        if self.ref is not None:
            ref = self.ref[batch["pair_index"].cpu()].to(logps).flatten()
        losses, stats = pair_loss(
            self.method, logps, batch["answer_tokens"].to(logps.device), ref, self.beta,
            self.settings.orpo_lambda, self.settings.simpo_gamma,
        )  # fmt: skip
        self.window.append(stats)
        return losses.sum()

    def window_stats(self) -> dict[str, float]:
        """The logging window's rewards (this process's pairs), then a new window."""
        stats, self.window = summarize(self.window), []
        stats.pop("pairs", None)
        return stats

    def dev_batches(self) -> list[dict[str, Any]]:
        job = self.job
        rows = job.dev_rows
        return (
            pair_batches(row_pairs(rows), job.plan.token_budget, job.plan.packing, job.pad_id)
            if rows
            else []
        )

    def held_out(self, dev_ref: torch.Tensor | None = None) -> dict[str, float]:
        """Held-out pairs ranked by mean token log-prob (chosen above rejected): the
        implicit reward every model has, so base, SFT and tuned models compare; with
        `dev_ref` (the starting model's log-probs), DPO's own rewards too."""
        job, micro = self.job, self.dev_batches()
        if not micro:
            return {}
        device = job.accelerator.device
        implicit = evaluate_pairs(job.model, micro, job.plan, device, "simpo", 1.0)
        out = {
            "ranking_accuracy": implicit["reward_accuracy"],  # mean logp: chosen > rejected
            "mean_logp_margin": implicit["reward_margin"],
            "logp_chosen": implicit["logp_chosen"],
            "logp_rejected": implicit["logp_rejected"],
            "pairs": implicit["pairs"],
        }
        if dev_ref is not None and self.method == "dpo":
            dpo = evaluate_pairs(job.model, micro, job.plan, device, "dpo", self.beta, dev_ref)
            out |= {k: v for k, v in dpo.items() if k.startswith("reward")}
        return out

    def dev_reference(self) -> torch.Tensor | None:
        """The starting model's log-probs of the dev pairs (DPO's held-out reference)."""
        micro = self.dev_batches()
        if self.method != "dpo" or not micro:
            return None
        job = self.job
        return reference_logps(
            job.model, micro, job.plan, job.accelerator.device, len(job.dev_rows)
        )
