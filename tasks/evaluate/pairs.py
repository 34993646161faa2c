"""Held-out preference pairs: does a model prefer the chosen answer to the rejected one?

For every model evaluate scores (base, the SFT model of a chain, the tuned one), on the
test split's pairs:

    ranking_accuracy     share of pairs whose chosen answer has the higher mean token
                         log-prob: the implicit reward every model has, so all compare
    mean_logp_margin     mean over pairs of (mean token logp chosen − rejected)
    logp_chosen, logp_rejected   mean summed log-probs of the answers

and for a DPO-trained model, DPO's own reward against its reference (the model the DPO
stage started from: the SFT model of a chain, else the base):

    dpo_reward_accuracy  share of pairs with β·[(logp_c − ref_c) − (logp_r − ref_r)] > 0
    dpo_reward_margin    its mean

The pairs are encoded as training encodes them (tasks/train/tokens.py `encode_pair`, labels
on the answers only) and the log-probs are the training stage's own (tasks/train/
preference.py), padded rows of whole pairs; so a number here means what the training
stage's held-out dev numbers mean, on the test split instead. `basis` names what the
numbers were measured on: promotion compares a run only with runs of the same basis.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

# what the batches' forward reads of a training plan: the model's own attention, padded rows
PLAN = SimpleNamespace(attention="model")


@dataclass
class Pairs:
    """The test pairs, encoded and batched once for every model scored on them."""

    batches: list[dict[str, Any]]
    count: int
    basis: str

    def score(self, model: Any) -> dict[str, float]:
        """The ranking metrics of `model` (the implicit reward: mean token log-prob)."""
        from tasks.train.preference import evaluate_pairs

        implicit = evaluate_pairs(model, self.batches, PLAN, _device(model), "simpo", 1.0)
        return {
            "ranking_accuracy": implicit["reward_accuracy"],
            "mean_logp_margin": implicit["reward_margin"],
            "logp_chosen": implicit["logp_chosen"],
            "logp_rejected": implicit["logp_rejected"],
        }

    def logps(self, model: Any) -> Any:
        """[pairs, 2] summed log-probs (chosen, rejected): a DPO reference."""
        from tasks.train.preference import reference_logps

        return reference_logps(model, self.batches, PLAN, _device(model), self.count)

    def dpo(self, model: Any, ref: Any, beta: float) -> dict[str, float]:
        """DPO's reward accuracy and margin of `model` against the reference log-probs."""
        from tasks.train.preference import evaluate_pairs

        dpo = evaluate_pairs(model, self.batches, PLAN, _device(model), "dpo", beta, ref)
        return {
            "dpo_reward_accuracy": dpo["reward_accuracy"],
            "dpo_reward_margin": dpo["reward_margin"],
        }


def load(
    tokenizer: Any, test: list[dict], template: str, cutoff_len: int, batch_size: int
) -> Pairs | None:
    """The test records that are pairs, encoded; None when the test split holds none."""
    from tasks.train.preference import pair_batches
    from tasks.train.tokens import encode_pair

    records = [r for r in test if r.get("rejected") is not None]
    encoded = [encode_pair(tokenizer, r, template, cutoff_len) for r in records]
    pairs = [
        ({"input_ids": c.input_ids, "labels": c.labels},
         {"input_ids": r.input_ids, "labels": r.labels})
        for c, r in (e for e in encoded if e is not None)
    ]  # fmt: skip
    if not pairs:
        return None
    # padded rows, `batch_size` pairs at a time: 2 rows a pair, each as wide as cutoff_len
    batches = pair_batches(pairs, 2 * cutoff_len * batch_size, False, tokenizer.pad_token_id)
    kept = [r for r, e in zip(records, encoded, strict=True) if e is not None]
    return Pairs(batches, len(pairs), basis(kept, template, cutoff_len))


def basis(records: list[dict], template: str, cutoff_len: int) -> str:
    """A name for what the numbers are measured on: the pairs' texts and how they were cut."""
    blob = json.dumps({"pairs": records, "template": template, "cutoff_len": cutoff_len},
                      sort_keys=True, ensure_ascii=False)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def table_rows(pairs: dict | None, tuned: dict) -> list[tuple[str, str]]:
    """Rows for evaluate's table (label, metric key), present only for a test split of pairs."""
    if not pairs:
        return []
    rows = [
        (f"pair ranking accuracy ({pairs['pairs']} test pairs)", "ranking_accuracy"),
        ("pair mean log-prob margin", "mean_logp_margin"),
    ]
    if "dpo_reward_accuracy" in tuned:
        against = pairs.get("reference") or "its start"
        rows += [
            (f"DPO reward accuracy (vs {against})", "dpo_reward_accuracy"),
            (f"DPO reward margin (vs {against})", "dpo_reward_margin"),
        ]
    return rows


def _device(model: Any) -> Any:
    return next(model.parameters()).device
