"""`llmft deploy`: register llmft's deployments with the Prefect server in PREFECT_API_URL.

The deployments themselves are in `deploy/prefect.yaml` (nightly cron, on-new-dataset
trigger, the GPU training deployment, the dataset sensor); this module makes the `cpu`
and `gpu` process work pools they name (the `gpu` pool runs one flow at a time) and then
runs `prefect deploy --all` on that file from the repository root, so workers started in
this checkout find the code.

`llmft deploy --serve` is the no-worker alternative: this process serves the pipeline's
deployments (schedule and trigger included) and runs their flow runs itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tasks.config import REPO_ROOT, UserError

PREFECT_YAML = REPO_ROOT / "deploy" / "prefect.yaml"
# (name, concurrency limit): one GPU host trains one model at a time.
WORK_POOLS = (("cpu", None), ("gpu", 1))
EVENT = "llmft.dataset.arrived"


def require_server() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError(
            "PREFECT_API_URL is not set: deployments and dataset events need a Prefect server "
            "(fix: `llmft server` in another shell, then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`)"
        )
    return url


def ensure_work_pools() -> list[str]:
    """Create the `cpu` and `gpu` process work pools unless they exist; returns the new ones."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    created = []
    with get_client(sync_client=True) as client:
        for name, limit in WORK_POOLS:
            pool = WorkPoolCreate(
                name=name,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
                concurrency_limit=limit,
            )
            try:
                client.create_work_pool(pool)
                created.append(name)
            except ObjectAlreadyExists:
                pass
    return created


def deploy(prefect_yaml: Path = PREFECT_YAML) -> None:
    """Work pools, then every deployment in `prefect_yaml`."""
    url = require_server()
    if not Path(prefect_yaml).is_file():
        raise UserError(f"{prefect_yaml}: not found (fix: --file deploy/prefect.yaml)")
    for name in ensure_work_pools():
        print(f"created work pool {name!r} (process)")
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    cmd += ["--prefect-file", str(Path(prefect_yaml).resolve())]
    print(f"registering the deployments of {prefect_yaml} with {url}")
    done = subprocess.run(cmd, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed (exit status {done.returncode})")


def dataset_trigger():
    """The on-new-dataset trigger; keep it identical to the one in deploy/prefect.yaml."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="dataset-arrived",
        expect={EVENT},
        match={"prefect.resource.id": "llmft.dataset.*"},
        parameters={"dataset": "{{ event.payload.path }}", "sha256": "{{ event.payload.sha256 }}"},
    )


def serve(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    watch_dir: Path | None = None,
) -> None:
    """Serve `nightly` and `on-new-dataset` (and the sensor, given a folder) from here."""
    from prefect import serve as prefect_serve

    from flows.pipeline import pipeline
    from flows.watch import watch_flow
    from tasks.config import load_config

    require_server()
    cfg = load_config(config_path, overrides)  # fail now on a bad config, not at 2 a.m.
    parameters = {"config_path": config_path, "overrides": list(overrides or [])}
    deployments = [
        pipeline.to_deployment(
            name="nightly", cron="0 2 * * *", parameters=parameters, concurrency_limit=1
        ),
        pipeline.to_deployment(
            name="on-new-dataset",
            triggers=[dataset_trigger()],
            parameters=parameters,
            concurrency_limit=1,
        ),
    ]
    if watch_dir:
        state = Path(cfg.pipeline.store) / "watch" / "state.json"
        deployments.append(
            watch_flow.to_deployment(
                name="dataset-sensor",
                interval=60,
                parameters={"folder": str(watch_dir), "state_file": str(state)},
            )
        )
    prefect_serve(*deployments, limit=1)  # one flow run at a time on this host
