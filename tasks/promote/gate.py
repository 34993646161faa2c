"""Promotion's floor: what a candidate must reach before it is compared with anything.

    1. evaluate's main metric, ROUGE-L F1 of its test answers (0-100): tuned - base >=
       pipeline.promote_margin (None: not checked)
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
    if floor.margin is not None:
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
