"""What a run shows in the Prefect UI, built as plain data: every table, markdown text and
progress line, and how its numbers are written, is here.

    llmft-data-report          table     records read, kept, rejected (by reason), splits
    llmft-loss-curve           markdown  dev loss before → after, the loss.png, logged losses
    llmft-evaluation           markdown  the evaluate stage's table.md
    llmft-gguf-verification    markdown  the export stage's verification.md
    llmft-model-card           markdown  tasks/promote's model card
    llmft-training-progress    progress  percent and "training: step N, loss X" while it trains
    llmft-preference-progress  progress  the same for the second training stage (train.then)

flows/pipeline.py hands each `Artifact` to `prefect.artifacts`; nothing here imports Prefect.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.summary import stage_markdown

PROGRESS_KEY = "llmft-training-progress"
PREFERENCE_PROGRESS_KEY = "llmft-preference-progress"  # train.then's stage (tasks/chain.py)
STARTING = (0.0, "training: starting")
DONE = (100.0, "training: done")


@dataclass(frozen=True)
class Artifact:
    key: str
    kind: Literal["table", "markdown"]
    content: Any  # rows (a list of dicts) for a table, text for markdown
    description: str | None = None


def artifacts(summary: dict[str, Any]) -> list[Artifact]:
    """Data report, loss curve, evaluation, verification and model card of a finished run."""
    from tasks.promote import model_card

    evaluation_md, verification_md = stage_markdown(summary)
    shown = [
        Artifact("llmft-data-report", "table", data_rows(summary), "Data stage report"),
        Artifact("llmft-loss-curve", "markdown", loss_markdown(summary)),
    ]
    if evaluation_md:
        shown.append(Artifact("llmft-evaluation", "markdown", evaluation_md))
    if verification_md:
        shown.append(Artifact("llmft-gguf-verification", "markdown", verification_md))
    name = summary["config"]["pipeline"]["name"]
    card = model_card(name, summary, evaluation_md, verification_md)
    shown.append(Artifact("llmft-model-card", "markdown", card, f"Model card: {name}"))
    return shown


def data_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    data = summary.get("data") or {}
    counts = ("input_records", "kept", "rejected", "train", "dev", "test")
    rows = [{"count": k, "value": data.get(k)} for k in counts]
    for reason, n in (data.get("rejected_by_reason") or {}).items():
        rows.append({"count": f"rejected: {reason}", "value": n})
    return rows


def dev_loss_text(dev: dict[str, Any] | None) -> str:
    """'3.1324 → 2.0776': four decimals tell two losses apart; the float's 16 digits do not."""
    dev = dev or {}
    return " → ".join("–" if dev.get(k) is None else f"{dev[k]:.4f}" for k in ("before", "after"))


def loss_markdown(summary: dict[str, Any]) -> str:
    """Dev loss before/after, the loss curve image, and the logged train losses; with
    train.then, the same for each training stage, the SFT one first."""
    stages = summary["stages"]
    if "train-preference" not in stages:
        return _loss_section("# Loss", Path(stages["train"]["path"]), summary.get("dev_loss"))
    trainings = summary.get("trainings") or {}
    sections = []
    for stage in ("train", "train-preference"):
        done = trainings.get(stage) or {}
        title = f"# Loss: {stage} ({done.get('objective', '?')})"
        sections.append(_loss_section(title, Path(stages[stage]["path"]), done.get("dev_loss")))
    return "\n\n".join(sections)


def _loss_section(title: str, train_dir: Path, dev: dict[str, Any] | None) -> str:
    dev = dev or {}
    lines = [f"{title}\n\ndev loss: {dev_loss_text(dev)}\n"]
    png = train_dir / "loss.png"
    if png.is_file():
        encoded = base64.b64encode(png.read_bytes()).decode()
        lines.append(f"![loss curve](data:image/png;base64,{encoded})\n\n`{png}`\n")
    history = train_dir / "log_history.jsonl"
    if history.is_file():
        logged = [json.loads(x) for x in history.read_text().splitlines() if x.strip()]
        logged = [r for r in logged if "loss" in r]
        lines += ["| step | loss |", "| ---: | ---: |"]
        stride = max(1, len(logged) // 40)  # at most about 40 rows in the table
        lines += [f"| {r.get('step')} | {r['loss']:.4f} |" for r in logged[::stride]]
    return "\n".join(lines)


def training_progress(
    record: dict[str, Any], max_steps: int | None, epochs: float | str
) -> tuple[float, str]:
    """(percent, description) from the newest line of log_history.jsonl."""
    step, epoch = record.get("step", 0), record.get("epoch", 0.0)
    total = record.get("max_steps") or max_steps
    # 'auto' epochs are known to the job only; its lines carry max_steps
    numeric = not isinstance(epochs, str)
    fraction = step / total if total else (epoch / epochs if numeric else 0.0)
    loss = record.get("loss", record.get("dev_loss", record.get("eval_loss")))
    text = f"training: step {step}" + (f", loss {loss:.4f}" if loss else "")
    return min(100.0, 100.0 * fraction), text
