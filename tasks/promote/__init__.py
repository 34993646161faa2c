"""Promote stage: make a run's served GGUF the deployed model, if it is at least as good.

    artifacts/deployed/<name>/current.json   {"gguf", "run_id", "evaluation", "promoted_at"}
    artifacts/deployed/<name>/model.gguf     a symlink to that GGUF (`llmft chat --model` it)
    artifacts/deployed/<name>/MODEL_CARD.md  base, method, data, metrics, how to run it
    artifacts/deployed/<name>/history.jsonl  every decision, promoted or not, with its reason

The rule: the candidate and the deployed GGUF answer the same test prompts (the first
`pipeline.promote_samples` records of this run's test split) greedily through llama.cpp,
and the mean ROUGE-L F1 of their answers against the references is compared. The
candidate is promoted when its score is >= the deployed one's (ties promote: the newer
run has seen the newer data). Both models are scored by the same engine on the same
prompts, so a change of test split between runs cannot make the comparison unfair.

`current.json` and `model.gguf` are replaced atomically, so `llmft serve --deployed NAME`
never reads half of the pointer and picks up a new promotion without a restart, and a
`llmft chat` started mid-promotion opens the old model or the new one, never no file.

Run alone: `python -m tasks.promote --summary artifacts/runs/latest.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from tasks.formatting import to_messages
from tasks.store import write_json_atomic

METRIC = "rougeL_f1"
Scorer = Callable[[Path, list[dict[str, Any]], int], float]


def deployed_dir(store_root: str | Path, name: str) -> Path:
    return Path(store_root).resolve() / "deployed" / name


def current(store_root: str | Path, name: str) -> dict[str, Any] | None:
    """The deployed model's pointer, or None when nothing is deployed under `name`."""
    path = deployed_dir(store_root, name) / "current.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _tokens(text: str) -> list[str]:
    # One token per CJK character, words elsewhere: ROUGE's default tokenizer drops non-ASCII.
    return re.findall(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|[^\W_]+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 from the longest common subsequence of tokens."""
    a, b = _tokens(prediction), _tokens(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def score_gguf(gguf: Path, records: list[dict[str, Any]], max_tokens: int) -> float:
    """Mean ROUGE-L F1 of greedy llama.cpp answers against the references."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    scores = []
    for record in records:
        out = llm.create_chat_completion(
            messages=to_messages(record), max_tokens=max_tokens, temperature=0.0
        )
        scores.append(rouge_l(out["choices"][0]["message"]["content"] or "", record["output"]))
    return sum(scores) / len(scores)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _link_atomic(link: Path, target: Path) -> None:
    # A symlink cannot be overwritten in place: make it under a temp name, rename over.
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def promote(
    store_root: str | Path,
    name: str,
    gguf: str | Path,
    run_id: str,
    evaluation: dict[str, Any],
    test_records: list[dict[str, Any]],
    model_card: str,
    max_tokens: int = 64,
    scorer: Scorer = score_gguf,
) -> dict[str, Any]:
    """Point `deployed/<name>` at `gguf` if it scores at least as well; say why either way.

    Returns {"decision": promoted|kept|unchanged, "reason", "metric", "candidate",
    "deployed", "prompts", "pointer"}.
    """
    folder = deployed_dir(store_root, name)
    folder.mkdir(parents=True, exist_ok=True)
    gguf = Path(gguf).resolve()
    with FileLock(str(folder / ".lock")):  # two runs finishing together promote one by one
        now = current(store_root, name)
        decision: dict[str, Any] = {
            "metric": METRIC,
            "candidate": None,
            "deployed": None,
            "prompts": len(test_records),
            "pointer": str(folder / "current.json"),
        }
        if now and Path(now["gguf"]) == gguf:
            decision |= {"decision": "unchanged", "reason": "this GGUF is already deployed"}
        elif now is None:
            decision |= {"decision": "promoted", "reason": f"nothing was deployed as {name!r}"}
        elif not Path(now["gguf"]).is_file():
            decision |= {
                "decision": "promoted",
                "reason": f"the deployed file {now['gguf']} no longer exists",
            }
        elif not test_records:
            decision |= {
                "decision": "kept",
                "reason": "no test prompts to compare on; the deployed model stays",
            }
        else:
            mine = scorer(gguf, test_records, max_tokens)
            theirs = scorer(Path(now["gguf"]), test_records, max_tokens)
            decision |= {"candidate": round(mine, 4), "deployed": round(theirs, 4)}
            verdict = ">=" if mine >= theirs else "<"
            decision |= {
                "decision": "promoted" if mine >= theirs else "kept",
                "reason": f"{METRIC} on {len(test_records)} test prompts: candidate "
                f"{mine:.4f} {verdict} deployed {theirs:.4f} (run {now.get('run_id')})",
            }
        if decision["decision"] == "promoted":
            pointer = {
                "gguf": str(gguf),
                "run_id": run_id,
                "evaluation": evaluation,
                "promotion": {k: decision[k] for k in ("metric", "candidate", "prompts")},
                "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _write_text_atomic(folder / "MODEL_CARD.md", model_card)
            _link_atomic(folder / "model.gguf", gguf)
            write_json_atomic(folder / "current.json", pointer)  # last: the switch-over
        elif now and not (folder / "model.gguf").is_symlink():  # deployed before the link
            _link_atomic(folder / "model.gguf", Path(now["gguf"]))
        with open(folder / "history.jsonl", "a", encoding="utf-8") as f:
            entry = {"run_id": run_id, "gguf": str(gguf), "at": time.time(), **decision}
            f.write(json.dumps(entry) + "\n")
    return decision


def model_card(
    name: str,
    summary: dict[str, Any],
    evaluation_md: str = "",
    verification_md: str = "",
) -> str:
    """The markdown that travels with a deployed model (also a Prefect artifact)."""
    cfg = summary["config"]
    data = summary.get("data") or {}
    dev = summary.get("dev_loss") or {}
    gguf = summary.get("served_gguf")
    lines = [
        f"# {name}",
        "",
        f"Fine-tuned from `{cfg['base']['model']}` with **{cfg['train']['method']}** by llmft "
        f"(run `{summary['run_id']}`).",
        "",
        "## Data",
        "",
        f"- input: `{cfg['data']['input']}`",
        f"- records: {data.get('input_records')} read, {data.get('kept')} kept, "
        f"{data.get('rejected')} rejected",
        f"- split: {data.get('train')} train / {data.get('dev')} dev / {data.get('test')} test",
        "",
        "## Training",
        "",
        f"- dev loss: {dev.get('before')} → {dev.get('after')}",
        f"- learning rate {cfg['train']['learning_rate']}, batch {cfg['train']['batch_size']}, "
        f"max steps {cfg['train']['max_steps']}, epochs {cfg['train']['num_epochs']}",
        "",
        "## Evaluation (base vs tuned, test split)",
        "",
        evaluation_md.strip() or "(not available)",
        "",
        "## GGUF verification",
        "",
        verification_md.strip() or "(not exported)",
        "",
        "## How to run it",
        "",
    ]
    if gguf is None:  # P-Tuning v2: nothing llama.cpp can run
        lines += [f"No GGUF was made: {summary.get('export_skipped') or 'export skipped'}.", ""]
        return "\n".join(lines)
    lines += [
        "```",
        f"llmft chat --model {gguf} --prompt 'Who are you?'",
        f"llmft serve --deployed {name}        # OpenAI API + chat page on 127.0.0.1:8000",
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", default="artifacts/runs/latest.json")
    args = parser.parse_args()
    summary = json.loads(Path(args.summary).read_text())
    cfg = summary["config"]
    data_dir = Path(summary["stages"]["data"]["path"])
    records = json.loads((data_dir / "test.json").read_text())
    decision = promote(
        cfg["pipeline"]["store"],
        cfg["pipeline"]["name"],
        summary["served_gguf"],
        summary["run_id"],
        summary.get("evaluation") or {},
        records[: cfg["pipeline"]["promote_samples"]],
        model_card(cfg["pipeline"]["name"], summary),
        max_tokens=cfg["evaluate"]["max_new_tokens"],
    )
    print(json.dumps(decision, indent=2))
