"""The whole DAG as one Prefect flow: base → data → train → evaluate → merge → export → promote.

Each stage is a thin task over `tasks.<stage>.run`; its Prefect cache key is the stage's
store key (never Prefect's INPUTS policy, which would hash path strings, not files), so a
re-run with nothing changed returns every stage from the store. Training launches its own
child process; evaluate, merge and export run in one (`flows.stage`), so a timeout or an
out-of-memory kill stays there. Transient failures retry with backoff; user errors,
injected faults and out-of-memory at unchanged settings do not.

Every run writes `artifacts/runs/<run id>/summary.json` (after each stage, so `llmft gc`
never removes what a running pipeline already made) and `artifacts/runs/latest.json`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff
from pydantic import ValidationError

from flows.stage import FaultInjected, OutOfMemory, run_in_subprocess, stage_key
from tasks.base import model_dir
from tasks.config import Config, ConfigError, UserError, load_config
from tasks.store import Ref, Store, hash_file, write_json_atomic

TRAIN_DEPLOYMENT = "llmft-train/gpu"


# --- retries and caching -------------------------------------------------------------


def is_transient(task, task_run, state) -> bool:
    """Retry crashes, kills and timeouts; not errors that the same inputs would repeat."""
    try:
        state.result()
    except (UserError, FaultInjected, OutOfMemory):
        return False
    except Exception as exc:
        text = str(exc)
        return "CUDA out of memory" not in text and "OutOfMemoryError" not in text
    return True


def store_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The stage's store key, once the store holds that artifact (so gc cannot go stale)."""
    stage, cfg = context.task.name, parameters["cfg"]
    refs = {k: v for k, v in parameters.items() if k != "cfg"}
    try:
        key = stage_key(stage, cfg, **refs)
    except Exception:  # a bad input: let the task run and raise the real error
        return None
    store = Store(cfg.pipeline.store)
    if store.lookup(stage, key) is None:
        return None
    # The same stage key in another store is another folder: the store is part of the key.
    return f"llmft-{stage}-{key}-{hashlib.sha256(str(store.root).encode()).hexdigest()[:8]}"


STAGE_OPTIONS = dict(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),  # 10 s, 20 s
    retry_jitter_factor=0.5,
    retry_condition_fn=is_transient,
    cache_key_fn=store_cache_key,
)


# --- stage tasks: thin wrappers over tasks.<stage>.run ----------------------------------


@task(name="data", **STAGE_OPTIONS)
def data_task(cfg: Config, tokenizer_dir: Path) -> Ref:
    from tasks import data

    return data.run(cfg, Store(cfg.pipeline.store), tokenizer_dir)


@task(name="base", **STAGE_OPTIONS)
def base_task(cfg: Config) -> Ref:
    from tasks import base

    return base.run(cfg, Store(cfg.pipeline.store))


@task(name="train", **STAGE_OPTIONS)
def train_task(cfg: Config, data: Ref, base: Ref) -> Ref:
    from tasks import train

    store = Store(cfg.pipeline.store)
    if use_gpu_pool(cfg):
        return train_on_gpu_pool(cfg, data, base)
    with TrainingProgress(store.partial("train", train.key(cfg, data, base)), cfg):
        return train.run(cfg, store, data, base)


@task(name="evaluate", **STAGE_OPTIONS)
def evaluate_task(cfg: Config, data: Ref, base: Ref, train: Ref) -> Ref:
    return run_in_subprocess(
        "evaluate", cfg, get_run_logger().info, data=data, base=base, train=train
    )


@task(name="merge", **STAGE_OPTIONS)
def merge_task(cfg: Config, base: Ref, train: Ref) -> Ref | None:
    return run_in_subprocess("merge", cfg, get_run_logger().info, base=base, train=train)


@task(name="export", **STAGE_OPTIONS)
def export_task(cfg: Config, merged: Ref, train: Ref, data: Ref) -> Ref | None:
    return run_in_subprocess(
        "export", cfg, get_run_logger().info, merged=merged, train=train, data=data
    )


def answer_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Greedy decoding: the same GGUF file and prompt give the same answer."""
    gguf = Path(parameters["gguf"])
    mark = f"{gguf}\0{gguf.stat().st_mtime_ns}\0{parameters['cfg'].pipeline.identity_prompt}"
    return "llmft-answer-" + hashlib.sha256(mark.encode()).hexdigest()[:24]


@task(name="answer", retries=1, cache_key_fn=answer_cache_key)
def answer_task(cfg: Config, gguf: str) -> str:
    from tasks.serve import answer

    return answer(gguf, cfg.pipeline.identity_prompt)


@task(name="promote", retries=1, retry_condition_fn=is_transient)
def promote_task(cfg: Config, summary: dict[str, Any]) -> dict[str, Any]:
    from tasks import promote

    data_dir = Path(summary["stages"]["data"]["path"])
    records = json.loads((data_dir / "test.json").read_text())
    return promote.promote(
        cfg.pipeline.store,
        cfg.pipeline.name,
        summary["served_gguf"],
        summary["run_id"],
        summary["evaluation"],
        records[: cfg.pipeline.promote_samples],
        promote.model_card(cfg.pipeline.name, summary, *_tables(summary)),
        max_tokens=cfg.evaluate.max_new_tokens,
    )


@task(name="publish")
def publish_task(summary: dict[str, Any]) -> None:
    """The run's artifacts in the Prefect UI."""
    publish(summary)


# --- the flow ----------------------------------------------------------------------------


@flow(name="llmft-pipeline", log_prints=True)
def pipeline(
    config: dict[str, Any] | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    dataset: str | None = None,
    sha256: str | None = None,
    summary_path: str | None = None,
) -> dict[str, Any]:
    """base → data → train → evaluate → merge → export → answer → promote."""
    cfg = resolve_config(config, config_path, overrides, dataset, sha256)
    run = Run.begin(cfg, summary_path)
    base = run.add("base", base_task(cfg))  # first: data may count tokens with its tokenizer
    data = run.add("data", data_task(cfg, model_dir(base)))
    trained = run.add("train", train_task(cfg, data, base))
    run.add("evaluate", evaluate_task(cfg, data, base, trained))
    merged = run.add("merge", merge_task(cfg, base, trained))
    skipped = export_skipped(cfg, merged)  # P-Tuning v2: the run ends at evaluation
    exported = None if skipped else run.add("export", export_task(cfg, merged, trained, data))
    answer = answer_task(cfg, served_gguf(exported)) if exported else None
    summary = run.summarize(answer, skipped)
    if exported and cfg.pipeline.promote:
        summary["promotion"] = promote_task(cfg, summary)
    publish_task(summary)
    return run.finish(summary)


def run_pipeline(cfg: Config, summary_path: str | None = None) -> dict[str, Any]:
    """What `llmft run` calls: the flow with a resolved config (a server, or a temporary one)."""
    return pipeline(config=cfg.model_dump(mode="json"), summary_path=summary_path)


@flow(name="llmft-train")
def train_flow(config: dict[str, Any], data: dict[str, Any], base: dict[str, Any]) -> dict:
    """Training alone, for the `gpu` work pool; the store must be shared with the caller."""
    from tasks import train

    cfg = Config.model_validate(config)
    return train.run(cfg, Store(cfg.pipeline.store), Ref(**data), Ref(**base)).to_dict()


# --- plain functions the flow and tasks use ------------------------------------------


def resolve_config(
    config: dict[str, Any] | None,
    config_path: str | None,
    overrides: list[str] | None,
    dataset: str | None,
    sha256: str | None,
) -> Config:
    """A resolved config dict (from `llmft run`), or a YAML recipe plus `--set` overrides."""
    if config is not None:
        if config_path or overrides:
            raise ConfigError("give the pipeline either config or config_path/overrides")
        try:
            cfg = Config.model_validate(config)
        except ValidationError as exc:
            raise ConfigError(str(exc)) from exc
    else:
        cfg = load_config(config_path, overrides)
    if dataset:
        cfg.data.input = dataset
    if sha256 and Path(cfg.data.input).is_file() and hash_file(cfg.data.input) != sha256:
        get_run_logger().warning(
            "%s changed since it was announced (sha256 %s); this run uses its current "
            "contents, and the sensor announces the new version on its own",
            cfg.data.input,
            sha256[:12],
        )
    return cfg


class Run:
    """The summary of one run, written after every stage."""

    def __init__(self, cfg: Config, run_id: str, summary_path: str | None) -> None:
        self.cfg = cfg
        self.id = run_id
        self.store = Store(cfg.pipeline.store)
        self.dir = self.store.root / "runs" / run_id
        self.extra_path = Path(summary_path) if summary_path else None
        self.refs: dict[str, Ref] = {}
        self.stages: dict[str, dict[str, Any]] = {}
        self.started = self.mark = time.time()

    @classmethod
    def begin(cls, cfg: Config, summary_path: str | None) -> Run:
        from prefect.runtime import flow_run

        run = cls(cfg, str(flow_run.id), summary_path)
        run.write({"status": "running"})
        return run

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
        summary["data"] = _json(refs["data"], "report.json")
        summary["dev_loss"] = _json(refs["train"], "metrics.json").get("dev_loss")
        summary["evaluation"] = _json(refs.get("evaluate"), "metrics.json")
        summary["verification"] = _json(refs.get("export"), "verification.json") or None
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


def _json(ref: Ref | None, name: str) -> dict[str, Any]:
    if ref is None or not (ref.dir / name).is_file():
        return {}
    return json.loads((ref.dir / name).read_text())


def export_skipped(cfg: Config, merged: Ref | None) -> str | None:
    """Why this run makes no GGUF, logged where the user of the run looks; None to export."""
    from tasks.export import skip_reason

    if reason := skip_reason(cfg, merged):
        get_run_logger().warning("export skipped: %s", reason)
    return reason


def served_gguf(exported: Ref | None) -> str | None:
    """Absolute path of the GGUF the export stage chose to serve."""
    if exported is None:
        return None
    return str(exported.dir / _json(exported, "result.json")["served"])


def _tables(summary: dict[str, Any]) -> tuple[str, str]:
    """(evaluation table, verification table) as the stages wrote them in markdown."""
    texts = []
    for stage, name in (("evaluate", "table.md"), ("export", "verification.md")):
        path = Path(summary["stages"].get(stage, {}).get("path", "/nonexistent")) / name
        texts.append(path.read_text() if path.is_file() else "")
    return texts[0], texts[1]


def publish(summary: dict[str, Any]) -> None:
    """Data report, loss curve, evaluation, verification and model card as UI artifacts."""
    from tasks.promote import model_card

    data = summary.get("data") or {}
    rows = [{"count": k, "value": data.get(k)} for k in ("input_records", "kept", "rejected")]
    rows += [{"count": k, "value": data.get(k)} for k in ("train", "dev", "test")]
    for reason, n in (data.get("rejected_by_reason") or {}).items():
        rows.append({"count": f"rejected: {reason}", "value": n})
    create_table_artifact(rows, key="llmft-data-report", description="Data stage report")
    create_markdown_artifact(loss_markdown(summary), key="llmft-loss-curve")
    evaluation_md, verification_md = _tables(summary)
    if evaluation_md:
        create_markdown_artifact(evaluation_md, key="llmft-evaluation")
    if verification_md:
        create_markdown_artifact(verification_md, key="llmft-gguf-verification")
    name = summary["config"]["pipeline"]["name"]
    card = model_card(name, summary, evaluation_md, verification_md)
    create_markdown_artifact(card, key="llmft-model-card", description=f"Model card: {name}")


def loss_markdown(summary: dict[str, Any]) -> str:
    """Dev loss before/after, the loss curve image, and the logged train losses."""
    train_dir = Path(summary["stages"]["train"]["path"])
    dev = summary.get("dev_loss") or {}
    lines = [f"# Loss\n\ndev loss: {dev.get('before')} → {dev.get('after')}\n"]
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


class TrainingProgress:
    """Update a Prefect progress artifact from the training log while training runs."""

    def __init__(self, workdir: Path, cfg: Config, every: float = 5.0) -> None:
        self.log = workdir / "log_history.jsonl"
        self.max_steps = cfg.train.max_steps
        self.epochs = cfg.train.num_epochs
        self.every = every
        self.stop = threading.Event()

    def __enter__(self) -> TrainingProgress:
        self.artifact = create_progress_artifact(
            0.0, key="llmft-training-progress", description="training: starting"
        )
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if exc[0] is None:
            update_progress_artifact(self.artifact, 100.0, description="training: done")

    def _poll(self) -> None:
        while not self.stop.wait(self.every):
            if not self.log.is_file():
                continue
            lines = [x for x in self.log.read_text().splitlines() if x.strip()]
            if not lines:
                continue
            last = json.loads(lines[-1])
            step, epoch = last.get("step", 0), last.get("epoch", 0.0)
            total = last.get("max_steps") or self.max_steps
            fraction = step / total if total else epoch / self.epochs
            loss = last.get("loss", last.get("dev_loss", last.get("eval_loss")))
            update_progress_artifact(
                self.artifact,
                min(100.0, 100.0 * fraction),
                description=f"training: step {step}" + (f", loss {loss:.4f}" if loss else ""),
            )


def use_gpu_pool(cfg: Config) -> bool:
    """`gpu-pool`, or `auto` when a server has a `gpu` work pool with a worker online."""
    if cfg.pipeline.train_on != "auto":
        return cfg.pipeline.train_on == "gpu-pool"
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return False
    try:
        with get_client(sync_client=True) as client:
            workers = client.read_workers_for_work_pool("gpu")
    except Exception:  # no such pool (or no server): train here
        return False
    return any(w.status == "ONLINE" for w in workers)


def train_on_gpu_pool(cfg: Config, data: Ref, base: Ref) -> Ref:
    """Run `llmft-train/gpu` and wait; the result arrives through the shared store."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from tasks import train

    store, key = Store(cfg.pipeline.store), train.key(cfg, data, base)
    if hit := store.lookup("train", key):  # nothing to send to the GPU
        return hit
    config = cfg.model_dump(mode="json")
    try:
        run = run_deployment(
            TRAIN_DEPLOYMENT,
            parameters={"config": config, "data": data.to_dict(), "base": base.to_dict()},
        )
    except ObjectNotFound as exc:
        raise UserError(
            f"the gpu pool has a worker but {TRAIN_DEPLOYMENT} is not deployed "
            "(fix: llmft deploy, or --set pipeline.train_on=local)"
        ) from exc
    ref = store.lookup("train", key)
    if ref is None:
        raise RuntimeError(
            f"{TRAIN_DEPLOYMENT} run {run.id} ended {run.state_name} without a train "
            f"artifact in {cfg.pipeline.store} (is the store shared with the GPU host?)"
        )
    return Ref(ref.stage, ref.key, ref.path, cached=False)  # computed by that run


# --- garbage collection ------------------------------------------------------------------


def collect_garbage(
    store_root: str | Path, keep_runs: int = 10, dry_run: bool = False
) -> list[Path]:
    """Remove artifacts that neither the last `keep_runs` runs nor a deployed model use.

    Kept: every stage of the newest run summaries (running ones included, since summaries
    are written after each stage), the folder of each deployed GGUF and its run's stages,
    and whatever a kept artifact's manifest names as an input (e.g. a tokenized dataset).
    """
    store = Store(store_root)
    if not store.root.is_dir():
        return []
    keep: set[tuple[str, str]] = set()
    summaries = sorted(
        (store.root / "runs").glob("*/summary.json"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in summaries[:keep_runs]:
        keep |= _stages_of(path)
    for pointer in sorted((store.root / "deployed").glob("*/current.json")):
        current = json.loads(pointer.read_text())
        gguf = Path(current["gguf"])
        if gguf.is_relative_to(store.root):
            stage, key = gguf.relative_to(store.root).parts[:2]
            keep.add((stage, key))
        keep |= _stages_of(store.root / "runs" / str(current.get("run_id")) / "summary.json")
    keep |= _inputs_of(store, keep)
    return store.gc(keep, dry_run=dry_run)


def _stages_of(summary: Path) -> set[tuple[str, str]]:
    if not summary.is_file():
        return set()
    stages = json.loads(summary.read_text()).get("stages", {})
    return {(info.get("stage", name), info["key"]) for name, info in stages.items()}


def _inputs_of(store: Store, keep: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Artifacts named by kept manifests' inputs, followed transitively."""
    stages_by_key: dict[str, list[str]] = {}
    for stage_dir in (p for p in store.root.iterdir() if p.is_dir()):
        for entry in stage_dir.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                stages_by_key.setdefault(entry.name, []).append(stage_dir.name)
    found, todo = set(keep), list(keep)
    while todo:
        ref = store.lookup(*todo.pop())
        if ref is None:
            continue
        for value in ref.manifest().get("inputs", {}).values():
            for stage in stages_by_key.get(value, []) if isinstance(value, str) else []:
                if (stage, value) not in found:
                    found.add((stage, value))
                    todo.append((stage, value))
    return found
