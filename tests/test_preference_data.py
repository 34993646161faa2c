"""Preference pairs through the data stage: every shape the docs name, in every file format,
with the same nothing-lost rules as SFT records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import load_config
from tasks.data import SPLITS, clean_dataset


def run(tmp_path: Path, source: Path) -> dict:
    report = clean_dataset(source, tmp_path / "out", load_config().data)
    out = {s: json.loads((tmp_path / "out" / f"{s}.json").read_text("utf-8")) for s in SPLITS}
    lines = (tmp_path / "out" / "rejected.jsonl").read_text("utf-8").splitlines()
    out["rejected"] = [json.loads(line) for line in lines]
    out["kept"] = out["train"] + out["dev"] + out["test"]
    assert report["input_records"] == report["kept"] + report["rejected"]
    assert report["kept"] == len(out["kept"]) and report["rejected"] == len(out["rejected"])
    out["report"] = report
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return path


SHAPES = [
    {"prompt": "What is a tort?", "chosen": "A civil wrong.", "rejected": "I cannot say."},
    {
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "民法典何时施行？"},
        ],
        "chosen": [{"role": "assistant", "content": "2021年1月1日。"}],
        "rejected": [{"role": "assistant", "content": "不清楚。"}],
    },
    {
        "conversations": [
            {"from": "human", "value": "Define bail."},
            {"from": "gpt", "value": "Temporary release."},
            {"from": "human", "value": "Who sets it?"},
        ],
        "chosen": {"from": "gpt", "value": "A judge."},
        "rejected": {"from": "gpt", "value": "Nobody knows."},
    },
    {
        "messages": [{"role": "user", "content": "Is a verbal contract binding?"}],
        "chosen": {"role": "assistant", "content": "Often, yes."},
        "rejected": "Never.",
    },
    {
        "chosen": [
            {"role": "user", "content": "What is perjury?"},
            {"role": "assistant", "content": "Lying under oath."},
        ],
        "rejected": [
            {"role": "user", "content": "What is perjury?"},
            {"role": "assistant", "content": "A kind of jury."},
        ],
    },
]


def test_every_preference_shape_becomes_prompt_chosen_rejected(tmp_path):
    out = run(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", SHAPES))
    assert out["rejected"] == [] and out["report"]["files"][0]["shape"] == "preference"
    by_prompt = {r["instruction"]: r for r in out["kept"]}
    assert by_prompt["What is a tort?"]["output"] == "A civil wrong."
    assert by_prompt["What is a tort?"]["rejected"] == "I cannot say."
    assert by_prompt["民法典何时施行？"]["system"] == "Answer briefly."
    assert by_prompt["民法典何时施行？"]["rejected"] == "不清楚。"
    bail = by_prompt["Who sets it?"]
    assert bail["history"] == [["Define bail.", "Temporary release."]]
    assert (bail["output"], bail["rejected"]) == ("A judge.", "Nobody knows.")
    assert by_prompt["Is a verbal contract binding?"]["rejected"] == "Never."
    assert by_prompt["What is perjury?"]["rejected"] == "A kind of jury."


def test_bad_pairs_are_rejected_with_reasons_that_describe_them(tmp_path):
    records = [
        {"prompt": "Q1", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "Q2", "chosen": "Fine.", "rejected": "   "},
        {"prompt": "Q3", "chosen": "Fine."},
        {
            "chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
            "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}],
        },
        {"messages": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},
        {"prompt": "Q6", "chosen": "Good.", "rejected": "Bad."},
    ]
    out = run(tmp_path, write_jsonl(tmp_path / "bad.jsonl", records))
    reasons = {r["line"]: r["reason"] for r in out["rejected"]}
    assert reasons == {
        1: "same_answers",
        2: "empty_rejected",
        3: "empty_rejected",
        4: "prompt_mismatch",
        5: "bad_conversation",
    }
    assert [r["instruction"] for r in out["kept"]] == ["Q6"]
    assert out["rejected"][0]["record"] == records[0]  # the original, for the user to fix


def test_csv_and_parquet_pairs(tmp_path):
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No idea {i}."}
        for i in range(12)
    ]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    from_csv = run(tmp_path / "c", tmp_path / "pairs.csv")
    from_parquet = run(tmp_path / "p", tmp_path / "pairs.parquet")
    assert from_csv["train"] == from_parquet["train"]
    assert len(from_csv["kept"]) == 12
    assert {r["rejected"] for r in from_csv["kept"]} == {f"No idea {i}." for i in range(12)}


def test_pairs_of_one_prompt_share_a_split_and_duplicates_go(tmp_path):
    records = [
        {"prompt": f"Prompt {i // 3}", "chosen": f"Good {i}.", "rejected": f"Bad {i}."}
        for i in range(60)
    ]
    records.append(dict(records[0]))
    out = run(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", records))
    split_of: dict[str, set[str]] = {}
    for split in SPLITS:
        for r in out[split]:
            split_of.setdefault(r["instruction"], set()).add(split)
    assert all(len(s) == 1 for s in split_of.values())
    assert [r["reason"] for r in out["rejected"]] == ["duplicate"]


def test_a_file_of_sft_and_preference_records_keeps_both(tmp_path):
    records = [
        {"instruction": "Plain question", "output": "Plain answer."},
        {"prompt": "Pair question", "chosen": "Yes.", "rejected": "No."},
    ]
    out = run(tmp_path, write_jsonl(tmp_path / "mixed.jsonl", records))
    by_prompt = {r["instruction"]: r for r in out["kept"]}
    assert "rejected" not in by_prompt["Plain question"]
    assert by_prompt["Pair question"]["rejected"] == "No."


def test_the_demo_preference_set(tmp_path):
    """datasets_raw/preference: ≥ 200 clean pairs in English and Chinese, left out of the
    default (SFT) recipe by data.exclude."""
    from tasks.config import REPO_ROOT

    out = run(tmp_path, REPO_ROOT / "datasets_raw" / "preference")
    assert out["rejected"] == [] and len(out["kept"]) >= 200
    chinese = [r for r in out["kept"] if any("\u4e00" <= c <= "\u9fff" for c in r["instruction"])]
    assert 80 <= len(chinese) <= len(out["kept"]) - 80
    assert all(len(r["output"]) > 20 and r["rejected"] != r["output"] for r in out["kept"])
