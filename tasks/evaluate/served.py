"""Evaluate's scorers applied to a GGUF through llama.cpp: what the served model answers.

    answers(gguf, records, max_tokens)          greedy chat answers (the GGUF's own template)
    rouge_l(gguf, records, max_tokens)          mean ROUGE-L F1 (0-100) of those answers,
                                                by evaluate's `text_metrics`
    identity(gguf, test, placeholders, ...)     name_rate / author_rate on the identity
                                                prompts (tasks/evaluate/identity.py)
    run_identity(cfg, gguf, data_dir)           the same for a run: its test split, its
                                                placeholders, evaluate's limits

Promotion (tasks/promote) compares the candidate and the deployed GGUF with `rouge_l` and
checks its name-rate floor with `run_identity`, so one ROUGE-L implementation scores both
the HF models here and the GGUFs there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tasks.config import Config
from tasks.evaluate import identity as identity_rates
from tasks.evaluate import text_metrics
from tasks.formatting import to_messages, user_text


def answers(gguf: str | Path, records: list[dict[str, Any]], max_tokens: int) -> list[str]:
    """Greedy llama.cpp answers to each record's conversation (system, history, question)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    out = []
    for record in records:
        reply = llm.create_chat_completion(
            messages=to_messages(record), max_tokens=max_tokens, temperature=0.0
        )
        out.append((reply["choices"][0]["message"]["content"] or "").strip())
    return out


def rouge_l(
    gguf: str | Path, records: list[dict[str, Any]], max_tokens: int, zh: str = "jieba"
) -> float:
    """Mean ROUGE-L F1 (0-100) of the GGUF's greedy answers against the references."""
    said = answers(gguf, records, max_tokens)
    return text_metrics(said, [r.get("output") or "" for r in records], zh)["rougeL"]


def identity(
    gguf: str | Path,
    test: list[dict[str, Any]],
    placeholders: dict[str, str],
    limit: int = 64,
    max_tokens: int = 64,
) -> dict[str, Any] | None:
    """Identity rates of the GGUF on the test split's identity prompts, with each answer;
    None when the test split has none (data that is not self-cognition)."""
    probes = identity_rates.records(test, placeholders, limit)
    if not probes:
        return None
    said = answers(gguf, probes, max_tokens)
    name = placeholders.get("name", "")
    shown = [
        {"prompt": user_text(r), "answer": a, "has_name": identity_rates.contains(a, name)}
        for r, a in zip(probes, said, strict=True)
    ]
    rates = identity_rates.rates(said, probes, placeholders)
    return {"gguf": str(gguf), **rates, "answers": shown}


def run_identity(cfg: Config, gguf: str | Path, data_dir: str | Path) -> dict[str, Any] | None:
    """`identity` for a run: the data stage's test split, the configured placeholders and
    evaluate's limits (what `llmft run` reports for its served GGUF)."""
    test = json.loads((Path(data_dir) / "test.json").read_text(encoding="utf-8"))
    ev = cfg.evaluate
    return identity(gguf, test, cfg.data.placeholders, ev.identity_prompts, ev.max_new_tokens)
