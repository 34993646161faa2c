"""The whole DAG as one Prefect flow: base → data → train → evaluate → merge → export → promote.

With `train.then` (tasks/chain.py) a second training stage follows the first: the merge
stage makes the SFT model whole (task `merge-sft`), and `train-preference` trains on it;
evaluate, merge and export then take the final model, and evaluate scores the base, the
SFT model and the final one.

Base and data run in this process; train, evaluate, merge and export each run in a child
process through tasks/runner.py (`python -m tasks.<stage> --spec FILE`), killed at
`pipeline.stage_timeout_minutes`, an out-of-memory kept to itself. A task's Prefect cache
key is its stage's store key (never Prefect's INPUTS policy, which would hash path strings,
not files), so a re-run with nothing changed returns every stage from the store.
Transient failures retry with backoff; user errors, injected faults and out-of-memory at
unchanged settings do not. What the run reports is tasks/'s: the summary (summary.py),
the UI's tables and texts (publish.py), training progress (progress.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from flows.policy import STAGE_OPTIONS, answer_cache_key, is_transient
from flows.watch import changed_since_announced
from tasks import chain, publish, runner, spec
from tasks.base import model_dir
from tasks.config import Config, resolve
from tasks.machine import trains_on_gpu_pool
from tasks.progress import TrainingProgress
from tasks.store import Ref, Store, write_json_atomic
from tasks.summary import Run, served_gguf

TRAIN_DEPLOYMENT = "llmft-train/gpu"


@task(name="base", **STAGE_OPTIONS)
def base_task(cfg: Config) -> Ref:
    from tasks import base

    return base.run(cfg, Store(cfg.pipeline.store))


@task(name="data", **STAGE_OPTIONS)
def data_task(cfg: Config, tokenizer_dir: Path) -> Ref:
    from tasks import data

    return data.run(cfg, Store(cfg.pipeline.store), tokenizer_dir)


def in_child(stage: str, cfg: Config, name: str | None = None, **inputs: Ref | None) -> Ref | None:
    """A heavy stage in its child process; its spec is kept in the run's folder under the
    task's name (train and train-preference are both the train stage)."""
    specs = Store(cfg.pipeline.store).root / "runs" / str(flow_run.id) / "specs"
    write_json_atomic(specs / f"{name or stage}.json", spec.make_spec(stage, cfg, **inputs))
    return runner.run_stage(stage, cfg, get_run_logger().info, **inputs)


def train_stage(cfg: Config, data: Ref, base: Ref, name: str, progress_key: str) -> Ref:
    """The train stage on the gpu pool, or here with its progress shown under `progress_key`."""
    if trains_on_gpu_pool(cfg.pipeline.train_on):
        return runner.run_on_deployment(TRAIN_DEPLOYMENT, "train", cfg, data=data, base=base)
    partial = Store(cfg.pipeline.store).partial(
        "train", spec.stage_key("train", cfg, data=data, base=base)
    )
    with TrainingProgress(partial, cfg.train, progress_artifact(progress_key)):
        return in_child("train", cfg, name, data=data, base=base)


@task(name="train", **STAGE_OPTIONS)
def train_task(cfg: Config, data: Ref, base: Ref) -> Ref:
    return train_stage(cfg, data, base, "train", publish.PROGRESS_KEY)


@task(name="merge-sft", **STAGE_OPTIONS)
def merge_sft_task(cfg: Config, base: Ref, train: Ref) -> Ref | None:
    """The first training stage's model as whole weights: where the second one starts."""
    return in_child("merge", cfg, "merge-sft", base=base, train=train)


@task(name="train-preference", **STAGE_OPTIONS)
def train_preference_task(cfg: Config, data: Ref, base: Ref) -> Ref:
    return train_stage(cfg, data, base, "train-preference", publish.PREFERENCE_PROGRESS_KEY)


@task(name="evaluate", **STAGE_OPTIONS)
def evaluate_task(cfg: Config, data: Ref, base: Ref, train: Ref, start: Ref | None) -> Ref:
    return in_child("evaluate", cfg, data=data, base=base, train=train, start=start)


@task(name="merge", **STAGE_OPTIONS)
def merge_task(cfg: Config, base: Ref, train: Ref) -> Ref | None:
    return in_child("merge", cfg, base=base, train=train)


@task(name="export", **STAGE_OPTIONS)
def export_task(cfg: Config, merged: Ref, train: Ref, data: Ref) -> Ref | None:
    return in_child("export", cfg, merged=merged, train=train, data=data)


@task(name="answer", retries=1, cache_key_fn=answer_cache_key)
def answer_task(cfg: Config, gguf: str) -> str:
    from tasks.serve import answer

    return answer(gguf, cfg.pipeline.identity_prompt)


@task(name="promote", retries=1, retry_condition_fn=is_transient)
def promote_task(summary: dict[str, Any]) -> dict[str, Any]:
    from tasks import promote

    return promote.run(summary)


@task(name="publish")
def publish_task(summary: dict[str, Any]) -> None:
    """The run's artifacts in the Prefect UI (their contents: tasks/publish.py)."""
    for shown in publish.artifacts(summary):
        make = create_table_artifact if shown.kind == "table" else create_markdown_artifact
        make(shown.content, key=shown.key, description=shown.description)


@flow(name="llmft-pipeline", log_prints=True)
def pipeline(
    config: dict[str, Any] | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    dataset: str | None = None,
    sha256: str | None = None,
    summary_path: str | None = None,
) -> dict[str, Any]:
    """base → data → train [→ merge-sft → train-preference] → evaluate → merge → export →
    answer → promote."""
    cfg = resolve(config, config_path, overrides, dataset)
    if changed := changed_since_announced(cfg.data.input, sha256):
        get_run_logger().warning(changed)
    first, second = chain.stages(cfg)  # second: train.then's stage, or None
    run = Run.begin(cfg, str(flow_run.id), summary_path)
    base = run.add("base", base_task(cfg))  # first: data may count tokens with its tokenizer
    data = run.add("data", data_task(cfg, model_dir(base)))
    trained = run.add("train", train_task(first, data, base))
    start = None  # the model the last training started from, when it is not the base
    if second is not None:  # SFT, then preference tuning that starts from the SFT model
        start = run.add("merge-sft", merge_sft_task(first, base, trained))
        trained = run.add("train-preference", train_preference_task(second, data, start))
    final = second or first
    run.add("evaluate", evaluate_task(final, data, base, trained, start))
    merged = run.add("merge", merge_task(final, start or base, trained))
    skipped = export_skipped(final, merged)  # P-Tuning v2: the run ends at evaluation
    exported = None if skipped else run.add("export", export_task(final, merged, trained, data))
    answer = answer_task(cfg, served_gguf(exported)) if exported else None
    summary = run.summarize(answer, skipped)
    if exported and cfg.pipeline.promote:
        summary["promotion"] = promote_task(summary)
    publish_task(summary)
    return run.finish(summary)


def run_pipeline(cfg: Config, summary_path: str | None = None) -> dict[str, Any]:
    """What `llmft run` calls: the flow with a resolved config (a server, or a temporary one)."""
    return pipeline(config=cfg.model_dump(mode="json"), summary_path=summary_path)


@flow(name="llmft-train")
def train_flow(config: dict[str, Any], data: dict[str, Any], base: dict[str, Any]) -> dict:
    """Training alone, for the `gpu` work pool; the store must be shared with the caller."""
    cfg = Config.model_validate(config)
    ref = runner.run_stage("train", cfg, get_run_logger().info, data=Ref(**data), base=Ref(**base))
    return ref.to_dict()


# --- what the flow logs and shows --------------------------------------------------------


def export_skipped(cfg: Config, merged: Ref | None) -> str | None:
    """Why this run makes no GGUF, logged where the user of the run looks; None to export."""
    from tasks.export import skip_reason

    if reason := skip_reason(cfg, merged):
        get_run_logger().warning("export skipped: %s", reason)
    return reason


def progress_artifact(key: str) -> Callable[[float, str], None]:
    """A progress artifact: made on the first call, updated on the next ones."""
    made: list[Any] = []

    def show(percent: float, text: str) -> None:
        if made:
            update_progress_artifact(made[0], percent, description=text)
        else:
            made.append(create_progress_artifact(percent, key=key, description=text))

    return show
