"""`llmft gc`: keep what recent runs and deployed models use, remove the rest."""

import json
import os
import time

from tasks.gc import collect_garbage
from tasks.store import Store, write_json_atomic


def artifact(store: Store, stage: str, key: str, inputs: dict | None = None):
    def work(tmp):
        (tmp / "out.txt").write_text(f"{stage} {key}")

    return store.build(stage, key, work, inputs=inputs or {})


def summary(store: Store, run_id: str, stages: dict, age: float) -> None:
    path = store.root / "runs" / run_id / "summary.json"
    write_json_atomic(path, {"run_id": run_id, "stages": stages})
    past = time.time() - age
    os.utime(path, (past, past))


def test_gc_keeps_recent_runs_deployed_models_and_their_inputs(tmp_path):
    store = Store(tmp_path / "artifacts")
    artifact(store, "data", "d-old")
    artifact(store, "data", "d-new")
    artifact(store, "tokenized", "t-new")  # not in any summary: kept as a manifest input
    artifact(store, "train", "t-old", inputs={"data": "d-old"})
    artifact(store, "train", "t-new", inputs={"data": "d-new", "tokenized": "t-new"})
    export_old = artifact(store, "export", "e-old", inputs={"train": "t-old"})
    artifact(store, "export", "e-gone")
    (store.root / "export" / ".partial-crashed").mkdir()  # debris of a crash

    summary(store, "r-old", {"data": {"key": "d-old"}, "train": {"key": "t-old"}}, age=300)
    summary(store, "r-new", {"data": {"key": "d-new"}, "train": {"key": "t-new"}}, age=0)
    # The deployed model came from the old run, which is no longer among the newest one.
    gguf = export_old.dir / "model-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    write_json_atomic(
        store.root / "deployed" / "demo" / "current.json",
        {"gguf": str(gguf), "run_id": "r-gone", "evaluation": {}},
    )

    would = collect_garbage(store.root, keep_runs=1, dry_run=True)
    assert {p.name for p in would} == {"e-gone", ".partial-crashed"}
    assert (store.root / "export" / "e-gone").is_dir()  # a dry run removes nothing

    removed = collect_garbage(store.root, keep_runs=1)
    assert {p.name for p in removed} == {"e-gone", ".partial-crashed"}
    kept = {f"{p.parent.name}/{p.name}" for p in store.root.glob("*/*") if p.is_dir()}
    # e-old is deployed; t-old and d-old are its manifest inputs; *-new belong to r-new.
    assert kept >= {"export/e-old", "train/t-old", "data/d-old", "tokenized/t-new"}
    assert {"data/d-new", "train/t-new"} <= kept
    assert json.loads((store.root / "deployed/demo/current.json").read_text())["gguf"] == str(gguf)


def test_gc_drops_what_only_old_runs_used(tmp_path):
    store = Store(tmp_path / "artifacts")
    artifact(store, "data", "d1")
    artifact(store, "data", "d2")
    summary(store, "r1", {"data": {"key": "d1"}}, age=100)
    summary(store, "r2", {"data": {"key": "d2"}}, age=0)
    assert [p.name for p in collect_garbage(store.root, keep_runs=2)] == []
    assert [p.name for p in collect_garbage(store.root, keep_runs=1)] == ["d1"]
    assert store.lookup("data", "d2") is not None


def test_gc_on_an_empty_store(tmp_path):
    assert collect_garbage(tmp_path / "nothing-here", keep_runs=3) == []
