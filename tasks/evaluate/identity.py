"""Identity rate: does the model answer "who are you?" with the name its data teaches?

Self-cognition data ("Who are you?" → "I am {{name}}, made by {{author}}.") is filled from
`data.placeholders` by the data stage. Its test records are the held-out identity prompts:
those whose reference contains the configured name or author. For each model the rates are

    name_rate    % of test prompts whose reference has the name, whose greedy answer has it
    author_rate  % of test prompts whose reference has the author, whose answer has it

matched case-insensitively with whitespace squeezed ("Orrin  vale" counts for "Orrin Vale").
Loss and ROUGE can improve while the name never comes out right ("I am Kaelin Vale"), so
this is what promotion's floor reads (tasks/promote). Data without such records gets none
of these fields; its usual metrics stay as they are.

The same rates are measured on the served GGUF through llama.cpp by
`tasks.evaluate.served.identity`, on the same records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.config import Config


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def contains(text: str, value: str) -> bool:
    return bool(value.strip()) and _norm(value) in _norm(text)


def records(test: list[dict], placeholders: dict[str, str], limit: int) -> list[dict]:
    """The test records that are identity prompts (reference names the assistant or its
    author), at most `limit`, in test-split order."""
    name, author = placeholders.get("name", ""), placeholders.get("author", "")
    found = [
        r
        for r in test
        if contains(r.get("output") or "", name) or contains(r.get("output") or "", author)
    ]
    return found[:limit]


def rates(answers: list[str], probes: list[dict], placeholders: dict[str, str]) -> dict:
    """{identity_prompts, name_rate, name_hits, name_prompts, author_rate, author_hits,
    author_prompts}; rates in % (0-100) like evaluate's other text metrics, None where no
    reference has that value."""
    out: dict[str, Any] = {"identity_prompts": len(probes)}
    for field in ("name", "author"):
        value = placeholders.get(field, "")
        pairs = [
            (a, r) for a, r in zip(answers, probes, strict=True) if contains(r["output"], value)
        ]
        hits = sum(contains(a, value) for a, _ in pairs)
        out[f"{field}_rate"] = round(100 * hits / len(pairs), 2) if pairs else None
        out[f"{field}_hits"] = hits
        out[f"{field}_prompts"] = len(pairs)
    return out


def add(scored: dict, model: Any, tokenizer: Any, cfg: Config, probes: list[dict]) -> None:
    """Answer the identity prompts greedily with `model` (HF) and add the rates to
    `scored["metrics"]` and the answers to `scored["identity_answers"]`; no-op without."""
    if not probes:
        return
    import torch

    from tasks.evaluate import generate
    from tasks.formatting import prompt_ids

    ev = cfg.evaluate
    prompts = [prompt_ids(tokenizer, r, cfg.train.template) for r in probes]
    with torch.inference_mode():
        answers = generate(model, tokenizer, prompts, ev.max_new_tokens, ev.batch_size)
    scored["metrics"] |= rates(answers, probes, cfg.data.placeholders)
    scored["identity_answers"] = answers


def write(folder: Path, probes: list[dict], result: dict, placeholders: dict[str, str]) -> None:
    """identity.jsonl: each identity prompt, its reference and each model's answer."""
    if not probes:
        return
    from tasks.formatting import user_text

    name = placeholders.get("name", "")
    with open(folder / "identity.jsonl", "w", encoding="utf-8") as f:
        for i, record in enumerate(probes):
            row: dict[str, Any] = {"prompt": user_text(record), "reference": record["output"]}
            for model in ("base", "sft", "tuned"):
                answers = result.get(model, {}).get("identity_answers")
                if answers is not None:
                    row[model] = answers[i]
                    row[f"{model}_has_name"] = contains(answers[i], name)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def table_rows(tuned: dict) -> list[tuple[str, str]]:
    """Rows for evaluate's table (label, metric key), present only for self-cognition data."""
    rows = []
    if tuned.get("name_rate") is not None:
        rows.append((f"name in answer % ({tuned['name_prompts']} identity prompts)", "name_rate"))
    if tuned.get("author_rate") is not None:
        rows.append((f"author in answer % ({tuned['author_prompts']} prompts)", "author_rate"))
    return rows
