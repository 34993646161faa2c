"""Like with like: what a preference run is compared on, and with which earlier run.

A preference run (its final training's objective dpo, orpo or simpo; with `train.then`, SFT
then one of those) is judged on what that training optimises: evaluate's held-out pair
ranking accuracy on the test split (tasks/evaluate/pairs.py). That number is comparable
between two runs only when it was measured on the same pairs, cut the same way, and the
runs were tuned for the same thing; so a run's basis is

    {"objective": "dpo", "metric": "ranking_accuracy", "pairs": <evaluate's pairs basis>}

and a candidate is compared with the newest run promoted under the same deployment name
with the same basis (history.jsonl records each decision with its basis and score):

    candidate ranking accuracy >= that run's   promoted (ties promote, as for SFT runs)
    candidate ranking accuracy <  that run's   kept
    no such run (the first dpo run on these pairs, or a run on other pairs or of another
    objective deployed now)                    promoted on the floor alone, as the very
                                               first model is

An SFT run has no basis (None): it is compared with the deployed GGUF by the answers both
give to the same test prompts (tasks/promote/__init__.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PREFERENCE = ("dpo", "orpo", "simpo")
METRIC = "ranking_accuracy"  # evaluate's: share of held-out pairs ranked chosen first


def of(evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """The basis of a run from its evaluation (evaluate's metrics.json), None for SFT."""
    pairs = evaluation.get("pairs") or {}
    if pairs.get("objective") not in PREFERENCE or not pairs.get("basis"):
        return None
    return {"objective": pairs["objective"], "metric": METRIC, "pairs": pairs["basis"]}


def previous(history: Path, basis: dict[str, Any]) -> dict[str, Any] | None:
    """The newest promoted decision of the same basis in history.jsonl, or None."""
    if not history.is_file():
        return None
    entries = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    same = [e for e in entries if e.get("decision") == "promoted" and e.get("basis") == basis]
    return same[-1] if same else None


def decide(history: Path, basis: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """The decision for a preference run that passed its floor: {decision, reason,
    candidate, previous}, `candidate` its score and `previous` {run_id, score} or None."""
    mine = (evaluation.get("tuned") or {}).get(METRIC)
    pairs = (evaluation.get("pairs") or {}).get("pairs")
    what = f"{basis['objective']} runs on these {pairs} held-out test pairs"
    if mine is None:
        return {
            "decision": "kept",
            "reason": f"no {METRIC} of the tuned model to compare (fix: run evaluate on a "
            "test split that holds pairs)",
            "candidate": None,
            "previous": None,
        }
    before = previous(history, basis)
    if before is None or before.get("candidate") is None:
        return {
            "decision": "promoted",
            "reason": f"the first of the {what} (pair ranking accuracy {mine:.4f})",
            "candidate": mine,
            "previous": None,
        }
    theirs = before["candidate"]
    verdict = ">=" if mine >= theirs else "<"
    return {
        "decision": "promoted" if mine >= theirs else "kept",
        "reason": f"pair ranking accuracy of {what}: candidate {mine:.4f} {verdict} "
        f"run {before.get('run_id')}'s {theirs:.4f}",
        "candidate": mine,
        "previous": {"run_id": before.get("run_id"), "score": theirs},
    }
