"""Deployments on a real local server: a new dataset in a watched folder starts a pipeline run.

The end-to-end test serves the pipeline's deployments (`llmft deploy --serve`, trigger
included) against a `prefect server start`, drops a dataset into a watched folder, runs
the sensor once, and waits for the triggered run to finish. It shares the session's store
with the other pipeline tests: whatever they left there, the triggered run must take from
it, and compute the rest.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect_api import api, flow_runs, wait_for

from flows.deploy import PREFECT_YAML, dataset_trigger
from tasks.config import load_config
from tasks.store import Ref, Store

REPO = Path(__file__).resolve().parent.parent


def llmft(*args: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        **kwargs,
    )


@pytest.fixture
def session_data(tiny_pipeline) -> Ref:
    """The session dataset's data stage, in the store whatever ran before (under a second)."""
    from tasks import base, data

    cfg = load_config(None, tiny_pipeline["overrides"])
    store = Store(cfg.pipeline.store)
    return data.run(cfg, store, base.model_dir(base.run(cfg, store)))


def finished_keys(store: Path) -> dict[str, set[str]]:
    """stage → the keys of its finished artifacts in the store (those with a manifest)."""
    return {
        stage.name: {m.parent.name for m in stage.glob("*/manifest.json")}
        for stage in store.iterdir()
        if stage.is_dir()
    }


def test_prefect_yaml_trigger_is_the_served_trigger():
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    (yaml_trigger,) = by_name["on-new-dataset"]["triggers"]
    served = dataset_trigger()
    assert set(yaml_trigger["expect"]) == served.expect == {"llmft.dataset.arrived"}
    assert yaml_trigger["match"] == served.match.model_dump()
    assert yaml_trigger["parameters"] == served.parameters
    assert by_name["gpu"]["work_pool"]["name"] == "gpu"
    assert by_name["gpu"]["concurrency_limit"] == 1
    assert by_name["nightly"]["schedules"][0]["cron"] == "0 2 * * *"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    "new_record",
    [
        # The session's dataset file (same name and bytes) in another folder: the
        # triggered run finds its data stage, and any later stage an earlier test left,
        # in the store (keys hash contents, not folders).
        False,
        # One more record: a new dataset version, so every stage from data on runs.
        pytest.param(True, marks=pytest.mark.slow),
    ],
    ids=["same-content", "new-content"],
)
def test_new_dataset_starts_a_pipeline_run(
    prefect_server, tiny_pipeline, session_data, tmp_path, new_record
):
    env = prefect_server
    held = finished_keys(tiny_pipeline["store"])
    watched = tmp_path / "incoming"
    watched.mkdir()
    sets = [x for s in tiny_pipeline["overrides"] for x in ("--set", s)]
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "deploy", "--serve", *sets],
        env=env,
        cwd=REPO,
        stdout=open(tmp_path / "serve.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    try:
        deployment = wait_for(
            lambda: _deployment(env, "llmft-pipeline", "on-new-dataset"),
            timeout=120,
            what="served deployment registered",
        )
        wait_for(lambda: _automations(env, deployment["id"]), 60, what="trigger registered")

        # The "upload": written under a temporary name, renamed when complete.
        dataset = watched / tiny_pipeline["dataset"].name
        part = watched / f".{dataset.name}.part"
        shutil.copy(tiny_pipeline["dataset"], part)
        if new_record:  # a record of its own per server, so each computes a new version
            n = 4 if "sqlite" in env["PREFECT_API_DATABASE_CONNECTION_URL"] else 5
            with open(part, "a") as f:
                f.write(
                    f'{{"instruction": "What is 3 + {n}?", "input": "", "output": "{3 + n}."}}\n'
                )
        part.rename(dataset)
        # The sensor's state (what it announced) is this test's: every server hears of it.
        sensor_store = tmp_path / "sensor"
        store_set = ["--set", f"pipeline.store={sensor_store}"]
        sensor = llmft(
            "watch", "--dir", str(watched), "--once", "--stable", "0.5", *store_set, env=env
        )
        assert sensor.returncode == 0, sensor.stderr
        assert "llmft.dataset.arrived" in sensor.stdout

        def runs_for_this_dataset() -> list[dict]:
            runs = flow_runs(env, deployment_id={"any_": [deployment["id"]]})
            return [r for r in runs if r["parameters"].get("dataset") == str(dataset)]

        run = wait_for(
            lambda: _finished(runs_for_this_dataset()),
            timeout=1500,
            every=3,
            what="triggered pipeline run finished",
        )
        assert run["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-5000:]
        assert run["parameters"]["dataset"] == str(dataset)
        sha = json.loads((sensor_store / "watch" / "state.json").read_text())
        assert run["parameters"]["sha256"] in sha["emitted"]
        summary = json.loads(
            (tiny_pipeline["store"] / "runs" / run["id"] / "summary.json").read_text()
        )
        assert summary["status"] == "completed" and Path(summary["served_gguf"]).is_file()
        assert summary["config"]["data"]["input"] == str(dataset)
        stages = summary["stages"]
        assert (stages["data"]["key"] == session_data.key) is not new_record
        assert stages["data"]["cached"] is not new_record
        for name, stage in stages.items():  # what the store held came from it, no more
            assert stage["cached"] is (stage["key"] in held.get(stage["stage"], set())), name

        # The same version seen again (a restarted sensor): no event, no second run.
        again = llmft(
            "watch", "--dir", str(watched), "--once", "--stable", "0.5", *store_set, env=env
        )
        assert again.returncode == 0 and "llmft.dataset.arrived" not in again.stdout
        time.sleep(5)
        assert len(runs_for_this_dataset()) == 1
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.timeout(300)
def test_llmft_deploy_registers_pools_and_deployments(prefect_server):
    # Last in this file: the deployments it registers share the server with the test above.
    env = prefect_server
    done = llmft("deploy", env=env, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    names = {
        (d["name"], api(env, "GET", f"/flows/{d['flow_id']}")["name"])
        for d in api(env, "POST", "/deployments/filter", {})
    }
    assert {
        ("nightly", "llmft-pipeline"),
        ("on-new-dataset", "llmft-pipeline"),
        ("gpu", "llmft-train"),
        ("dataset-sensor", "llmft-dataset-sensor"),
    } <= names
    assert api(env, "GET", "/work_pools/gpu")["concurrency_limit"] == 1
    assert api(env, "GET", "/work_pools/cpu")["type"] == "process"
    gpu = _deployment(env, "llmft-train", "gpu")
    assert gpu["work_pool_name"] == "gpu"
    assert gpu["global_concurrency_limit"]["limit"] == 1
    nightly = _deployment(env, "llmft-pipeline", "nightly")
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert _automations(env, _deployment(env, "llmft-pipeline", "on-new-dataset")["id"])
    # the server's scheduler turns the cron into runs (it cannot with SQLAlchemy 2.1)
    scheduled = wait_for(
        lambda: flow_runs(env, deployment_id={"any_": [nightly["id"]]}),
        timeout=150,
        what="scheduled runs of the nightly deployment",
    )
    starts = {r["expected_start_time"][11:16] for r in scheduled}
    assert starts == {"02:00"} and all(r["state_type"] == "SCHEDULED" for r in scheduled)


def _deployment(env, flow: str, name: str) -> dict | None:
    try:
        return api(env, "GET", f"/deployments/name/{flow}/{name}")
    except Exception:
        return None


def _automations(env, deployment_id: str) -> list[dict]:
    related = api(env, "GET", f"/automations/related-to/prefect.deployment.{deployment_id}")
    return [a for a in related if a["enabled"]]


def _finished(runs: list[dict]) -> dict | None:
    done = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
    return done[0] if done else None


@pytest.mark.slow  # a full training on the worker; run on purpose
@pytest.mark.timeout(1800)
def test_training_runs_on_the_gpu_pool_when_a_worker_is_online(
    prefect_server, tiny_pipeline, tmp_path
):
    env = prefect_server
    assert llmft("deploy", env=env, timeout=240).returncode == 0
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu", "--name", "gpu-1"],
        env=env,
        cwd=REPO,
        stdout=open(tmp_path / "worker.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: [
                w
                for w in api(env, "POST", "/work_pools/gpu/workers/filter", {})
                if w["status"] == "ONLINE"
            ],
            timeout=120,
            what="gpu worker online",
        )
        seed = 11 if "sqlite" in env["PREFECT_API_DATABASE_CONNECTION_URL"] else 12  # untrained
        sets = [
            x for s in [*tiny_pipeline["overrides"], f"train.seed={seed}"] for x in ("--set", s)
        ]
        summary_file = tmp_path / "summary.json"
        done = llmft("run", *sets, "--summary", str(summary_file), env=env, timeout=1500)
        assert done.returncode == 0, done.stdout + done.stderr
        summary = json.loads(summary_file.read_text())
        assert not summary["stages"]["train"]["cached"]
        (train_run,) = [
            r
            for r in flow_runs(env)
            if r["deployment_id"] == _deployment(env, "llmft-train", "gpu")["id"]
        ]
        assert train_run["state_type"] == "COMPLETED"
        assert train_run["parameters"]["data"]["key"] == summary["stages"]["data"]["key"]
    finally:
        worker.terminate()
        worker.wait(timeout=60)
