"""Training across hosts: the rendezvous each launcher is given, and the follower that lends
a host's processes to a training that node 0 started.

    node 0         the train stage (a gpu-pool worker's flow run, or `python -m tasks.train
                   --spec`): tokenizes, writes the job spec into the shared store
                   (<store>/train/.partial-<key>/checkpoints/spec.json), starts its launcher
                   as node 0, and writes the artifact and its manifest when all nodes are done
    nodes 1..N-1   `python -m tasks.train.nodes --store <store>`: waits for a job spec with
                   train.nodes > 1, starts the same launcher on it with its own rank, and
                   waits for the next one

Rank, node 0's address and port come from the train section, else from what the cluster
sets on each host (SLURM: SLURM_NODEID; a Kubernetes indexed Job: JOB_COMPLETION_INDEX;
NODE_RANK, MASTER_ADDR, MASTER_PORT anywhere). The launchers do the rest: a static
rendezvous on node 0's address, which every node dials. A DeepSpeed config runs under
accelerate's `standard` multi-node launcher (torchrun on each node), so no host needs ssh
or pdsh into another. The store must be one folder at the same path on every node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tasks.config import TrainConfig, accelerate_launch

DEFAULT_PORT = 29500  # torchrun's and accelerate's own default
RANK_ENV = ("NODE_RANK", "SLURM_NODEID", "JOB_COMPLETION_INDEX")
# A job spec written this long before the follower started is still joined (a follower
# restarted while node 0 waits at the rendezvous); older ones are a crashed run's.
GRACE_SECONDS = 60.0
JOB_SPECS = "train/.partial-*/checkpoints/spec.json"


def node_rank(t: TrainConfig) -> int:
    if t.node_rank is not None:
        return t.node_rank
    for name in RANK_ENV:
        if (value := os.environ.get(name, "").strip()).isdigit():
            return int(value)
    return 0


def master(t: TrainConfig) -> tuple[str, int]:
    """Node 0's address and port, as every node must be given them."""
    addr = t.master_addr or os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port = t.master_port or int(os.environ.get("MASTER_PORT") or DEFAULT_PORT)
    return addr, port


def torchrun_args(t: TrainConfig) -> list[str]:
    if t.nodes == 1:
        return ["--standalone", f"--nproc_per_node={t.num_processes}"]
    addr, port = master(t)
    return [
        f"--nnodes={t.nodes}", f"--node_rank={node_rank(t)}",
        f"--master_addr={addr}", f"--master_port={port}",
        f"--nproc_per_node={t.num_processes}",
    ]  # fmt: skip


def accelerate_args(t: TrainConfig) -> list[str]:
    # accelerate's --num_processes counts the processes of all machines together
    args = ["--num_processes", str(t.num_processes * t.nodes)]
    if t.nodes == 1:
        return args
    addr, port = master(t)
    args += [
        "--num_machines", str(t.nodes), "--machine_rank", str(node_rank(t)),
        "--main_process_ip", addr, "--main_process_port", str(port),
    ]  # fmt: skip
    if accelerate_launch(t).get("distributed_type") == "DEEPSPEED":
        # accelerate's default for several machines is pdsh over ssh from node 0
        args += ["--deepspeed_multinode_launcher", "standard"]
    return args


# ----------------------------------------------------------------------------- the follower


def join(spec_path: Path, t: TrainConfig, rank: int, log: Callable[[str], None] = print) -> int:
    """Run node `rank`'s launcher on node 0's job spec; its exit status."""
    from tasks import runner
    from tasks.config import REPO_ROOT, Config
    from tasks.train import launch_command

    mine = Config(train=t.model_copy(update={"node_rank": rank}))
    cmd = launch_command(mine, spec_path)
    log(f"node {rank} of {t.nodes} joins {spec_path.parent.parent.name}: {' '.join(cmd)}")
    exited = runner.launch(cmd, name=f"training (node {rank})", log=log, cwd=REPO_ROOT)
    log(f"node {rank}: the launcher exited with status {exited.status}")
    return exited.status


def follow(
    store: Path,
    rank: int,
    once: bool = False,
    poll_seconds: float = 2.0,
    log: Callable[[str], None] = print,
) -> int:
    """Join every multi-node training that appears in `store`; with `once`, the first one."""
    if rank == 0:
        log("node 0 runs the train stage itself (a gpu-pool worker); followers are ranks 1..N-1")
        return 2
    started = time.time() - GRACE_SECONDS
    joined: dict[Path, float] = {}
    log(f"node {rank}: waiting for multi-node trainings in {store / 'train'}")
    while True:
        for spec_path in sorted(store.glob(JOB_SPECS)):
            try:
                written = spec_path.stat().st_mtime
                raw = json.loads(spec_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # finished (renamed) or being replaced right now
                continue
            if written < started or joined.get(spec_path) == written:
                continue
            t = TrainConfig.model_validate(raw["train"])
            if t.nodes < 2 or rank >= t.nodes:
                continue
            joined[spec_path] = written
            status = join(spec_path, t, rank, log)
            if once:
                return status
        time.sleep(poll_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.train.nodes",
        description="Lend this host's processes to the multi-node trainings node 0 starts.",
    )
    parser.add_argument("--store", required=True, help="the artifact store, shared with node 0")
    parser.add_argument(
        "--node-rank",
        type=int,
        help=f"this host's rank, 1..nodes-1 (default: {', '.join(RANK_ENV)} from the environment)",
    )
    parser.add_argument("--once", action="store_true", help="exit after one training")
    args = parser.parse_args(argv)
    rank = args.node_rank
    if rank is None:
        rank = node_rank(TrainConfig())
    return follow(Path(args.store).resolve(), rank, once=args.once)


if __name__ == "__main__":
    sys.exit(main())
