"""Tool-calling conversations through the data stage: ShareGPT function_call/observation
turns and OpenAI tool_calls/tool messages read into one form, bad ones rejected with
reasons."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.config import REPO_ROOT, load_config
from tasks.data import SPLITS, clean_dataset

TOOLS = [
    {
        "name": "small_claims_limit",
        "description": "The small-claims cap of a jurisdiction.",
        "parameters": {"type": "object", "properties": {"jurisdiction": {"type": "string"}}},
    }
]


def run(tmp_path: Path, source: Path, *overrides: str) -> dict:
    cfg = load_config(None, ["data.placeholders.name=Lexi", *overrides]).data
    report = clean_dataset(source, tmp_path / "out", cfg)
    out = {s: json.loads((tmp_path / "out" / f"{s}.json").read_text("utf-8")) for s in SPLITS}
    lines = (tmp_path / "out" / "rejected.jsonl").read_text("utf-8").splitlines()
    out["rejected"] = [json.loads(line) for line in lines]
    out["kept"] = out["train"] + out["dev"] + out["test"]
    assert report["input_records"] == report["kept"] + report["rejected"]
    assert report["kept"] == len(out["kept"]) and report["rejected"] == len(out["rejected"])
    return out


def sharegpt(question: str, answer: str, **extra) -> dict:
    return {
        "conversations": [
            {"from": "human", "value": question},
            {"from": "function_call", "value": '{"name": "small_claims_limit", '
             '"arguments": {"jurisdiction": "Texas"}}'},
            {"from": "observation", "value": '{"limit": "$20,000"}'},
            {"from": "gpt", "value": answer},
        ],
        "tools": json.dumps(TOOLS),
    } | extra  # fmt: skip


def openai(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You are {{name}}."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "c1", "type": "function",
                "function": {"name": "small_claims_limit", "arguments": '{"jurisdiction": "Ohio"}'},
            }]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"limit": "$6,000"}'},
            {"role": "assistant", "content": answer},
        ],
        "tools": [{"type": "function", "function": TOOLS[0]}],
    }  # fmt: skip


def test_both_shapes_become_one_form(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([sharegpt("Cap in Texas?", "It is $20,000.")]))
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps(openai("Cap in Ohio?  ", "It is $6,000.")) + "\n")
    out = run(tmp_path, tmp_path)
    assert out["rejected"] == []
    by_q = {r["instruction"]: r for r in out["kept"]}
    texas, ohio = by_q["Cap in Texas?"], by_q["Cap in Ohio?"]
    assert [m["role"] for m in texas["messages"]] == ["user", "assistant", "tool", "assistant"]
    call = texas["messages"][1]["tool_calls"][0]["function"]
    assert call == {"name": "small_claims_limit", "arguments": {"jurisdiction": "Texas"}}
    assert texas["tools"] == [{"type": "function", "function": TOOLS[0]}]
    assert texas["output"] == "It is $20,000."
    assert ohio["system"] == "You are Lexi."  # placeholders filled in tool records too
    assert ohio["messages"][0]["content"] == "Cap in Ohio?"  # cleaned like other fields
    assert ohio["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"jurisdiction": "Ohio"}
    assert ohio["messages"][2] == {"role": "tool", "content": '{"limit": "$6,000"}'}


def test_a_conversation_may_end_with_the_call_itself(tmp_path):
    record = sharegpt("Cap in Texas?", "x")
    record["conversations"] = record["conversations"][:2]
    (tmp_path / "a.json").write_text(json.dumps([record]))
    (kept,) = run(tmp_path, tmp_path / "a.json")["kept"]
    assert json.loads(kept["output"]) == [
        {"name": "small_claims_limit", "arguments": {"jurisdiction": "Texas"}}
    ]


def test_bad_tool_records_are_rejected_with_reasons(tmp_path):
    no_name = sharegpt("Q1?", "A1.")
    no_name["conversations"][1]["value"] = '{"arguments": {}}'
    not_json = sharegpt("Q2?", "A2.")
    not_json["conversations"][1]["value"] = "small_claims_limit(Texas)"
    orphan = sharegpt("Q3?", "A3.")
    del orphan["conversations"][1]  # a tool result no call asked for
    ends_with_result = sharegpt("Q4?", "A4.")
    ends_with_result["conversations"].pop()
    bad_args = openai("Q5?", "A5.")
    bad_args["messages"][2]["tool_calls"][0]["function"]["arguments"] = "[1, 2]"
    records = [no_name, not_json, orphan, ends_with_result, bad_args, sharegpt("Q6?", "A6.")]
    (tmp_path / "t.json").write_text(json.dumps(records))
    out = run(tmp_path, tmp_path / "t.json")
    assert [(r["row"], r["reason"]) for r in out["rejected"]] == [
        (1, "bad_tool_call"),
        (2, "bad_tool_call"),
        (3, "bad_conversation"),
        (4, "bad_conversation"),
        (5, "bad_tool_call"),
    ]
    assert "not JSON" in out["rejected"][1]["detail"]
    assert [r["instruction"] for r in out["kept"]] == ["Q6?"]


def test_the_demo_tool_set(tmp_path):
    out = run(tmp_path, REPO_ROOT / "datasets_raw" / "tools")
    assert len(out["kept"]) == 120 and out["rejected"] == []
    calls = [r for r in out["kept"] if any(m.get("tool_calls") for m in r["messages"])]
    assert len(calls) >= 100 and all(r["tools"] for r in out["kept"])
