"""The whole pipeline flow on a tiny recipe, under one Prefect test harness for the session.

The first run computes every stage (the bundled base is linked in from the shared test
store); the second is all cache hits; a training-only change re-runs train and what
follows, never data or base (slow here: test_retry_ui.py checks the same in make test
on the way to its failure).
"""

import json
import math
import time
from pathlib import Path

import pytest

from flows.cli import main
from flows.pipeline import run_pipeline
from tasks.config import load_config

SUMMARY_KEYS = {
    "run_id",
    "config",
    "stages",
    "data",
    "dev_loss",
    "evaluation",
    "verification",
    "served_gguf",
    "answer",
}
STAGES = ["base", "data", "train", "evaluate", "merge", "export"]


@pytest.fixture(scope="module")
def first_run(prefect_harness, tiny_pipeline):
    started = time.time()
    summary = run_pipeline(load_config(None, tiny_pipeline["overrides"]))
    return summary, time.time() - started


def test_first_run_computes_every_stage_and_writes_the_summary(first_run, tiny_pipeline):
    summary, _ = first_run
    store = tiny_pipeline["store"]
    assert set(summary) >= SUMMARY_KEYS
    assert list(summary["stages"]) == STAGES
    for name, stage in summary["stages"].items():
        assert set(stage) >= {"key", "path", "cached", "seconds"}
        assert (Path(stage["path"]) / "manifest.json").is_file(), name
        assert stage["cached"] is (name == "base"), name  # base was linked in, nothing else
    assert summary["config"]["train"]["max_steps"] == 2
    splits = [summary["data"][s] for s in ("train", "dev", "test")]
    assert summary["data"]["kept"] == 32 == sum(splits) and splits[0] > splits[1] + splits[2]
    trained = Path(summary["stages"]["train"]["path"]) / "metrics.json"
    assert summary["dev_loss"] == json.loads(trained.read_text())["dev_loss"]  # this run's
    assert all(math.isfinite(v) for v in summary["dev_loss"].values())
    assert {"base", "tuned"} <= set(summary["evaluation"])
    assert summary["verification"]["rows"]
    served = Path(summary["served_gguf"])
    assert served.is_file() and served.suffix == ".gguf"
    assert served.parent == Path(summary["stages"]["export"]["path"])
    assert isinstance(summary["answer"], str) and summary["answer"].strip()
    assert summary["promotion"]["decision"] == "promoted"  # nothing was deployed before

    on_disk = json.loads((store / "runs" / summary["run_id"] / "summary.json").read_text())
    assert on_disk == summary
    assert json.loads((store / "runs" / "latest.json").read_text())["run_id"] == summary["run_id"]
    deployed = json.loads((store / "deployed" / "default" / "current.json").read_text())
    assert deployed["gguf"] == str(served) and deployed["run_id"] == summary["run_id"]
    assert (store / "deployed" / "default" / "MODEL_CARD.md").is_file()


def test_the_run_shows_its_artifacts_in_the_ui(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    summary, _ = first_run
    with get_client(sync_client=True) as client:
        only_this_run = FlowRunFilter(id=FlowRunFilterId(any_=[summary["run_id"]]))
        artifacts = client.read_artifacts(flow_run_filter=only_this_run)
    by_key = {a.key: a for a in artifacts}
    assert {
        "llmft-data-report",
        "llmft-loss-curve",
        "llmft-evaluation",
        "llmft-gguf-verification",
        "llmft-model-card",
        "llmft-training-progress",
    } <= set(by_key)
    assert by_key["llmft-data-report"].type == "table"
    assert by_key["llmft-training-progress"].type == "progress"
    assert by_key["llmft-training-progress"].data == 100.0
    assert "dev loss" in by_key["llmft-loss-curve"].data
    assert "llmft serve --deployed default" in by_key["llmft-model-card"].data


def test_second_run_is_all_cache_hits_in_under_30_seconds(first_run, tiny_pipeline, capsys):
    sets = [x for s in tiny_pipeline["overrides"] for x in ("--set", s)]
    summary_file = tiny_pipeline["root"] / "second.json"
    started = time.time()
    assert main(["run", *sets, "--summary", str(summary_file)]) == 0
    elapsed = time.time() - started
    summary = json.loads(summary_file.read_text())
    assert [s["cached"] for s in summary["stages"].values()] == [True] * len(STAGES)
    assert [s["key"] for s in summary["stages"].values()] == [
        s["key"] for s in first_run[0]["stages"].values()
    ]
    assert summary["promotion"]["decision"] == "unchanged"
    assert elapsed < 30, f"cached run took {elapsed:.1f} s"
    out = capsys.readouterr().out
    assert out.count("from the store") == len(STAGES)
    assert summary["run_id"] in out and summary["served_gguf"] in out
    assert '"promotion": "unchanged: this GGUF is already deployed"' in out


def test_a_ptuning_run_ends_at_evaluation_and_says_why(
    prefect_harness, tiny_pipeline, test_store, tmp_path, capsys
):
    """llama.cpp has no prefix tuning: no merge, no GGUF, no promotion, a completed run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tasks import base

    store = tmp_path / "artifacts"  # its own store: the other runs here stay as they were
    overrides = [
        *tiny_pipeline["overrides"],
        f"pipeline.store={store}",
        "train.method=ptuning",
        "train.ptuning.pre_seq_len=4",
    ]
    key = base.key(load_config(None, overrides))
    (store / "base").mkdir(parents=True)
    (store / "base" / key).symlink_to(test_store.final("base", key), target_is_directory=True)
    summary_file = tmp_path / "summary.json"
    sets = [x for s in overrides for x in ("--set", s)]
    assert main(["run", *sets, "--summary", str(summary_file)]) == 0
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "completed"
    assert list(summary["stages"]) == ["base", "data", "train", "evaluate"]
    assert {"base", "tuned"} <= set(summary["evaluation"])
    assert summary["served_gguf"] is None and summary["answer"] is None
    assert "llama.cpp has no prefix tuning" in summary["export_skipped"]
    assert "promotion" not in summary and not (store / "deployed").exists()
    shown = capsys.readouterr().out
    assert '"export_skipped": "train.method=ptuning' in shown  # what `llmft run` prints

    def warnings() -> list[str]:
        only_this_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[summary["run_id"]]))
        with get_client(sync_client=True) as client:
            return [r.message for r in client.read_logs(log_filter=only_this_run)]

    deadline = time.time() + 30  # the run's logs reach the API in batches
    while not any("llama.cpp has no prefix tuning" in m for m in warnings()):
        assert time.time() < deadline, warnings()
        time.sleep(0.5)


@pytest.mark.slow  # a second full training; make test covers this in test_retry_ui.py
def test_a_training_change_reruns_train_and_after_but_not_data_or_base(first_run, tiny_pipeline):
    first = first_run[0]["stages"]
    cfg = load_config(None, [*tiny_pipeline["overrides"], "train.learning_rate=5.0e-4"])
    summary = run_pipeline(cfg)
    stages = summary["stages"]
    for name in ("data", "base"):
        assert stages[name]["cached"] and stages[name]["key"] == first[name]["key"], name
    for name in ("train", "evaluate", "merge", "export"):
        assert not stages[name]["cached"] and stages[name]["key"] != first[name]["key"], name
    # A deployed model exists now: promotion compared both GGUFs on the same test prompts.
    promotion = summary["promotion"]
    assert promotion["decision"] in {"promoted", "kept"}
    assert promotion["candidate"] is not None and promotion["deployed"] is not None
    assert promotion["prompts"] == 2
