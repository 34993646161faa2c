"""Training stage: base model + tokenized data → adapter (lora/qlora/ptuning) or weights (full).

    artifacts/train/<key>/
        adapter/ or model/     peft save_pretrained (adapter_config.json,
                               adapter_model.safetensors) or full safetensors weights;
                               the tokenizer and its chat template in the same folder
        hyperparameters.yaml   log_history.jsonl   loss.png   metrics.json

`run` validates the config (before any weights load), tokenizes (tasks/train/tokens.py), writes
a spec and starts the job in a subprocess: `python -m tasks.train --spec FILE`, or the same
module under `torchrun` / `accelerate launch --config_file deploy/accelerate/<x>.yaml`.
A subprocess can be killed when stuck and keeps an out-of-memory to itself; a job out of
(GPU or CPU) memory exits with status 4 and the parent raises `OutOfMemory`, which the
pipeline does not retry. The job works in the store's partial folder, so a killed job
started again resumes from its checkpoints there (tasks/train/checkpoint.py).

Run alone: `python -m tasks.train --spec spec.json` (one job, no Prefect, no store), or
`python -m tasks.train [--config FILE] [--set ...]` (data, base, then this stage).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tasks.config import (
    EXIT_OOM,
    REPO_ROOT,
    Config,
    ConfigError,
    OutOfMemory,
    TrainConfig,
    UserError,
    accelerate_config_path,
    load_config,
    machine_problems,
    train_problems,
)
from tasks.store import Ref, Store, make_key, write_json_atomic

VERSION = "1"
MIN_CONTENT_TOKENS = 16  # room a cutoff_len must leave beyond the template's own tokens


class TrainingFailed(RuntimeError):
    """The training subprocess exited with an error (its output says why)."""


def key(cfg: Config, data: Ref, base: Ref) -> str:
    return make_key(
        "train", VERSION, cfg.train.model_dump(mode="json"), {"data": data.key, "base": base.key}
    )


# ----------------------------------------------------------------------------- validation


def validate(cfg: Config, model_dir: Path) -> None:
    """Every problem of the train section at once, as a ConfigError naming each fix.

    The config's own checks run again here because a config can reach this stage without
    `load_config` (the gpu pool's flow gets a dict), and the machine checks are for the
    machine that trains. Then what needs the model's files: the tokenizer (for the
    template's length), config.json and the weights' names (read from the safetensors
    headers). Loads no weights.
    """
    from tasks import formatting, methods
    from tasks.train.tokens import load_tokenizer

    t = cfg.train
    problems = train_problems(t) + machine_problems(t) + methods.check(t, model_dir)
    try:
        tokenizer = load_tokenizer(model_dir)
        overhead = formatting.template_length(tokenizer, t.template)
        if t.cutoff_len < overhead + MIN_CONTENT_TOKENS:
            problems.append(
                f"train.cutoff_len={t.cutoff_len} is below what the template needs: "
                f"{overhead} tokens for an empty question and answer, plus room for the text "
                f"(fix: --set train.cutoff_len={max(512, overhead + 256)})"
            )
    except formatting.FormatError as exc:
        problems.append(str(exc))
    config = json.loads((model_dir / "config.json").read_text())
    longest = t.cutoff_len + (t.ptuning.pre_seq_len if t.method == "ptuning" else 0)
    limit = config.get("max_position_embeddings")
    if limit and longest > limit:
        problems.append(
            f"train.cutoff_len={t.cutoff_len} (+ prefix) exceeds the model's "
            f"max_position_embeddings={limit} (fix: --set train.cutoff_len={limit // 2})"
        )
    if problems:
        raise ConfigError(
            f"{len(problems)} problem(s) in the train section:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


# ----------------------------------------------------------------------------- launching


def launch_command(cfg: Config, spec_path: Path) -> list[str]:
    t = cfg.train
    job = ["-m", "tasks.train", "--spec", str(spec_path)]
    if t.launcher == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={t.num_processes}", *job,
        ]  # fmt: skip
    if t.launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if t.accelerate_config:
            cmd += ["--config_file", str(accelerate_config_path(t.accelerate_config))]
        return [*cmd, "--num_processes", str(t.num_processes), *job]
    return [sys.executable, *job]


# Linux: a job dies with whoever started it (no orphaned GPU job after a SIGKILLed worker).
# The launcher is started through this trampoline, which asks the kernel for SIGKILL when its
# parent dies (PR_SET_PDEATHSIG = 1; it survives exec), then becomes the launcher; each
# training process does the same towards the launcher (env TIED).
TIED = "LLMFT_DIE_WITH_PARENT"
_TRAMPOLINE = (
    "import ctypes, os, signal, sys;"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL);"
    "os.getppid() == int(sys.argv[1]) or sys.exit('parent already gone');"
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def _tied(cmd: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *cmd]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux") and os.environ.get(TIED) == "1":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def run(cfg: Config, store: Store, data: Ref, base: Ref) -> Ref:
    from tasks import base as base_stage
    from tasks.train import tokens

    model_dir = base_stage.model_dir(base)
    k = key(cfg, data, base)
    if hit := store.lookup("train", k):
        return hit
    validate(cfg, model_dir)
    tokenized = tokens.run(cfg, store, data, base)
    inputs = {"data": data.key, "base": base.key, "tokens": tokenized.key}

    def work(tmp: Path) -> dict[str, Any]:
        from tasks.train.loop import Spec

        spec = Spec(cfg.train, model_dir, tokenized.dir, tmp, inputs)
        spec_path = tmp / "checkpoints" / "spec.json"
        write_json_atomic(spec_path, spec.to_json())
        paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), TIED: "1"}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        cmd = launch_command(cfg, spec_path)
        oom = oom_marker(spec_path)
        oom.unlink(missing_ok=True)  # from an earlier attempt in this partial folder
        done = subprocess.run(_tied(cmd), cwd=REPO_ROOT, env=env)
        if done.returncode == EXIT_OOM or oom.is_file():
            raise OutOfMemory(oom_message(cfg.train, oom))
        if done.returncode != 0:
            raise TrainingFailed(
                f"training exited with status {done.returncode} ({' '.join(cmd)}); its "
                f"checkpoints stay in {tmp / 'checkpoints'} and a new run resumes from them"
            )
        return {"metrics": json.loads((tmp / "metrics.json").read_text())}

    config = cfg.train.model_dump(mode="json")
    return store.build("train", k, work, inputs=inputs, config=config, resume=True)


# torchrun and accelerate launch exit 1 whatever their processes exited with, so a process
# that runs out of memory also leaves this file (its error) beside the spec.
def oom_marker(spec_path: Path) -> Path:
    return spec_path.with_name("out_of_memory.txt")


def oom_message(t: TrainConfig, marker: Path) -> str:
    """Out of memory at these settings: the same settings run out again, so name the fix."""
    error = marker.read_text().strip() if marker.is_file() else ""
    fixes = []
    if t.batch_size > 1:  # half the micro-batch, twice the accumulation: the same step
        fixes.append(
            f"--set train.batch_size={t.batch_size // 2} --set train.grad_accum={t.grad_accum * 2}"
        )
    if t.cutoff_len > 2 * MIN_CONTENT_TOKENS:
        fixes.append(f"--set train.cutoff_len={t.cutoff_len // 2}")
    if not t.gradient_checkpointing:
        fixes.append("--set train.gradient_checkpointing=true")
    return (
        f"training ran out of memory at train.batch_size={t.batch_size}, "
        f"train.cutoff_len={t.cutoff_len}, "
        f"train.gradient_checkpointing={str(t.gradient_checkpointing).lower()}"
        + (f" ({error})" if error else "")
        + "; the same settings run out again, so it is not retried (fix: "
        + ", or ".join(fixes or ["a smaller model, or a GPU with more memory"])
        + ")"
    )


def train_job_exit(spec_path: str) -> int:
    """One training job (the child process); its exit status tells the parent what happened."""
    import torch

    from tasks.train.loop import Spec, train_job

    try:
        metrics = train_job(Spec.load(spec_path))
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        oom_marker(Path(spec_path)).write_text(error + "\n")
        print(f"out of memory: {error}", file=sys.stderr)
        return EXIT_OOM
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=2))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", help="run one training job from this spec (no store)")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    if args.spec:
        _die_with_parent()
        sys.exit(train_job_exit(args.spec))
    from tasks import base as base_stage
    from tasks import data as data_stage

    cfg = load_config(args.config, args.set, for_training=True)  # before base loads weights
    store = Store(cfg.pipeline.store)
    base = base_stage.run(cfg, store)
    data = data_stage.run(cfg, store, base_stage.model_dir(base))
    ref = run(cfg, store, data, base)
    print(ref.path)
