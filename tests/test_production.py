"""The production topology with its real parts (docs/production.md).

- The Prefect server on PostgreSQL holds what the API writes (fast).
- Concurrency: four dataset events at once, plus one for a file already seen, become four
  pipeline runs on a cpu-pool worker that runs them side by side; every run completes,
  none is lost or duplicated, the store holds one artifact per key, the shared base key is
  computed once, and the deployed pointer follows the promotion rule run after run. On
  PostgreSQL and, beside it, on SQLite (slow: it prints its row of the docs' table).
- Separate hosts: a gpu-pool worker and a cpu-pool worker with their own working
  directories and environments, sharing only the store path and the Prefect API; the GPU
  host dies mid-training, the heartbeat automation (deploy/automations.yaml) marks its run
  crashed, and the retried training resumes on a new GPU worker (slow).

The pipelines train the tiny 2-layer model of tests/train_fixtures.py, so a run is made of
process start-ups more than of computing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect_api import api, flow_runs, wait_for
from train_fixtures import make_tiny_model

from flows.deploy import PREFECT_YAML
from tasks.store import MANIFEST

REPO = Path(__file__).resolve().parent.parent
STAGES = ("base", "data", "train", "evaluate", "merge", "export")
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# what a pipeline run trains here: seconds of work on the tiny model (tests/conftest.py's
# tiny_pipeline recipe); no floor against the base, whose answers are as random as these
TINY = [
    "train.max_steps=2",
    "train.batch_size=2",
    "train.cutoff_len=128",
    "evaluate.num_samples=2",
    "evaluate.max_new_tokens=16",
    "evaluate.max_loss_records=4",
    "export.quantize=[q8_0]",
    "export.verify_prompts=2",
    "export.speed_tokens=8",
    "export.lora_adapter=false",
    "pipeline.promote_samples=2",
    "pipeline.promote_margin=null",
]


def database(env: dict[str, str]) -> str:
    return env["PREFECT_API_DATABASE_CONNECTION_URL"].split(":", 1)[0].split("+")[0]


# --------------------------------------------------------------------------- the database


@pytest.mark.parametrize("prefect_server", ["postgres"], indirect=True)
def test_the_server_keeps_what_the_api_writes_in_postgres(prefect_server):
    import asyncio

    import asyncpg

    env = prefect_server
    name = f"llmft-db-probe-{time.time_ns()}"
    made = api(env, "POST", "/flows/", {"name": name})
    url = env["PREFECT_API_DATABASE_CONNECTION_URL"].replace("postgresql+asyncpg", "postgresql")

    async def read() -> list:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch("SELECT id::text, name FROM flow WHERE name = $1", name)
        finally:
            await conn.close()

    (row,) = asyncio.run(read())
    assert row["id"] == made["id"]


# --------------------------------------------------------------------------- helpers


def dataset(path: Path, index: int, records: int = 32) -> Path:
    """A small arithmetic dataset; `index` picks numbers no other index uses."""
    lines = []
    for i in range(records):
        a, b = 100 * index + i, 7 + i
        lines.append(
            json.dumps({"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a + b}."})
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def deployments_file(folder: Path, overrides: list[str], gpu_checkout: Path | None = None) -> Path:
    """deploy/prefect.yaml's on-new-dataset and gpu deployments with this test's recipe.

    on-new-dataset runs as many at once as its worker takes (the shipped file: one at a
    time); with `gpu_checkout`, the gpu deployment runs from that folder, its host's own
    checkout of the code (the shipped file: the folder `llmft deploy` ran in).
    """
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    spec.pop("definitions", None)
    kept = []
    for d in spec["deployments"]:
        if d["name"] == "on-new-dataset":
            d["parameters"] = {"config_path": None, "overrides": overrides}
            d.pop("concurrency_limit", None)
        elif d["name"] == "gpu" and gpu_checkout is not None:
            step = {"directory": str(gpu_checkout)}
            d["pull"] = [{"prefect.deployments.steps.set_working_directory": step}]
        else:
            continue
        kept.append(d)
    spec["deployments"] = kept
    path = folder / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def llmft(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def start_worker(
    pool: str, name: str, env: dict, cwd: Path, log: Path, limit: int | None = None
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name]
    if limit:
        cmd += ["--limit", str(limit)]
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=open(log, "w"),  # noqa: SIM115 - the worker's for its life
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def worker_online(env: dict, pool: str, name: str) -> None:
    wait_for(
        lambda: [
            w
            for w in api(env, "POST", f"/work_pools/{pool}/workers/filter", {})
            if w["name"] == name and w["status"] == "ONLINE"
        ],
        timeout=180,
        what=f"{pool} worker {name} online",
    )


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a process and everything below it at once: a host that loses power."""
    import psutil

    root = psutil.Process(proc.pid)
    everyone = [root, *root.children(recursive=True)]
    for p in everyone:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return [p.pid for p in everyone]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def deployment_runs(env: dict, flow: str, name: str) -> list[dict]:
    deployment = api(env, "GET", f"/deployments/name/{flow}/{name}")
    return flow_runs(env, deployment_id={"any_": [deployment["id"]]})


def finished_artifacts(store: Path, stage: str) -> set[str]:
    return {m.parent.name for m in (store / stage).glob(f"*/{MANIFEST}")}


def debris(store: Path) -> list[str]:
    """Partial folders left in the store (a crash's, never served)."""
    return sorted(str(p.relative_to(store)) for p in store.glob("*/.partial-*"))


def replay_promotions(history: list[dict]) -> str | None:
    """The run the promotion rule leaves deployed, checked decision by decision: each one
    compared the candidate with the model deployed just before it (never with an older
    one, which two promotions racing would do) and decided as the rule says."""
    deployed = None
    for entry in history:
        if deployed is None:
            assert entry["decision"] == "promoted", entry
            assert "nothing was deployed" in entry["reason"], entry
        else:
            assert f"(run {deployed})" in entry["reason"], (deployed, entry)
            better = entry["candidate"] >= entry["deployed"]
            assert entry["decision"] == ("promoted" if better else "kept"), entry
        if entry["decision"] == "promoted":
            deployed = entry["run_id"]
    return deployed


# --------------------------------------------------------------------------- concurrency


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_four_dataset_events_at_once_four_runs_nothing_lost(
    prefect_server, base_model_dir, tmp_path
):
    env = {**prefect_server, "PREFECT_LOGGING_LEVEL": "INFO"}
    backend = database(env)
    store, incoming = tmp_path / "artifacts", tmp_path / "incoming"
    incoming.mkdir()
    tiny = make_tiny_model(base_model_dir, tmp_path / "tiny")
    overrides = [*TINY, f"base.model={tiny}", f"pipeline.store={store}"]
    llmft("deploy", "--file", str(deployments_file(tmp_path, overrides)), env=env)
    worker = start_worker("cpu", "cpu-1", env, REPO, tmp_path / "worker.log", limit=4)
    server_log = Path(env["PREFECT_HOME"]) / "server.log"
    log_offset = server_log.stat().st_size  # the server's lines from here on are this test's
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(stop, worker)
        worker_online(env, "cpu", "cpu-1")
        peak = None
        if backend == "postgresql":
            from postgres import PeakConnections

            peak = cleanup.enter_context(
                PeakConnections(env["PREFECT_API_DATABASE_CONNECTION_URL"])
            )
        files = [dataset(incoming / f"set{i}.jsonl", i) for i in range(1, 5)]
        started = time.time()
        sensor = llmft("watch", "--dir", str(incoming), "--once", "--stable", "0",
                       "--set", f"pipeline.store={tmp_path / 'sensor-1'}", env=env)  # fmt: skip
        assert sensor.stdout.count("llmft.dataset.arrived") == 4, sensor.stdout
        # The file already seen: a second sensor, which remembers nothing, finds the same
        # bytes under another name and announces them again (same event id: the content's).
        seen = tmp_path / "resent"
        seen.mkdir()
        shutil.copy(files[0], seen / "set1-copy.jsonl")
        again = llmft("watch", "--dir", str(seen), "--once", "--stable", "0",
                      "--set", f"pipeline.store={tmp_path / 'sensor-2'}", env=env)  # fmt: skip
        assert again.stdout.count("llmft.dataset.arrived") == 1, again.stdout

        def all_done() -> list[dict] | None:
            runs = deployment_runs(env, "llmft-pipeline", "on-new-dataset")
            mine = [r for r in runs if str(incoming) in (r["parameters"].get("dataset") or "")]
            return (
                mine if len(mine) >= 4 and all(r["state_type"] in TERMINAL for r in mine) else None
            )

        wait_for(all_done, timeout=3300, every=5, what="four pipeline runs finished")
        wall = time.time() - started
        time.sleep(20)  # a late duplicate would show up by now
        runs = [
            r
            for r in deployment_runs(env, "llmft-pipeline", "on-new-dataset")
            if str(incoming) in (r["parameters"].get("dataset") or "")
            or str(seen) in (r["parameters"].get("dataset") or "")
        ]

    with open(server_log, errors="replace") as f:
        f.seek(log_offset)
        errors = [line for line in f if "database is locked" in line or "| ERROR" in line]
    states = sorted(r["state_type"] for r in runs)
    row = {
        "database": backend,
        "runs": len(runs),
        "states": states,
        "wall_seconds": round(wall),
        "server_errors": len(errors),
        "peak_db_connections": peak.peak if peak else None,
        "first_server_error": errors[0].strip()[:300] if errors else None,
    }
    print(f"\nconcurrency[{backend}]: {json.dumps(row)}")
    # Every dataset once: no run lost, none duplicated, the repeated event made none.
    assert sorted(r["parameters"]["dataset"] for r in runs) == sorted(map(str, files)), row
    assert states == ["COMPLETED"] * 4, (row, (tmp_path / "worker.log").read_text()[-5000:])
    summaries = [json.loads((store / "runs" / r["id"] / "summary.json").read_text()) for r in runs]
    assert all(s["status"] == "completed" for s in summaries)
    # One artifact per key: what the runs asked for, each once, nothing half-made left.
    for stage in STAGES:
        keys = {s["stages"][stage]["key"] for s in summaries}
        assert finished_artifacts(store, stage) == keys, stage
    assert debris(store) == []
    assert len({s["stages"]["data"]["key"] for s in summaries}) == 4
    # The key all four need (the base): one run computed it, three took it from the store.
    assert len({s["stages"]["base"]["key"] for s in summaries}) == 1
    base_seconds = sorted(s["stages"]["base"]["seconds"] for s in summaries)
    assert sorted(s["stages"]["base"]["cached"] for s in summaries) == [False, True, True, True]
    # The deployed pointer: where the promotion rule, replayed decision by decision, ends.
    deployed = store / "deployed" / "default"
    history = [json.loads(line) for line in (deployed / "history.jsonl").read_text().splitlines()]
    assert sorted(h["run_id"] for h in history) == sorted(r["id"] for r in runs)
    current = json.loads((deployed / "current.json").read_text())
    assert current["run_id"] == replay_promotions(history)
    by_run = {s["run_id"]: s for s in summaries}
    assert current["gguf"] == by_run[current["run_id"]]["served_gguf"]
    assert os.path.realpath(deployed / "model.gguf") == current["gguf"]
    row |= {
        "base_seconds": base_seconds,
        "promotions": [h["decision"] for h in history],
        "stage_seconds": {
            st: round(max(s["stages"][st]["seconds"] for s in summaries)) for st in STAGES
        },
    }
    print(f"concurrency[{backend}] passed: {json.dumps(row)}")


# --------------------------------------------------------------------------- several nodes


def flag(cmd: list[str], name: str) -> str:
    """The value given to `name` in a command line (`--x v` or `--x=v`)."""
    for i, arg in enumerate(cmd):
        if arg == name:
            return cmd[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {cmd}")


def test_several_nodes_reach_torchrun_and_accelerate(tmp_path, monkeypatch):
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser
    from train_fixtures import tiny_config

    from tasks.train import launch_command

    spec = tmp_path / "spec.json"
    rendezvous = ("train.master_addr=10.1.2.3", "train.master_port=29400")
    torchrun = launch_command(
        tiny_config("train.launcher=torchrun", "train.num_processes=4", "train.nodes=2",
                    "train.node_rank=1", *rendezvous),
        spec,
    )  # fmt: skip
    parsed = get_args_parser().parse_args(torchrun[3:])  # torchrun's own parser
    assert (parsed.nnodes, parsed.node_rank, parsed.nproc_per_node) == ("2", 1, "4")
    assert (parsed.master_addr, parsed.master_port) == ("10.1.2.3", 29400)
    assert not parsed.standalone
    assert parsed.module and parsed.training_script == "tasks.train"
    assert parsed.training_script_args == ["--spec", str(spec)]

    # DeepSpeed through accelerate: processes counted over all machines, and each node runs
    # its own launcher (accelerate's default for several machines is pdsh over ssh)
    acc = launch_command(
        tiny_config("train.launcher=accelerate", "train.accelerate_config=zero3_offload",
                    "train.num_processes=8", "train.nodes=4", "train.node_rank=3", *rendezvous),
        spec,
    )  # fmt: skip
    args = launch_command_parser().parse_args(acc[3:])  # accelerate's own parser
    assert (args.num_processes, args.num_machines, args.machine_rank) == (32, 4, 3)
    assert (args.main_process_ip, args.main_process_port) == ("10.1.2.3", 29400)
    assert args.deepspeed_multinode_launcher == "standard"
    assert args.config_file.endswith("deploy/accelerate/zero3_offload.yaml")
    assert args.module and args.training_script == "tasks.train"

    # Unset, rank and rendezvous come from what the cluster sets on each host.
    monkeypatch.setenv("SLURM_NODEID", "2")
    monkeypatch.setenv("MASTER_ADDR", "gpu-node-01")
    monkeypatch.delenv("NODE_RANK", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    from_env = launch_command(
        tiny_config("train.launcher=torchrun", "train.nodes=3", "train.num_processes=8"), spec
    )
    assert flag(from_env, "--node_rank") == "2"
    assert flag(from_env, "--master_addr") == "gpu-node-01"
    assert flag(from_env, "--master_port") == "29500"
    one = launch_command(tiny_config("train.launcher=torchrun", "train.num_processes=2"), spec)
    assert "--standalone" in one and not any(a.startswith("--nnodes") for a in one)


def test_where_the_nodes_meet_is_not_in_the_key(base_model_dir, tmp_path):
    from train_fixtures import refs, tiny_config

    from tasks import train
    from tasks.train import budget

    data, base = refs(tmp_path / "base")
    two = ("train.launcher=torchrun", "train.nodes=2")
    k = train.key(tiny_config(*two), data, base)
    elsewhere = tiny_config(*two, "train.node_rank=1", "train.master_addr=10.0.0.9",
                            "train.master_port=29999")  # fmt: skip
    assert train.key(elsewhere, data, base) == k  # every node, every retry: one partial folder
    assert train.key(tiny_config("train.launcher=torchrun"), data, base) != k
    # the budget counts every node's processes in a step
    t = tiny_config(*two, "train.num_processes=2", "train.batch_size=2").train
    assert budget.resolve(t, 64).records_per_step == 8


def test_node_settings_that_cannot_work_are_refused():
    from tasks.config import ConfigError, load_config

    def config(*overrides: str):
        return load_config(None, list(overrides), for_training=True)

    with pytest.raises(ConfigError, match=r"train\.node_rank: got 2.*train\.nodes - 1 = 1"):
        config("train.launcher=torchrun", "train.nodes=2", "train.node_rank=2")
    with pytest.raises(ConfigError, match=r"train\.nodes: got 2.*launcher=torchrun"):
        config("train.nodes=2")
    assert config("train.launcher=torchrun", "train.nodes=2", "train.node_rank=1").train.nodes == 2


@pytest.mark.slow  # 146 s here with the machine's load at 8: three launchers start torch
@pytest.mark.timeout(900)
def test_two_nodes_train_to_the_loss_of_one_process(base_model_dir, tmp_path):
    """Two hosts on localhost: node 0 is the train stage, node 1 the follower; one process
    each (gloo on CPU), a global batch of 4, as one process with a batch of 4."""
    from postgres import free_port
    from safetensors.torch import load_file
    from train_fixtures import refs, tiny_config

    from tasks import train
    from tasks.store import Store

    make_tiny_model(base_model_dir, tmp_path / "base")
    data, base = refs(tmp_path / "base")
    store = Store(tmp_path / "store")
    same = ("train.device=cpu", "train.max_steps=6", "train.save_steps=3", "train.logging_steps=1")
    two = tiny_config("train.launcher=torchrun", "train.nodes=2", "train.batch_size=2",
                      "train.master_addr=127.0.0.1", f"train.master_port={free_port()}", *same)  # fmt: skip
    one = tiny_config("train.batch_size=4", *same)
    log = tmp_path / "node1.log"
    node1 = subprocess.Popen(
        [sys.executable, "-m", "tasks.train.nodes", "--store", str(store.root),
         "--node-rank", "1", "--once"],
        cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    try:
        spread = train.run(two, store, data, base)  # node 0, in this process's launcher
        assert node1.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if node1.poll() is None:
            node1.kill()
    assert "node 1 of 2 joins" in log.read_text()
    alone = train.run(one, store, data, base)

    def losses(ref) -> list[float]:
        lines = (ref.dir / "log_history.jsonl").read_text().splitlines()
        return [h["loss"] for h in map(json.loads, lines) if "loss" in h]

    m2 = json.loads((spread.dir / "metrics.json").read_text())
    m1 = json.loads((alone.dir / "metrics.json").read_text())
    assert (m2["processes"], m1["processes"]) == (2, 1)
    assert len(losses(spread)) == 6 and losses(spread) == pytest.approx(losses(alone), abs=2e-4)
    assert losses(spread)[-1] < losses(spread)[0]  # it trained
    assert m2["dev_loss"]["after"] == pytest.approx(m1["dev_loss"]["after"], rel=1e-4)
    w2 = load_file(spread.dir / "adapter" / "adapter_model.safetensors")
    w1 = load_file(alone.dir / "adapter" / "adapter_model.safetensors")
    assert w2.keys() == w1.keys()
    for name in w1:
        assert (w2[name] - w1[name]).abs().max() < 1e-4, name


# --------------------------------------------------------------------------- deploy/ files


def test_the_silent_run_automation_is_one_prefect_accepts():
    from prefect.events.schemas.automations import AutomationCore, Posture

    spec = yaml.safe_load((REPO / "deploy" / "automations.yaml").read_text())
    (automation,) = [AutomationCore.model_validate(a) for a in spec["automations"]]
    trigger = automation.trigger
    assert trigger.posture == Posture.Proactive and trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.for_each == {"prefect.resource.id"}
    # three missed beats at the heartbeat the worker files set
    assert trigger.within.total_seconds() == 3 * 30
    assert automation.actions[0].state.value == "CRASHED"


@pytest.mark.parametrize("script", ["gpu-worker.sbatch", "gpu-nodes.sbatch"])
def test_slurm_scripts_parse_and_start_what_exists(script):
    path = REPO / "deploy" / "slurm" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    assert "prefect worker start --pool gpu" in text
    assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30" in text
    if script == "gpu-nodes.sbatch":  # the follower's entry and the rank SLURM gives it
        assert "python -m tasks.train.nodes --store" in text and "SLURM_NODEID" in text


def test_kubernetes_gpu_nodes_give_each_pod_its_rank_and_node_0s_address():
    docs = list(yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "gpu-nodes.yaml").read_text()))
    service, nodes = docs
    assert service["spec"]["clusterIP"] == "None"
    (container,) = nodes["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    pod_index = "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == pod_index
    assert (
        env["MASTER_ADDR"]["value"]
        == f"{nodes['metadata']['name']}-0.{service['metadata']['name']}"
    )
    script = container["args"][0]
    assert "prefect worker start --pool gpu" in script
    assert "python -m tasks.train.nodes --store /shared/llmft/artifacts" in script
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    worker = list(
        yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "gpu-worker.yaml").read_text())
    )
    (worker_container,) = worker[1]["spec"]["template"]["spec"]["containers"]
    assert "/shared/llmft/artifacts" in mounts & {
        m["mountPath"] for m in worker_container["volumeMounts"]
    }


# --------------------------------------------------------------------------- separate hosts


def host(home: Path, api_url: str, code: Path) -> dict[str, str]:
    """A host's environment, built from nothing: its own home, temp, Prefect home and code
    checkout; the Prefect API the only address it shares with the other host."""
    for sub in ("tmp", "prefect", "hf"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": api_url,
        "PYTHONPATH": str(code),
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",  # what deploy/automations.yaml listens for
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def checkout(dest: Path) -> Path:
    """The code as a GPU host has it: its own copy of the repository's sources."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("tasks", "flows", "configs", "deploy"):
        shutil.copytree(REPO / name, dest / name, ignore=skip)
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("prefect_server", ["postgres"], indirect=True)
def test_a_gpu_host_dies_mid_training_and_the_retried_run_finishes(
    prefect_server, base_model_dir, tmp_path
):
    api_url = prefect_server["PREFECT_API_URL"]
    admin = {**prefect_server}  # whoever runs `llmft deploy`: the server's own shell
    shared = tmp_path / "shared"  # the one folder both hosts mount, at the same path
    store = shared / "artifacts"
    tiny = make_tiny_model(base_model_dir, shared / "models" / "tiny")  # the base stage links it
    gpu_code = checkout(tmp_path / "gpu-host" / "llmft")
    cpu = host(tmp_path / "cpu-host", api_url, REPO)
    gpu = host(tmp_path / "gpu-host", api_url, gpu_code)
    # 40 steps, a checkpoint every 10: the host dies with a checkpoint behind it, work ahead
    overrides = [*TINY, f"base.model={tiny}", f"pipeline.store={store}",
                 "pipeline.train_on=gpu-pool", "train.max_steps=40", "train.save_steps=10",
                 "train.logging_steps=5"]  # fmt: skip
    llmft("deploy", "--file", str(deployments_file(tmp_path, overrides, gpu_code)), env=admin)
    created = subprocess.run(
        [sys.executable, "-m", "prefect", "automation", "create", "--from-file",
         str(REPO / "deploy" / "automations.yaml")],
        env=admin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    logs = tmp_path / "logs"
    logs.mkdir()
    workers = [
        start_worker("cpu", "cpu-host", cpu, REPO, logs / "cpu.log"),
        start_worker("gpu", "gpu-host-1", gpu, gpu_code, logs / "gpu-1.log"),
    ]
    try:
        worker_online(admin, "cpu", "cpu-host")
        worker_online(admin, "gpu", "gpu-host-1")
        data_file = dataset(shared / "incoming" / "set9.jsonl", 9)
        sensor = llmft("watch", "--dir", str(data_file.parent), "--once", "--stable", "0",
                       "--set", f"pipeline.store={store}", env={**cpu, "PYTHONPATH": ""})  # fmt: skip
        assert "llmft.dataset.arrived" in sensor.stdout

        # The GPU host dies once training has a checkpoint and steps left.
        checkpoint = wait_for(
            lambda: sorted(store.glob("train/.partial-*/checkpoints/step-*/state.json")),
            timeout=1500,
            every=0.2,
            what="the first training checkpoint",
        )[0].parent
        killed = kill_tree(workers[1])
        partial = checkpoint.parent.parent
        key = partial.name.removeprefix(".partial-")
        (dying,) = [
            r for r in deployment_runs(admin, "llmft-train", "gpu") if r["state_type"] == "RUNNING"
        ]
        # The store after the crash: the partial folder with its checkpoint, no artifact.
        assert not (store / "train" / key).exists() and partial.is_dir()
        assert not (partial / MANIFEST).exists()
        done_at_kill = int(checkpoint.name.removeprefix("step-"))
        assert done_at_kill < 40, "training ended before the host was killed"

        # Another GPU worker comes up: the same checkout path, its own everything else.
        gpu2 = host(tmp_path / "gpu-host-2", api_url, gpu_code)
        workers.append(start_worker("gpu", "gpu-host-2", gpu2, gpu_code, logs / "gpu-2.log"))
        pipeline_run = wait_for(
            lambda: [
                r
                for r in deployment_runs(admin, "llmft-pipeline", "on-new-dataset")
                if r["parameters"].get("dataset") == str(data_file) and r["state_type"] in TERMINAL
            ],
            timeout=2400,
            every=5,
            what="the pipeline run finished",
        )[0]
    finally:
        for w in workers:
            stop(w)
    tail = (logs / "cpu.log").read_text()[-4000:]
    assert pipeline_run["state_type"] == "COMPLETED", tail
    crashed = api(admin, "GET", f"/flow_runs/{dying['id']}")
    assert crashed["state_type"] == "CRASHED", crashed["state"]
    assert "no heartbeat" in crashed["state"]["message"]
    train_runs = deployment_runs(admin, "llmft-train", "gpu")
    assert sorted(r["state_type"] for r in train_runs) == ["COMPLETED", "CRASHED"]

    summary = json.loads((store / "runs" / pipeline_run["id"] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stages"]["train"]["key"] == key
    for stage in STAGES:
        assert (Path(summary["stages"][stage]["path"]) / MANIFEST).is_file(), stage
    assert debris(store) == []
    metrics = json.loads((store / "train" / key / "metrics.json").read_text())
    assert metrics["steps"] == 40 and metrics["resumed_from_step"] >= done_at_kill
    # Each host ran its part from its own checkout: training imported the GPU host's copy.
    assert list((gpu_code / "tasks" / "train" / "__pycache__").glob("loop.*.pyc"))
    print(
        f"\nhosts: killed {len(killed)} processes at step {done_at_kill}; resumed from step "
        f"{metrics['resumed_from_step']}; pipeline {pipeline_run['total_run_time']:.0f} s"
    )
