"""The run summary: what each stage of one pipeline run made, and the numbers that matter.

    artifacts/runs/<run id>/summary.json   written after every stage ("status": "running"),
                                           so `llmft gc` never removes what a running
                                           pipeline already made; "completed" at the end
    artifacts/runs/<run id>/specs/         the spec of each heavy stage (tasks/runner.py)
    artifacts/runs/latest.json             the newest completed run's summary

Per stage: its key, folder, whether it came from the store, and its wall seconds. Then
the data report, dev loss before/after (of the final training; `trainings` holds each
training stage's, with `train.then` two), the evaluation, the held-out pair metrics
(`preference`: evaluate's on the test pairs for base, SFT and tuned, and the final
training's on its dev pairs; None without pairs), the GGUF verification, the served GGUF
and its answer to `pipeline.identity_prompt`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tasks.config import Config
from tasks.store import Ref, Store, write_json_atomic

TRAININGS = ("train", "train-preference")  # the training stages of a run, in order


class Run:
    """The summary of one run, written after every stage."""

    def __init__(self, cfg: Config, run_id: str, summary_path: str | None = None) -> None:
        self.cfg = cfg
        self.id = run_id
        self.store = Store(cfg.pipeline.store)
        self.dir = self.store.root / "runs" / run_id
        self.extra_path = Path(summary_path) if summary_path else None
        self.refs: dict[str, Ref] = {}
        self.stages: dict[str, dict[str, Any]] = {}
        self.started = self.mark = time.time()

    @classmethod
    def begin(cls, cfg: Config, run_id: str, summary_path: str | None = None) -> Run:
        run = cls(cfg, run_id, summary_path)
        run.write({"status": "running"})
        return run

    @property
    def specs(self) -> Path:
        return self.dir / "specs"

    def add(self, stage: str, ref: Ref | None) -> Ref | None:
        """Record a finished stage: key, path, whether it came from the store, wall seconds."""
        now = time.time()
        if ref is not None:  # merge hands back the train artifact when there is nothing to merge
            self.refs[stage] = ref
            self.stages[stage] = {
                "stage": ref.stage,
                "key": ref.key,
                "path": ref.path,
                "cached": ref.cached,
                "seconds": round(now - self.mark, 2),
            }
            self.write({"status": "running"})
        self.mark = now
        return ref

    def summarize(self, answer: str | None, export_skipped: str | None = None) -> dict[str, Any]:
        refs = self.refs
        summary = self._base("completed")
        summary["data"] = read_json(refs["data"], "report.json")
        trainings = {
            stage: read_json(refs[stage], "metrics.json") for stage in TRAININGS if stage in refs
        }
        final = list(trainings.values())[-1]  # the model the run ends with
        summary["dev_loss"] = final.get("dev_loss")
        summary["trainings"] = {
            stage: {"objective": m.get("preference", {}).get("objective", "sft")}
            | {k: m[k] for k in ("dev_loss", "preference") if k in m}
            for stage, m in trainings.items()
        }
        summary["evaluation"] = read_json(refs.get("evaluate"), "metrics.json")
        summary["preference"] = preference(summary["evaluation"], final.get("preference"))
        summary["verification"] = read_json(refs.get("export"), "verification.json") or None
        summary["served_gguf"] = served_gguf(refs.get("export"))
        summary["export_skipped"] = export_skipped
        summary["answer"] = answer
        return summary

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        summary["seconds"] = round(time.time() - self.started, 2)
        self.write(summary)
        write_json_atomic(self.store.root / "runs" / "latest.json", summary)
        if self.extra_path:
            write_json_atomic(self.extra_path, summary)
        return summary

    def _base(self, status: str) -> dict[str, Any]:
        return {
            "run_id": self.id,
            "status": status,
            "config": self.cfg.model_dump(mode="json"),
            "stages": self.stages,
        }

    def write(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.dir / "summary.json", {**self._base("running"), **summary})


def preference(evaluation: dict[str, Any], training: dict[str, Any] | None) -> dict | None:
    """The held-out pair metrics of a run, None when it saw no pairs: on the test split by
    model (base, sft, tuned; evaluate's), and the final training's on its dev split."""
    pairs = evaluation.get("pairs")
    if not pairs and not training:
        return None
    test = None
    if pairs:
        models = [m for m in ("base", "sft", "tuned") if evaluation.get(m)]
        test = {**pairs, **{m: pair_metrics(evaluation[m]) for m in models}}
    return {"test": test, "dev": training}


def pair_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("ranking_accuracy", "mean_logp_margin", "dpo_reward_accuracy", "dpo_reward_margin")
    return {k: metrics[k] for k in keep if k in metrics}


def read_json(ref: Ref | None, name: str) -> dict[str, Any]:
    """A JSON file of a stage's folder, or {} (no such stage in this run, or no such file)."""
    if ref is None or not (ref.dir / name).is_file():
        return {}
    return json.loads((ref.dir / name).read_text())


def served_gguf(exported: Ref | None) -> str | None:
    """Absolute path of the GGUF the export stage chose to serve."""
    if exported is None:
        return None
    return str(exported.dir / read_json(exported, "result.json")["served"])


def stage_markdown(summary: dict[str, Any]) -> tuple[str, str]:
    """(evaluation table, verification table) as the stages wrote them, "" when absent."""
    texts = []
    for stage, name in (("evaluate", "table.md"), ("export", "verification.md")):
        folder = summary["stages"].get(stage, {}).get("path")
        path = Path(folder) / name if folder else None
        texts.append(path.read_text() if path and path.is_file() else "")
    return texts[0], texts[1]
