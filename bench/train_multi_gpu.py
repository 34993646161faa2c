"""Several GPUs through the training stage: DDP and DeepSpeed ZeRO-2/3, side by side.

    python bench/train_multi_gpu.py [--gpus 2] [--steps 6] [--warmup 2] [--out DIR]

Every row is `python -m tasks.train --spec FILE` started the way the training stage starts
it (`tasks.train.launch_command`: plain python for one GPU, `accelerate launch` with a
config from deploy/accelerate/ for several), on the 1B-class Llama config of
bench/train_gpu.py with random weights and the same synthetic records (prompt 20–300
tokens, response 10–700, cutoff 1024). Each process takes batch_size 8 × grad_accum 4
records per optimizer step, so N GPUs train N× the records of one GPU per step.

Columns: trained (non-pad) tokens/s summed over all processes (the first `--warmup`
steps excluded), scaling against the one-GPU row of the same method, peak GPU memory of
rank 0 (torch's max_memory_allocated; the ranks hold equal shares), the loss of the first
and last steps, and a check of what the job saved: the tensor names and shapes of the
adapter (LoRA) against the one-GPU adapter, or of the full weights against the base
model's, the files the merge and export stages read. A ZeRO-3 save that forgot to gather
its shards shows up there as empty tensors.

Rows run in order and each in its own process tree; a failed row is reported and the
others still run. results.json under --out is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from train_gpu import (  # noqa: E402
    ACCUM,
    BATCH,
    CUTOFF,
    LR,
    MODELS,
    SEED,
    ceilings,
    make_model,
    matmul_params,
    read_run,
    synthetic_records,
    write_tokens,
)

# (label, method, accelerate config or None for one plain process, processes: 1 or N)
ROWS = [
    ("lora 1 GPU", "lora", None, 1),
    ("lora DDP", "lora", "ddp", "N"),
    ("full ZeRO-2", "full", "zero2", "N"),
    ("full ZeRO-3", "full", "zero3", "N"),
    ("full ZeRO-3 offload", "full", "zero3_offload", "N"),
    ("full ZeRO-2 offload", "full", "zero2_offload", "N"),
    ("lora ZeRO-2", "lora", "zero2", "N"),
    ("full 1 GPU", "full", None, 1),
]


def launch(label: str, method: str, config: str | None, procs: int, paths: dict, args) -> dict:
    from tasks.config import TrainConfig
    from tasks.train import launch_command

    train = TrainConfig(
        method=method, cutoff_len=CUTOFF, packing=True, liger="auto",
        batch_size=BATCH, grad_accum=ACCUM, max_steps=args.steps, learning_rate=LR[method],
        scheduler="constant", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_steps=10_000, precision="auto", device="auto", seed=SEED,
        launcher="accelerate" if config else "python", accelerate_config=config,
        num_processes=procs,
    )  # fmt: skip
    work = Path(args.work) / "rows" / label.replace(" ", "-")
    out = work / "out"
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True)
    spec = work / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "train": train.model_dump(mode="json"),
                "model_dir": str(paths["model"]),
                "tokens_dir": str(paths["tokens"]),
                "output_dir": str(out),
                "keys": {},
            }
        )
    )
    cmd = launch_command(SimpleNamespace(train=train), spec)
    path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    log = work / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
            timeout=args.row_timeout, start_new_session=True,
        )  # fmt: skip
    shutil.copy(log, Path(args.out) / f"{work.name}.log")
    if proc.returncode != 0:
        text = log.read_text()
        errors = [x for x in text.splitlines() if re.search(r"^(\[rank\d+\]: )?\w*Error\b", x)]
        raise RuntimeError(f"exit {proc.returncode}: {errors[-1] if errors else text[-2500:]}")
    run = read_run(out, args.warmup)
    metrics = run["metrics"]
    return {
        "tokens_per_second": run["tokens_per_second"],
        "peak_gib": metrics["peak_gpu_memory_gib"] or 0.0,
        "losses": run["losses"],
        "processes": metrics["processes"],
        "deepspeed": metrics["deepspeed"],
        "wall_seconds_job": metrics["wall_seconds"],
        "saved": out,
    }


def tensor_shapes(folder: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            shapes |= {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}  # noqa: SIM118
    return shapes


def check_saved(method: str, out: Path, reference: dict[str, tuple] | None) -> str:
    """'ok' when the saved files match the reference's tensor names and shapes."""
    folder = out / ("adapter" if method == "lora" else "model")
    if not folder.is_dir():
        return f"no {folder.name}/"
    shapes = tensor_shapes(folder)
    if not shapes:
        return "no tensors"
    if empty := [k for k, s in shapes.items() if 0 in s or s == ()]:
        return f"{len(empty)} empty tensors, e.g. {empty[0]}"
    if reference is None:
        return f"ok ({len(shapes)} tensors, no reference)"
    if shapes != reference:
        diff = sorted(set(shapes.items()) ^ set(reference.items()))[:2]
        return f"differs from reference: {diff}"
    return f"ok ({len(shapes)} tensors match)"


def table(rows: list[dict], n: int, ceiling: float) -> str:
    head = (
        f"{'setup':<22} {'GPUs':>4} {'tok/s':>8} {'scaling':>7} {'MFU/GPU':>7} "
        f"{'peak GiB':>8} {'loss@1':>7} {'loss@end':>8}  saved"
    )
    lines = [head, "-" * len(head)]
    single = {r["method"]: r for r in rows if r.get("processes") == 1 and not r.get("error")}
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['label']:<22} ERROR {r['error'][:200]!r}")
            continue
        tps, gpus = r["tokens_per_second"], r["processes"]
        one = single.get(r["method"])
        scaling = f"{tps / one['tokens_per_second']:.2f}x" if one and gpus > 1 else "-"
        c = 6 if r["method"] == "full" else 4
        mfu = tps / gpus * c * n / (ceiling * 1e12)
        end = sum(r["losses"][-2:]) / len(r["losses"][-2:])
        lines.append(
            f"{r['label']:<22} {gpus:>4} {tps:>8.0f} {scaling:>7} {100 * mfu:>6.1f}% "
            f"{r['peak_gib']:>8.2f} {r['losses'][0]:>7.4f} {end:>8.4f}  {r['check']}"
        )
    return "\n".join(lines)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--model", default="1b", choices=sorted(MODELS))
    p.add_argument("--rows", help="comma-separated row labels to run (default: all)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/llmft-multi"))
    p.add_argument("--work", default="/tmp/llmft-multi-work")
    p.add_argument("--tokenizer", default=str(REPO / ".bench" / "tok"))
    p.add_argument("--row-timeout", type=int, default=180)
    p.add_argument("--deadline", type=float, default=0, help="seconds: start no row after it")
    args = p.parse_args()
    started = time.time()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    ceiling = ceilings()["matmul_tflops"] if torch.cuda.is_available() else float("nan")
    print(f"GPUs: {args.gpus}, bf16 matmul ceiling {ceiling} TFLOP/s", flush=True)
    records = synthetic_records(args.steps * BATCH * ACCUM * max(args.gpus, 1))
    write_tokens(records, work / "tokens")
    paths = {"model": work / f"model-{args.model}", "tokens": work / "tokens"}
    make_model(args.model, paths["model"], Path(args.tokenizer))
    base_shapes = tensor_shapes(paths["model"])
    n = matmul_params(MODELS[args.model])
    wanted = set(args.rows.split(",")) if args.rows else None

    rows, adapter_shapes = [], None
    for label, method, config, procs in ROWS:
        if wanted is not None and label not in wanted:
            continue
        if args.deadline and time.time() - started > args.deadline:
            print(f"[{label}] not started: past --deadline", flush=True)
            continue
        procs = args.gpus if procs == "N" else procs
        t0 = time.time()
        try:
            r = launch(label, method, config, procs, paths, args)
            reference = adapter_shapes if method == "lora" else base_shapes
            if method == "lora" and adapter_shapes is None:
                adapter_shapes = tensor_shapes(r["saved"] / "adapter")
            r["check"] = check_saved(method, r.pop("saved"), reference)
        except Exception as exc:  # reported in the table; the next row still runs
            r = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
        r |= {"label": label, "method": method, "config": config, "row_seconds": time.time() - t0}
        print(f"[{label}] {json.dumps(r)[:800]}", flush=True)
        rows.append(r)
        (out / "results.json").write_text(json.dumps({"ceiling": ceiling, "rows": rows}))
    text = table(rows, n, ceiling)
    (out / "table.txt").write_text(text + "\n")
    print(f"\nN (matmul params) {n / 1e9:.3f} B; MFU/GPU = tok/s / GPUs × c·N / ceiling")
    print(text)


if __name__ == "__main__":
    main()
