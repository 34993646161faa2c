"""Training checkpoints: written atomically every save_steps, the last K kept, resumed from.

    <output>/checkpoints/step-000040/
        trainable.safetensors   the trained parameters only (LoRA r 8 on a 7B model: about
                                80 MB in fp32, not the 14 GB of frozen weights)
        optimizer.pt            AdamW moments and step counts
        scheduler.pt            learning-rate schedule position
        scaler.pt               fp16 loss scale (fp16 only)
        rng-<rank>.pt           python, numpy, torch and CUDA generators of each process
        state.json              step, tokens, step/eval/save seconds, log history, dev loss before
    (DeepSpeed: accelerate's save_state folder instead of the first four files, since
    ZeRO partitions the optimizer over the processes.)

Every process writes into `.tmp-step-N`; after a barrier the main process renames it to
`step-N`. A folder named `step-N` is therefore complete: a job killed while writing leaves
only a `.tmp-…` folder, which the next save or resume ignores. The data position needs no
file of its own: the order is a function of the seed and the step (tasks/train/batches.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from tasks.store import write_json_atomic

FOLDER = "checkpoints"


def _folder(output_dir: Path, step: int) -> Path:
    return output_dir / FOLDER / f"step-{step:06d}"


def complete(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = output_dir / FOLDER
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable(model: Any) -> dict[str, Any]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save(job: Any) -> Path:
    import torch
    from safetensors.torch import save_file

    acc, out = job.accelerator, job.spec.output_dir
    step = job.state["step"]
    final = _folder(out, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
    if job.info["deepspeed"]:
        acc.save_state(str(tmp))  # every process writes its ZeRO partition
    if acc.is_main_process:
        if not job.info["deepspeed"]:
            save_file(_trainable(acc.unwrap_model(job.model)), tmp / "trainable.safetensors")
            torch.save(job.optimizer.state_dict(), tmp / "optimizer.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        torch.save(job.scheduler.state_dict(), tmp / "scheduler.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json_atomic(tmp / "state.json", job.state)
        os.replace(tmp, final)
        for old in complete(out)[: -job.cfg.save_total_limit]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def fresh_state() -> dict[str, Any]:
    return {
        "step": 0,
        "tokens": 0,
        # where the training time went (tasks/train/steps.py `Clock`)
        "step_seconds": 0.0,
        "eval_seconds": 0.0,
        "save_seconds": 0.0,
        "train_wall_seconds": 0.0,
        "dev_loss_before": None,
        "log_history": [],
        "resumed_from_step": None,
    }


def resume(job: Any) -> dict[str, Any]:
    """Load the newest complete checkpoint into the job (or start fresh); its state."""
    import torch
    from safetensors.torch import load_file

    found = complete(job.spec.output_dir)
    if not found:
        return fresh_state()
    folder, acc = found[-1], job.accelerator
    state = fresh_state() | json.loads((folder / "state.json").read_text())
    if job.info["deepspeed"]:
        acc.load_state(str(folder))
    else:
        weights = load_file(folder / "trainable.safetensors")
        unwrapped = acc.unwrap_model(job.model)
        missing = set(_trainable(unwrapped)) - set(weights)
        if missing:
            raise RuntimeError(f"{folder}: checkpoint lacks {sorted(missing)[:3]}…; delete it")
        unwrapped.load_state_dict(weights, strict=False)
        job.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        if acc.scaler is not None and (folder / "scaler.pt").is_file():
            acc.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    job.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = folder / f"rng-{acc.process_index}.pt"
    if rng.is_file():  # absent when the number of processes grew: keep the seeded state
        _set_rng_state(torch.load(rng, weights_only=False))
    state["resumed_from_step"] = state["step"]
    if acc.is_main_process:
        print(f"resumed from {folder} (step {state['step']})", flush=True)
    return state


def remove_all(output_dir: Path) -> None:
    shutil.rmtree(output_dir / FOLDER, ignore_errors=True)
