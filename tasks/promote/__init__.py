"""Promote stage: make a run's served GGUF the deployed model, if it passes the floor and
is at least as good as the deployed one.

    artifacts/deployed/<name>/current.json   {"gguf", "run_id", "evaluation", "promoted_at"}
    artifacts/deployed/<name>/model.gguf     a symlink to that GGUF (`llmft chat --model` it)
    artifacts/deployed/<name>/MODEL_CARD.md  base, method, data, metrics, how to run it
    artifacts/deployed/<name>/history.jsonl  every decision, promoted or not, with its reason

The rule, in order:

1. the floor (tasks/promote/gate.py), for every candidate, the first one included: evaluate's
   ROUGE-L F1 must beat the base's by `pipeline.promote_margin` points and, for
   self-cognition data, the served GGUF must name the assistant in at least
   `pipeline.promote_min_name_rate` % of the held-out identity prompts; else "rejected";
2. a preference run (dpo, orpo, simpo, alone or after SFT with `train.then`): against the
   newest promoted run of the same objective on the same held-out pairs, by evaluate's
   pair ranking accuracy; the first of its kind is promoted on the floor alone
   (tasks/promote/basis.py says why and how);
3. an SFT run, against the deployed model: both GGUFs answer the same test prompts (the
   first `pipeline.promote_samples` of this run's test split) greedily through llama.cpp,
   and the mean ROUGE-L F1 of their answers, by evaluate's own scorer
   (tasks/evaluate/served.py), is compared. The candidate is promoted when its score is >=
   the deployed one's (ties promote: the newer run has seen the newer data). Both are
   scored by the same engine on the same prompts, so a change of test split between runs
   cannot make it unfair.

Every decision says why, in the run's summary (`promotion`), history.jsonl and the model
card shown in the Prefect UI.

`current.json` and `model.gguf` are replaced atomically, so `llmft serve --deployed NAME`
never reads half of the pointer and picks up a new promotion without a restart, and a
`llmft chat` started mid-promotion opens the old model or the new one, never no file.

Run alone: `python -m tasks.promote --summary artifacts/runs/latest.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from filelock import FileLock

from tasks.config import Config
from tasks.evaluate import MAIN_METRIC, served
from tasks.promote import basis
from tasks.promote.gate import Floor, check
from tasks.store import write_json_atomic

METRIC = MAIN_METRIC  # evaluate's ROUGE-L F1, 0-100, of the GGUFs' answers
Scorer = Callable[[Path, list[dict[str, Any]], int], float]


def deployed_dir(store_root: str | Path, name: str) -> Path:
    return Path(store_root).resolve() / "deployed" / name


def current(store_root: str | Path, name: str) -> dict[str, Any] | None:
    """The deployed model's pointer, or None when nothing is deployed under `name`."""
    path = deployed_dir(store_root, name) / "current.json"
    return json.loads(path.read_text()) if path.is_file() else None


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
    scorer: Scorer = served.rouge_l,
    floor: Floor | None = None,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Point `deployed/<name>` at `gguf` if it passes `floor` (None: no floor) and scores at
    least as well as the deployed GGUF; say why either way. `identity` is the served GGUF's
    identity check (tasks/evaluate/served.py), None for data that is not self-cognition.

    Returns {"decision": promoted|kept|rejected|unchanged, "reason", "metric", "candidate",
    "deployed", "prompts", "pointer", "floor": {"passed", "failed"}, "identity"}.
    """
    folder = deployed_dir(store_root, name)
    folder.mkdir(parents=True, exist_ok=True)
    gguf = Path(gguf).resolve()
    kind = basis.of(evaluation)  # a preference run's basis; None: an SFT run
    with FileLock(str(folder / ".lock")):  # two runs finishing together promote one by one
        now = current(store_root, name)
        decision: dict[str, Any] = {
            "metric": basis.METRIC if kind else METRIC,
            "candidate": None,
            "deployed": None,
            "prompts": evaluation["pairs"]["pairs"] if kind else len(test_records),
            "pointer": str(folder / "current.json"),
            "identity": {k: v for k, v in (identity or {}).items() if k != "answers"} or None,
            "basis": kind,
        }
        passed, failed = check(floor, evaluation, identity) if floor else ([], [])
        decision["floor"] = {"passed": passed, "failed": failed}
        floor_ok = f"; floor passed: {'; '.join(passed)}" if passed else ""
        if now and Path(now["gguf"]) == gguf:
            decision |= {"decision": "unchanged", "reason": "this GGUF is already deployed"}
        elif failed:
            stays = f"nothing is deployed as {name!r}"
            if now:
                stays = f"the deployed model (run {now.get('run_id')}) stays"
            decision |= {
                "decision": "rejected",
                "reason": f"below the floor: {'; '.join(failed)}; {stays}",
            }
        elif kind is not None:  # the same metric on the same pairs, or the floor alone
            decision |= basis.decide(folder / "history.jsonl", kind, evaluation)
            decision["reason"] += floor_ok
        elif now is None:
            decision |= {
                "decision": "promoted",
                "reason": f"nothing was deployed as {name!r}{floor_ok}",
            }
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
                f"{mine:.2f} {verdict} deployed {theirs:.2f} (run {now.get('run_id')})" + floor_ok,
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
    from tasks.publish import dev_loss_text  # how every artifact writes the dev loss

    cfg = summary["config"]
    data = summary.get("data") or {}
    dev = summary.get("dev_loss") or {}
    gguf = summary.get("served_gguf")
    chained = bool((cfg["train"].get("then") or {}).get("objective"))
    # the served GGUF's identity check: the run's own, or the one promotion made
    identity = summary.get("identity") or (summary.get("promotion") or {}).get("identity")
    lines = [
        f"# {name}",
        "",
        f"Fine-tuned from `{cfg['base']['model']}` with **{cfg['train']['method']}**"
        f"{_objectives(cfg['train'])} by llmft (run `{summary['run_id']}`).",
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
        f"- dev loss: {dev_loss_text(dev)}",
        f"- learning rate {cfg['train']['learning_rate']}, batch {cfg['train']['batch_size']}, "
        f"max steps {cfg['train']['max_steps']}, epochs {cfg['train']['num_epochs']}",
        *([f"- {line}"] if (line := _budget_line(summary)) else []),
        "",
        f"## Evaluation ({'base, SFT and tuned' if chained else 'base vs tuned'}, test split)",
        "",
        evaluation_md.strip() or "(not available)",
        "",
        *_identity_lines(identity),
        *_promotion_lines(summary.get("promotion")),
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


def _objectives(train: dict[str, Any]) -> str:
    """ ", sft then dpo" for a chain, ", dpo" for one preference stage, "" for plain SFT."""
    first = train.get("objective", "sft")
    then = (train.get("then") or {}).get("objective")
    if then:
        return f", {first} then {then}"
    return "" if first == "sft" else f", {first}"


def _budget_line(summary: dict[str, Any]) -> str | None:
    """The train stage's budget line (tasks/train/budget.py), from its manifest."""
    folder = (summary.get("stages") or {}).get("train", {}).get("path")
    manifest = Path(folder) / "manifest.json" if folder else None
    if manifest is None or not manifest.is_file():
        return None
    return (json.loads(manifest.read_text()).get("budget") or {}).get("line")


def _identity_lines(identity: dict[str, Any] | None) -> list[str]:
    if not identity or identity.get("name_rate") is None:
        return []
    lines = [
        "## Identity (served GGUF, held-out test prompts)",
        "",
        f"- name in {identity['name_hits']} of {identity['name_prompts']} answers "
        f"({identity['name_rate']:g} %)",
    ]
    if identity.get("author_rate") is not None:
        lines.append(
            f"- author in {identity['author_hits']} of {identity['author_prompts']} answers "
            f"({identity['author_rate']:g} %)"
        )
    for shown in (identity.get("answers") or [])[:5]:
        lines.append(f"- {shown['prompt']!r} → {shown['answer']!r}")
    return [*lines, ""]


def _promotion_lines(decision: dict[str, Any] | None) -> list[str]:
    if not decision:
        return []
    return ["## Promotion", "", f"{decision['decision']}: {decision['reason']}", ""]


def run(summary: dict[str, Any], scorer: Scorer | None = None) -> dict[str, Any]:
    """Promote a finished run's served GGUF, everything read from the run's summary (its
    GGUF, evaluation, test split, config): what the pipeline's promote task and
    `python -m tasks.promote` do. Checks the served GGUF's identity rate first when the
    summary does not carry it (`summary["identity"]`, tasks/evaluate/served.py)."""
    from tasks.summary import stage_markdown

    cfg = Config.model_validate(summary["config"])
    p = cfg.pipeline
    data_dir = Path(summary["stages"]["data"]["path"])
    records = json.loads((data_dir / "test.json").read_text(encoding="utf-8"))
    gguf = summary["served_gguf"]
    if "identity" in summary:
        identity = summary["identity"]
    else:
        identity = served.run_identity(cfg, gguf, data_dir)
    card = model_card(p.name, summary | {"identity": identity}, *stage_markdown(summary))
    return promote(
        p.store,
        p.name,
        gguf,
        summary["run_id"],
        summary.get("evaluation") or {},
        records[: p.promote_samples],
        card,
        max_tokens=cfg.evaluate.max_new_tokens,
        scorer=scorer or partial(served.rouge_l, zh=cfg.evaluate.zh_segmentation),
        floor=Floor.from_config(p),
        identity=identity,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", default="artifacts/runs/latest.json")
    args = parser.parse_args()
    decision = run(json.loads(Path(args.summary).read_text()))
    print(json.dumps(decision, indent=2))
