"""Training stage: base model + tokenized data → adapter (lora/qlora/ptuning) or weights (full).

    artifacts/train/<key>/
        adapter/ or model/     peft save_pretrained (adapter_config.json,
                               adapter_model.safetensors) or full safetensors weights;
                               the tokenizer and its chat template in the same folder
        hyperparameters.yaml   log_history.jsonl   loss.png   metrics.json

The stage runs as every heavy stage does (tasks/runner.py): `python -m tasks.train --spec
FILE` with a stage spec (the train section, the data and base refs, the store). `run`
validates the config (before any weights load), tokenizes (tasks/train/tokens.py), writes
a job spec into the store's partial folder and starts the job with the runner's `launch`:
`python -m tasks.train --spec <job spec>`, or the same module under `torchrun` /
`accelerate launch --config_file deploy/accelerate/<x>.yaml`, tied to this process and
killed at the stage's deadline. A job out of (GPU or CPU) memory exits with status 4 and
leaves the runner's marker file, since the launchers exit 1 whatever their processes did;
the stage raises `OutOfMemory`, which the pipeline does not retry. A killed job started
again resumes from its checkpoints in the partial folder (tasks/train/checkpoint.py).

`--spec` takes either spec: a stage spec ({"stage": "train", ...}, what `llmft run` keeps
in artifacts/runs/<run id>/specs/train.json) runs the stage; a job spec ({"train",
"model_dir", "tokens_dir", "output_dir"}) runs one training process, no store, no Prefect.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tasks.config import (
    REPO_ROOT,
    Config,
    ConfigError,
    TrainConfig,
    accelerate_config_path,
    train_problems,
)
from tasks.store import Ref, Store, make_key, write_json_atomic

# the model, the adapter, the launch and what the weights are saved as; key() adds the
# optional ones a setting switches on (bitsandbytes, deepspeed, liger-kernel)
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "safetensors")
MIN_CONTENT_TOKENS = 16  # room a cutoff_len must leave beyond the template's own tokens
# the config sections run() and key() read: what a stage spec carries (tasks/spec.py)
SECTIONS = ("train",)


# Settings that cannot change the trained weights: how often the run logs (log_history.jsonl
# and loss.png show it, the weights are the same), how often it checkpoints and how many
# checkpoints it keeps (only a resume reads them). Every other train setting, launch ones
# included (launcher, num_processes, nodes: the gradient is averaged over processes), enters
# the key. Where the nodes meet (node_rank, master_addr, master_port) does not: every node
# and every retry, on whichever hosts it lands, must find the same partial folder.
NOT_IN_KEY = {"logging_steps", "save_steps", "save_total_limit"}
NOT_IN_KEY |= {"node_rank", "master_addr", "master_port"}
# `then` is the next training stage's (tasks/chain.py): this stage trains the same without it
NOT_IN_KEY |= {"then"}


def key(cfg: Config, data: Ref, base: Ref) -> str:
    from tasks.train import budget
    from tasks.versions import file_hashes, launch_files, version

    # 'auto' epochs enter as the number that is trained (tasks/train/budget.py)
    t = budget.resolve(cfg.train, budget.train_records(data)).train
    # the launch files enter by contents (below), never by the name or path that finds them
    section = t.model_dump(mode="json", exclude=NOT_IN_KEY | {"accelerate_config"})
    launch = launch_files(t)
    libraries = list(LIBRARIES)
    if t.method == "qlora":
        libraries.append("bitsandbytes")
    if t.liger is not False:
        libraries.append("liger-kernel")
    if len(launch) > 1:  # the accelerate config names a DeepSpeed config
        libraries.append("deepspeed")
    inputs = {"data": data.key, "base": base.key, "launch_files": file_hashes(launch)}
    return make_key("train", version("tasks.train", libraries), section, inputs)


# ----------------------------------------------------------------------------- validation


def validate(cfg: Config, model_dir: Path) -> None:
    """Every problem of the train section at once, as a ConfigError naming each fix.

    The config's own checks run again here because a config can reach this stage without
    `load_config` (the gpu pool's flow gets a dict), and the machine checks are for the
    machine that trains. Then what needs the model's files: the tokenizer (for the
    template's length), config.json and the weights' names (read from the safetensors
    headers). Loads no weights.
    """
    from tasks import formatting
    from tasks.machine import machine_problems
    from tasks.train import methods
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
    from tasks.train import nodes  # several hosts: rank and rendezvous (tasks/train/nodes.py)

    t = cfg.train
    job = ["-m", "tasks.train", "--spec", str(spec_path)]
    if t.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *nodes.torchrun_args(t), *job]
    if t.launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if t.accelerate_config:
            cmd += ["--config_file", str(accelerate_config_path(t.accelerate_config))]
        return [*cmd, *nodes.accelerate_args(t), *job]
    return [sys.executable, *job]


def run(cfg: Config, store: Store, data: Ref, base: Ref) -> Ref:
    from tasks import base as base_stage
    from tasks import runner
    from tasks.train import budget, tokens

    chosen = budget.resolve(cfg.train, budget.train_records(data))
    print(chosen.line, flush=True)
    cfg = cfg.model_copy(update={"train": chosen.train})  # spec and manifest: the numbers
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
        cmd = launch_command(cfg, spec_path)
        marker = runner.oom_marker(spec_path)
        exited = runner.launch(cmd, name="training", cwd=REPO_ROOT, oom_marker=marker)
        if exited.out_of_memory:
            raise runner.OutOfMemory(oom_message(cfg.train, marker))
        if exited.status != 0:
            raise runner.StageFailed(
                f"training exited with status {exited.status} ({' '.join(cmd)}); its "
                f"checkpoints stay in {tmp / 'checkpoints'} and a new run resumes from them\n"
                + "\n".join(exited.tail)
            )
        metrics = json.loads((tmp / "metrics.json").read_text())
        return {"metrics": metrics, "budget": chosen.to_json()}

    config = cfg.train.model_dump(mode="json")
    return store.build("train", k, work, inputs=inputs, config=config, resume=True)


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
    elif not t.offload_checkpoints:
        fixes.append("--set train.offload_checkpoints=true")
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

    from tasks import runner
    from tasks.train.loop import Spec, train_job

    try:
        metrics = train_job(Spec.load(spec_path))
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # torchrun and accelerate exit 1 whatever this process does: the marker tells
        runner.oom_marker(Path(spec_path)).write_text(error + "\n")
        print(f"out of memory: {error}", file=sys.stderr)
        return runner.EXIT_OOM
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from tasks import runner

    args = runner.spec_parser("train", __doc__).parse_args(argv)
    if args.spec and _is_job_spec(Path(args.spec)):
        runner.die_with_parent()  # a job under a launcher: it goes when the launcher goes
        return train_job_exit(args.spec)
    return runner.stage_main("train", args.spec, args.out)


def _is_job_spec(path: Path) -> bool:
    """A job spec (tasks/train/loop.py `Spec`) rather than a stage spec (tasks/spec.py)."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # the stage's spec reader says what is wrong with it
        return False
    return isinstance(spec, dict) and "stage" not in spec and "output_dir" in spec
