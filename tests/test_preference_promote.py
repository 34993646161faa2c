"""Promotion compares like with like (tasks/promote/basis.py, gate.py).

A preference run is gated on its held-out pair ranking accuracy against the model its
preference training started from (the SFT model of a chain, else the base), and compared
only with the newest promoted run of the same objective on the same held-out pairs, by
that metric; never with a deployed run of another objective or other pairs, and never by
the SFT runs' GGUF answers. SFT runs keep their rule (tests/test_promote.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import promote
from tasks.promote import basis
from tasks.promote.gate import Floor, check


def evaluation(tuned: float, start: float = 0.5, objective: str = "dpo", pairs: str = "p1",
               chained: bool = True) -> dict:  # fmt: skip
    """evaluate's metrics.json for a run on 20 held-out pairs."""
    out = {
        "base": {"rougeL": 10.0, "ranking_accuracy": 0.3},
        "tuned": {"rougeL": 10.5, "ranking_accuracy": tuned},
        "pairs": {"split": "test", "pairs": 20, "basis": pairs, "objective": objective},
    }
    if chained:
        out["sft"] = {"rougeL": 30.0, "ranking_accuracy": start}
    else:
        out["base"]["ranking_accuracy"] = start
    return out


def never(gguf, records, max_tokens):
    raise AssertionError("a preference run is not compared by the GGUFs' answers")


def run(tmp_path: Path, run_id: str, ev: dict, scorer=never, floor: Floor | None = None):
    gguf = tmp_path / f"{run_id}.gguf"
    gguf.write_bytes(b"GGUF")
    records = [{"instruction": "q", "output": "a"}]
    return promote.promote(tmp_path / "store", "pairs", gguf, run_id, ev, records,
                           f"# {run_id}\n", scorer=scorer, floor=floor)  # fmt: skip


def deployed(tmp_path: Path) -> str:
    return promote.current(tmp_path / "store", "pairs")["run_id"]


def test_the_basis_names_objective_metric_and_pairs_and_sft_runs_have_none():
    assert basis.of(evaluation(0.8)) == {
        "objective": "dpo",
        "metric": "ranking_accuracy",
        "pairs": "p1",
    }
    assert basis.of(evaluation(0.8, objective="sft")) is None  # SFT on the chosen answers
    assert basis.of({"tuned": {"rougeL": 3.0}, "base": {"rougeL": 1.0}}) is None


def test_the_floor_of_a_preference_run_is_its_pair_ranking_against_where_it_started():
    floor = Floor(margin=1.0, min_name_rate=80.0)
    passed, failed = check(floor, evaluation(0.9, start=0.8), None)
    assert failed == [] and passed == [
        "held-out pair ranking accuracy sft 80.0 % → tuned 90.0 % (+10.0 points; ≥ margin 1)"
    ]
    # the same number against the SFT model it started from, not the weaker base
    passed, failed = check(floor, evaluation(0.8, start=0.8), None)
    assert passed == [] and "sft 80.0 % → tuned 80.0 % (+0.0 points; < margin 1)" in failed[0]
    # without a chain the preference training started from the base
    passed, _ = check(floor, evaluation(0.9, start=0.5, chained=False), None)
    assert "base 50.0 % → tuned 90.0 %" in passed[0]
    # ROUGE-L is what SFT runs are gated on: here tuned is 19.5 points below the SFT model
    # and 0.5 above the base, and neither enters the preference run's floor
    assert not any("ROUGE-L" in line for line in passed + failed)
    no_base = evaluation(0.9, chained=False)
    del no_base["base"]
    _, failed = check(floor, no_base, None)
    assert "evaluate scored no base model's held-out pair ranking" in failed[0]
    assert "fix: --set evaluate.compare_base=true" in failed[0]
    assert check(Floor(margin=None), evaluation(0.1, start=0.9), None) == ([], [])


def test_an_sft_run_on_pairs_keeps_the_rouge_floor():
    passed, failed = check(Floor(margin=1.0), evaluation(0.1, objective="sft"), None)
    assert passed == [] and failed[0].startswith("ROUGE-L F1 base 10.00 → tuned 10.50")


def test_a_preference_run_is_compared_with_the_last_promoted_run_of_its_basis(tmp_path):
    first = run(tmp_path, "dpo-1", evaluation(0.80))
    assert first["decision"] == "promoted" and first["metric"] == "ranking_accuracy"
    assert "the first of the dpo runs on these 20 held-out test pairs" in first["reason"]
    assert first["candidate"] == 0.80 and first["prompts"] == 20
    worse = run(tmp_path, "dpo-2", evaluation(0.75))
    assert worse["decision"] == "kept" and deployed(tmp_path) == "dpo-1"
    assert "candidate 0.7500 < run dpo-1's 0.8000" in worse["reason"]
    assert worse["previous"] == {"run_id": "dpo-1", "score": 0.80}
    tie = run(tmp_path, "dpo-3", evaluation(0.80))
    assert tie["decision"] == "promoted" and deployed(tmp_path) == "dpo-3"
    now = promote.current(tmp_path / "store", "pairs")
    assert now["promotion"] == {"metric": "ranking_accuracy", "candidate": 0.80, "prompts": 20}
    # the next one is compared with dpo-3, the newest promoted, not with the kept dpo-2
    assert run(tmp_path, "dpo-4", evaluation(0.79))["previous"]["run_id"] == "dpo-3"


@pytest.mark.parametrize(
    ("other", "why"),
    [
        ({"pairs": "p2"}, "other held-out pairs"),
        ({"objective": "orpo"}, "another objective"),
    ],
)
def test_runs_of_another_basis_are_not_compared(tmp_path, other, why):
    run(tmp_path, "dpo-1", evaluation(0.95))
    # a far lower number, but measured on other pairs or tuned for another thing: no rival
    decision = run(tmp_path, "other", evaluation(0.40, **other))
    assert decision["decision"] == "promoted", why
    assert decision["previous"] is None and "the first of the" in decision["reason"]
    assert deployed(tmp_path) == "other"


def test_an_sft_run_between_two_dpo_runs_is_not_their_rival(tmp_path):
    run(tmp_path, "dpo-1", evaluation(0.9))
    sft = {"tuned": {"rougeL": 40.0}, "base": {"rougeL": 10.0}}
    scores = {"dpo-1.gguf": 20.0, "sft-1.gguf": 30.0}
    up = run(tmp_path, "sft-1", sft, scorer=lambda g, r, m: scores[g.name])
    assert up["decision"] == "promoted" and up["basis"] is None and up["metric"] == "rougeL"
    again = run(tmp_path, "dpo-2", evaluation(0.85))
    assert again["decision"] == "kept" and again["previous"]["run_id"] == "dpo-1"
    assert deployed(tmp_path) == "sft-1"
    history = (promote.deployed_dir(tmp_path / "store", "pairs") / "history.jsonl").read_text()
    entries = [json.loads(line) for line in history.splitlines()]
    assert [e["basis"] is not None for e in entries] == [True, False, True]


def test_a_preference_run_below_its_floor_is_rejected_even_as_the_first(tmp_path):
    decision = run(tmp_path, "dpo-1", evaluation(0.6, start=0.7), floor=Floor(margin=1.0))
    assert decision["decision"] == "rejected"
    assert "below the floor: held-out pair ranking accuracy sft 70.0 %" in decision["reason"]
    assert promote.current(tmp_path / "store", "pairs") is None
    ok = run(tmp_path, "dpo-2", evaluation(0.8, start=0.7), floor=Floor(margin=1.0))
    assert ok["decision"] == "promoted" and "floor passed: held-out pair ranking" in ok["reason"]
