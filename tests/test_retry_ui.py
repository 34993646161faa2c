"""Retry from the UI: a run whose export failed is retried and finishes, recomputing nothing.

Against a real `prefect server start`: `llmft run` with the export fault switch on fails
at export; `prefect flow-run retry` (what the UI's Retry button asks for) re-runs the same
flow run with the same parameters and the switch off. Training, evaluation and merge done
by the failed attempt (a training-only change from the tiny recipe, so base and data come
from the store and train, evaluate and merge are computed) come back from the store.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect_api import api, flow_runs

from tasks import base, data
from tasks.config import load_config
from tasks.store import Store

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(1800)
def test_retry_after_a_failed_export_recomputes_nothing_before_it(prefect_server, tiny_pipeline):
    env = dict(prefect_server)
    # A training seed no other test (nor this one on the other database) uses: the failing
    # attempt computes train, evaluate, merge.
    seed = 7 if "sqlite" in env["PREFECT_API_DATABASE_CONNECTION_URL"] else 8
    sets = [x for s in [*tiny_pipeline["overrides"], f"train.seed={seed}"] for x in ("--set", s)]
    failing = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *sets],
        env={**env, "LLMFT_FAIL_STAGE": "export"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert failing.returncode != 0
    assert "failed on purpose" in failing.stdout + failing.stderr
    (run,) = [r for r in flow_runs(env) if r["state_type"] == "FAILED"]
    summary_file = tiny_pipeline["store"] / "runs" / run["id"] / "summary.json"
    attempt = json.loads(summary_file.read_text())
    assert attempt["status"] == "running"  # written up to the stage that failed
    assert list(attempt["stages"]) == ["base", "data", "train", "evaluate", "merge"]
    # Only a training setting changed: base and data are the tiny recipe's, from the store;
    # train and everything after it were computed by this attempt.
    tiny = load_config(None, tiny_pipeline["overrides"])
    base_key = base.key(tiny)
    assert attempt["stages"]["base"]["key"] == base_key and attempt["stages"]["base"]["cached"]
    base_ref = Store(tiny_pipeline["store"]).lookup("base", base_key)
    assert attempt["stages"]["data"]["key"] == data.key(tiny, base.model_dir(base_ref))
    for name in ("train", "evaluate", "merge"):
        assert not attempt["stages"][name]["cached"], name

    retry_env = {k: v for k, v in env.items() if k != "LLMFT_FAIL_STAGE"}
    assert "LLMFT_FAIL_STAGE" not in os.environ
    retry = subprocess.run(
        [sys.executable, "-m", "prefect", "flow-run", "retry", run["id"]]
        + ["--entrypoint", "flows/pipeline.py:pipeline"],
        env=retry_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "completed successfully" in retry.stdout

    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "completed" and summary["run_id"] == run["id"]
    for name, stage in attempt["stages"].items():
        assert summary["stages"][name]["cached"], f"{name} was recomputed by the retry"
        assert summary["stages"][name]["key"] == stage["key"]
    assert not summary["stages"]["export"]["cached"]
    assert Path(summary["served_gguf"]).is_file() and summary["answer"]
    assert api(env, "GET", f"/flow_runs/{run['id']}")["state_type"] == "COMPLETED"
