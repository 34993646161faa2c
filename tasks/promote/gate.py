"""Promotion's floor: what a candidate must reach before it is compared with anything.

    1. what its last training optimised, against the model that training started from,
       by pipeline.promote_margin points (None: not checked):
       - an SFT run: evaluate's main metric, ROUGE-L F1 of its test answers (0-100):
         tuned - base >= promote_margin
       - a preference run (dpo, orpo, simpo; tasks/promote/basis.py): evaluate's held-out
         pair ranking accuracy on the test split, in % (0-100): tuned - start >=
         promote_margin, start the SFT model of a `train.then` chain, else the base
    2. self-cognition data (test references that name the assistant): the served GGUF's
       greedy answer contains data.placeholders.name on >= pipeline.promote_min_name_rate %
       of the held-out identity prompts (tasks/evaluate/identity.py)

The first model to be deployed passes the same floor: with nothing deployed, a run whose
loss and ROUGE-L went up while its answers name "Kaelin Vale" instead of "Orrin Vale" is
not deployed for want of a rival. Both numbers are evaluate's: the margin reads its
metrics.json, the name rate its identity check run on the GGUF (tasks/evaluate/served.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.config import PipelineConfig
from tasks.evaluate import MAIN_METRIC
from tasks.promote import basis


@dataclass(frozen=True)
class Floor:
    margin: float | None = 1.0  # ROUGE-L F1 points over the base
    min_name_rate: float = 80.0  # % of identity prompts answered with the name

    @classmethod
    def from_config(cls, p: PipelineConfig) -> Floor:
        return cls(margin=p.promote_margin, min_name_rate=p.promote_min_name_rate)


def check(
    floor: Floor, evaluation: dict[str, Any], identity: dict[str, Any] | None
) -> tuple[list[str], list[str]]:
    """(passed, failed): one readable line per check of the floor."""
    passed: list[str] = []
    failed: list[str] = []
    if floor.margin is not None and basis.of(evaluation) is not None:
        _pair_gain(floor.margin, evaluation, passed, failed)
    elif floor.margin is not None:
        base = (evaluation.get("base") or {}).get(MAIN_METRIC)
        tuned = (evaluation.get("tuned") or {}).get(MAIN_METRIC)
        if tuned is None:
            failed.append(
                "no evaluation of the tuned model, so ROUGE-L F1 cannot be compared with the "
                "base (fix: run the evaluate stage, or --set pipeline.promote_margin=null)"
            )
        elif base is None:
            failed.append(
                "evaluate scored no base model, so ROUGE-L F1 cannot be compared with it "
                "(fix: --set evaluate.compare_base=true, or --set pipeline.promote_margin=null)"
            )
        else:
            gain = tuned - base
            line = (
                f"ROUGE-L F1 base {base:.2f} → tuned {tuned:.2f} ({gain:+.2f}; "
                f"{'≥' if gain >= floor.margin else '<'} margin {floor.margin:g})"
            )
            (passed if gain >= floor.margin else failed).append(line)
    if identity and identity.get("name_rate") is not None:
        rate = identity["name_rate"]
        ok = rate >= floor.min_name_rate
        line = (
            f"name in {identity['name_hits']} of {identity['name_prompts']} held-out identity "
            f"answers of the served GGUF ({rate:g} % {'≥' if ok else '<'} "
            f"{floor.min_name_rate:g} %)"
        )
        (passed if ok else failed).append(line)
    return passed, failed


def _pair_gain(margin: float, evaluation: dict[str, Any], passed: list, failed: list) -> None:
    """A preference run: held-out pair ranking accuracy, tuned against where it started."""
    start = "sft" if evaluation.get("sft") else "base"
    before = (evaluation.get(start) or {}).get(basis.METRIC)
    tuned = (evaluation.get("tuned") or {}).get(basis.METRIC)
    if tuned is None or before is None:
        failed.append(
            f"evaluate scored no {'tuned' if tuned is None else start} model's held-out pair "
            "ranking, so the preference training cannot be compared with its start (fix: "
            "--set evaluate.compare_base=true, or --set pipeline.promote_margin=null)"
        )
        return
    gain = 100 * (tuned - before)
    line = (
        f"held-out pair ranking accuracy {start} {100 * before:.1f} % → tuned "
        f"{100 * tuned:.1f} % ({gain:+.1f} points; {'≥' if gain >= margin else '<'} margin "
        f"{margin:g})"
    )
    (passed if gain >= margin else failed).append(line)
