"""GPU training speed: llmft's training stage against HF Trainer + peft, side by side.

    python bench/train_gpu.py [--models 1b,smollm2] [--steps 13] [--warmup 3] [--out DIR]

One run, one GPU, the same data, the same effective batch (batch_size 8 × grad_accum 4 =
32 records per optimizer step, the same records in the same steps), the same number of
optimizer steps, the same optimizer (AdamW, constant lr, clip 1.0):

- baseline: `transformers.Trainer` + peft LoRA (rank 8, alpha 16, all linear layers,
  dropout 0), bf16 autocast, SDPA attention, dynamic padding to the longest record of each
  micro-batch (DataCollatorForSeq2Seq), no packing. Full: the same Trainer without peft.
- llmft: `python -m tasks.train --spec FILE`, the training stage exactly as a GPU worker
  runs it, with the GPU recipe's switches (packing on, liger auto, lora dropout 0).

Models have random weights (speed does not depend on their values): the 1B-class Llama
config (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256,
tied head: 1.24 B parameters) and SmolLM2-135M's shape. Records are synthetic token ids
(prompt 20–300 tokens, response 10–700, cutoff 1024, unigram-skewed so the loss moves).

Columns: trained (non-pad) tokens per second over the timed steps (the first `--warmup`
steps are excluded; every step ends in a device sync: each logs its loss), MFU = tokens/s
× c·N / the bf16 matmul rate measured at the start of this run, with N the parameters
that take part in matmuls (every linear layer and the LM head) and c = 6 for full
fine-tuning (forward 2N, backward 4N) and 4 for LoRA/QLoRA (the frozen weights need no
weight gradient: forward 2N + input gradient 2N). Attention FLOPs are left out (~4% at
these lengths). Peak GPU memory is torch's max_memory_allocated over the whole run.
Loss: the step loss (token mean) of the first step (same weights, same records: shows
both compute the same function) and the mean of the last two steps.

Each row runs in its own process (no monkey-patching leaks between rows; peak memory per
row). Results: a table on stdout, JSON and logs under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = {
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        head_dim=64,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    # plumbing check on a CPU: `--models tiny --steps 4 --warmup 1`
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=32200,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    "smollm2": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        head_dim=64,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
}
BATCH, ACCUM, CUTOFF = 8, 4, 1024
LR = {"lora": 1e-3, "qlora": 1e-3, "full": 5e-5}
# --ladder: each lever added in turn (pack: padding-free rows + varlen flash attention;
# lora: fused LoRA linear; loss: loss fused with the head at labelled positions; liger:
# Liger RMSNorm/SwiGLU/RoPE and its fused linear cross-entropy; ckpt: checkpointing)
LADDER = [
    ("lora", "none"),
    ("lora", "pack"),
    ("lora", "pack,lora"),
    ("lora", "pack,lora,loss"),
    ("lora", "pack,lora,loss,liger"),
    ("full", "pack,loss,liger"),
    ("qlora", "pack,lora,loss,liger"),
]
SEED = 42


# ----------------------------------------------------------------------------- helpers


def matmul_params(cfg: dict) -> int:
    """N: weights that take part in a matmul per token (linear layers + the LM head)."""
    d, hd = cfg["hidden_size"], cfg["head_dim"]
    q = cfg["num_attention_heads"] * hd
    kv = cfg["num_key_value_heads"] * hd
    per_layer = 2 * d * q + 2 * d * kv + 3 * d * cfg["intermediate_size"]
    return cfg["num_hidden_layers"] * per_layer + cfg["vocab_size"] * d


def ceilings() -> dict[str, float]:
    """bf16 matmul TFLOP/s (8192³, random data) and device copy GB/s (read + write)."""
    import torch

    if not torch.cuda.is_available():
        return {"matmul_tflops": float("nan"), "copy_gbs": float("nan")}
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(s.elapsed_time(e) / 1e3)
    tflops = 2 * n**3 / statistics.median(times) / 1e12
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    times = []
    for i in range(15):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(s.elapsed_time(e) / 1e3)
    gbs = 2 * x.numel() / statistics.median(times) / 1e9
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"matmul_tflops": round(tflops, 1), "copy_gbs": round(gbs, 1)}


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """Prompt 20–300 tokens, response 10–700 (≤ 1000 < cutoff 1024), Zipf-skewed ids."""
    rng = random.Random(seed)
    ids = range(100, 32100)
    cum = list(itertools.accumulate(1.0 / (i + 20) for i in range(len(ids))))
    out = []
    for _ in range(n):
        p, r = rng.randint(20, 300), rng.randint(10, 700)
        toks = rng.choices(ids, cum_weights=cum, k=p + r)[:CUTOFF]
        out.append({"input_ids": toks, "labels": [-100] * p + toks[p:]})
    return out


def write_tokens(records: list[dict], folder: Path) -> None:
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    ints = pa.list_(pa.int32())
    for split, rows in (("train", records), ("dev", [])):
        table = pa.table(
            {k: pa.array([r[k] for r in rows], type=ints) for k in ("input_ids", "labels")}
        )
        path = str(folder / f"{split}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def make_model(name: str, folder: Path, tokenizer_dir: Path) -> None:
    """Random-weight Llama of the named shape, saved in bf16 with a tokenizer beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(**MODELS[name], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    del model
    torch.cuda.empty_cache()


def step_order(n: int) -> list[int]:
    """The training stage's record order, so both runs see the same records per step."""
    from tasks.train.loop import epoch_order

    return list(epoch_order(n, 0, SEED, BATCH * ACCUM))


# ----------------------------------------------------------------------------- baseline


def run_baseline(args: argparse.Namespace) -> dict:
    """One Trainer + peft row, in this (child) process; returns its measurements."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from tasks.train.tokens import read_table

    rows = read_table(Path(args.tokens), "train").to_pylist()
    order = step_order(len(rows))
    data = [rows[i] | {"attention_mask": [1] * len(rows[i]["input_ids"])} for i in order]
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "right"

    method = args.method
    kwargs = {"attn_implementation": "sdpa"}
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, **kwargs)
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        torch.manual_seed(SEED)  # A's random init, as the training stage seeds before its own
        model = get_peft_model(model, lora)
    model.config.use_cache = False

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, *a, **k):  # noqa: ANN002
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_log(self, *a, logs=None, **k):  # noqa: ANN002
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):  # noqa: ANN002
            return SequentialSampler(self.train_dataset)

    targs = TrainingArguments(
        output_dir=str(Path(args.work) / "trainer"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=args.steps,
        learning_rate=LR[method],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=SEED,
        dataloader_drop_last=False,
    )
    timer = Timer()
    trainer = InOrder(
        model=model,
        args=targs,
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100),
        callbacks=[timer],
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    per_step = [
        sum(len(r["input_ids"]) for r in data[s * BATCH * ACCUM : (s + 1) * BATCH * ACCUM])
        for s in range(args.steps)
    ]
    w = args.warmup
    seconds = timer.ends[-1] - timer.ends[w - 1]
    return {
        "tokens_per_second": sum(per_step[w:]) / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "losses": timer.losses,
        "timed_seconds": seconds,
        "timed_tokens": sum(per_step[w:]),
    }


# ----------------------------------------------------------------------------- levers


def run_levers(args: argparse.Namespace) -> dict:
    """The fast path's pieces in a plain loop, each lever a flag (`--levers pack,lora,...`).

    Not how users run llmft (that is `run_llmft`): this isolates what each lever buys,
    on the model the training stage builds (`tasks.train.methods.load`), the same records per
    step, AdamW (fused), constant lr, clip 1.0, bf16 autocast.
    """
    import torch

    from tasks.train import fastpath, methods
    from tasks.config import TrainConfig
    from tasks.train.tokens import read_table

    levers = set(filter(None, args.levers.split(",")))
    method = args.method
    cfg = TrainConfig(
        method=method, cutoff_len=CUTOFF, packing="pack" in levers, batch_size=BATCH,
        grad_accum=ACCUM, gradient_checkpointing="ckpt" in levers, learning_rate=LR[method],
    )  # fmt: skip
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: plumbing check only
    torch.manual_seed(SEED)
    model = methods.load(cfg, Path(args.model_dir), torch.bfloat16, torch.device(dev))
    model.to(dev)
    liger = "liger" in levers and fastpath.liger_available()
    plan = fastpath.Plan(
        device=dev, batches=True, packing="pack" in levers, rows=None,
        attention=fastpath.ATTN_NAME if "pack" in levers else "unchanged",
        fused_lora="lora" in levers, fused_loss=("liger" if liger else "chunked")
        if "loss" in levers else "off", liger=liger, fused_adamw=dev == "cuda",
        compile=False, gradient_checkpointing="ckpt" in levers, token_budget=BATCH * CUTOFF,
    )  # fmt: skip
    if "budget" in levers:  # micro-batches sized to GPU memory, as the training stage does
        plan.token_budget = fastpath.token_budget(model, cfg, torch.device(dev))
    if plan.liger:
        fastpath.apply_liger(model)
    if plan.attention == fastpath.ATTN_NAME:
        fastpath.set_attention(model, fastpath.ATTN_NAME)
    if plan.fused_lora:
        fastpath.fuse_lora(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR[method], weight_decay=0.0, fused=plan.fused_adamw)
    rows = read_table(Path(args.tokens), "train").to_pylist()
    order = step_order(len(rows))
    per_step = BATCH * ACCUM
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ends, losses, tokens = [], [], []
    model.train()
    prof = None
    for step in range(args.steps):
        if args.profile and step == args.steps - 1:  # the last step, after the timed ones
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.__enter__()
        records = [rows[i] for i in order[step * per_step : (step + 1) * per_step]]
        micro = fastpath.micro_batches(records, plan, BATCH, 2, dev)
        n = sum(b["num_targets"] for b in micro)
        total = torch.zeros((), device=dev)
        for b in micro:
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = fastpath.loss_sum(model, b, plan) / n
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total))  # one sync per step, as the training stage logs
        ends.append(time.perf_counter())
        tokens.append(sum(len(r["input_ids"]) for r in records))
    extra = {}
    if prof is not None:
        prof.__exit__(None, None, None)
        ends.pop(), tokens.pop(), losses.pop()  # the profiled step is not timed
        step_seconds = (ends[-1] - ends[args.warmup - 1]) / (len(ends) - args.warmup)
        extra = kernel_summary(prof, step_seconds, Path(args.work))
    w = args.warmup
    seconds = ends[-1] - ends[w - 1]
    return extra | {
        "tokens_per_second": sum(tokens[w:]) / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0,
        "losses": losses,
        "timed_seconds": seconds,
        "timed_tokens": sum(tokens[w:]),
        "micro_batches_per_step": len(micro),
        "fastpath": plan.describe(),
    }


def kernel_summary(prof, step_seconds: float, work: Path | None = None) -> dict:
    """GPU kernel time of one step against an unprofiled step's wall time, top kernels,
    and the host's busiest ops (full tables in `work/profile.txt`)."""
    averages = prof.key_averages()
    events = [e for e in averages if e.device_type.name == "CUDA"]
    busy = sum(e.self_device_time_total for e in events) / 1e6
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:40]
    cpu = [e for e in averages if e.device_type.name == "CPU"]
    ops = sum(e.count for e in cpu if e.key.startswith("aten::"))
    if work is not None:
        text = averages.table(
            sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=90
        )
        text += "\n\n" + averages.table(sort_by="self_cpu_time_total", row_limit=40,
                                          max_name_column_width=90)  # fmt: skip
        (work / "profile.txt").write_text(text)
    return {
        "step_seconds": step_seconds,
        "gpu_kernel_seconds": busy,
        "gpu_busy_fraction": busy / step_seconds,
        "aten_ops_per_step": ops,
        "kernel_launches_per_step": sum(e.count for e in events),
        "top_kernels": [
            (e.key[:110], round(e.self_device_time_total / 1e3, 2), e.count) for e in top
        ],
        "top_host_ops": [
            (e.key[:70], round(e.self_cpu_time_total / 1e3, 2), e.count)
            for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:15]
        ],
    }


# ----------------------------------------------------------------------------- llmft


def run_llmft(model_dir: Path, tokens: Path, method: str, work: Path, args, **extra) -> dict:
    """`python -m tasks.train --spec FILE` with the GPU recipe's switches; parse its logs."""
    from tasks.config import TrainConfig

    train = TrainConfig(
        method=method, cutoff_len=CUTOFF, packing=True, liger="auto",
        batch_size=BATCH, grad_accum=ACCUM, max_steps=args.steps, learning_rate=LR[method],
        scheduler="constant", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_steps=10_000, precision="auto", device="auto", seed=SEED,
        **extra,
    )  # fmt: skip
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {
        "train": train.model_dump(mode="json"),
        "model_dir": str(model_dir),
        "tokens_dir": str(tokens),
        "output_dir": str(out),
        "keys": {},
    }
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log = work / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "tasks.train", "--spec", str(spec_path)],
            cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=args.row_timeout,
        )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"tasks.train exited {proc.returncode}: {log.read_text()[-3000:]}")
    run = read_run(out, args.warmup)
    return {
        "tokens_per_second": run["tokens_per_second"],
        "peak_gib": run["metrics"]["peak_gpu_memory_gib"] or 0.0,
        "losses": run["losses"],
        "timed_seconds": run["timed_seconds"],
        "timed_tokens": run["timed_tokens"],
        "fastpath": run["metrics"].get("fast_path"),
    }


def read_run(out: Path, warmup: int) -> dict:
    """What a training job wrote (logging_steps=1): its step losses, its metrics, and its
    trained tokens per second over the steps after the first `warmup`."""
    history = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    steps = [h for h in history if "loss" in h]
    # each entry is one step: its tokens so far and its own tokens/s
    before = [0] + [h["tokens"] for h in steps[:-1]]
    timed = [
        (h["tokens"] - prev, h["tokens_per_second"])
        for h, prev in zip(steps, before, strict=True)
        if h["step"] > warmup
    ]
    tokens = sum(t for t, _ in timed)
    seconds = sum(t / tps for t, tps in timed)
    return {
        "tokens_per_second": tokens / seconds,
        "timed_seconds": seconds,
        "timed_tokens": tokens,
        "losses": [h["loss"] for h in steps],
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


# ----------------------------------------------------------------------------- driver


def child(args: argparse.Namespace) -> None:
    result = run_levers(args) if args.levers is not None else run_baseline(args)
    Path(args.result).write_text(json.dumps(result))


def run_row(kind: str, model: str, method: str, paths: dict, args, **extra) -> dict:
    work = Path(args.work) / "rows" / f"{kind}-{model}-{method}{extra.pop('tag', '')}"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        if kind in ("baseline", "levers"):
            result_file = work / "result.json"
            cmd = [
                sys.executable, __file__, "--child", "--method", method,
                "--model-dir", str(paths["model"]), "--tokens", str(paths["tokens"]),
                "--work", str(work), "--result", str(result_file),
                "--steps", str(args.steps), "--warmup", str(args.warmup),
            ]  # fmt: skip
            if kind == "levers":
                cmd += ["--levers", extra["levers"]] + (
                    ["--profile"] if extra.get("profile") else []
                )
            with open(work / "child.log", "w") as f:
                proc = subprocess.run(
                    cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=args.row_timeout
                )
            if proc.returncode != 0:
                tail = (work / "child.log").read_text()[-3000:]
                raise RuntimeError(f"{kind} exited {proc.returncode}: {tail}")
            result = json.loads(result_file.read_text())
        else:
            result = run_llmft(paths["model"], paths["tokens"], method, work, args, **extra)
        result["error"] = None
    except Exception as exc:  # a failed row is reported, the others still run
        result = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
    result["wall_seconds"] = round(time.time() - started, 1)
    print(f"[{kind} {model} {method}] {json.dumps(result)[:600]}", flush=True)
    return result


def table(rows: list[dict], ceiling: dict) -> str:
    head = (
        f"{'model':<9} {'impl':<8} {'method':<28} {'tok/s':>8} {'vs base':>7} {'MFU':>6} "
        f"{'peak GiB':>8} {'loss@1':>7} {'loss@end':>8}"
    )
    lines = [head, "-" * len(head)]
    base = {(r["model"], r["method"]): r for r in rows if r["impl"] == "baseline"}
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['model']:<9} {r['impl']:<8} {r['label']:<28} ERROR {r['error'][:60]}")
            continue
        tps = r["tokens_per_second"]
        c = 6 if r["method"] == "full" else 4
        mfu = tps * c * r["N"] / (ceiling["matmul_tflops"] * 1e12)
        b = base.get((r["model"], r["method"]))
        ratio = f"{tps / b['tokens_per_second']:.2f}x" if b and not b.get("error") else "-"
        losses = r["losses"]
        end = sum(losses[-2:]) / len(losses[-2:])
        lines.append(
            f"{r['model']:<9} {r['impl']:<8} {r['label']:<28} {tps:>8.0f} {ratio:>7} "
            f"{100 * mfu:>5.1f}% {r['peak_gib']:>8.2f} {losses[0]:>7.4f} {end:>8.4f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="1b,smollm2")
    p.add_argument("--methods", default="lora,qlora,full")
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/llmft-bench"))
    p.add_argument("--work", default="/tmp/llmft-bench-work")
    p.add_argument("--tokenizer", default=str(REPO / ".bench" / "tok"))
    p.add_argument("--row-timeout", type=int, default=150)
    p.add_argument("--noise", action="store_true", help="also run llmft lora with seed+1")
    p.add_argument(
        "--ladder",
        action="store_true",
        help="instead of the stage rows: each lever added in turn in a plain loop",
    )
    p.add_argument("--levers", help=argparse.SUPPRESS)  # child mode: the lever set
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one step of the fast path on LoRA (GPU busy fraction, top kernels)",
    )
    p.add_argument("--profile-only", action="store_true", help="only the profiled rows")
    # child mode (one baseline row)
    p.add_argument("--child", action="store_true")
    p.add_argument("--method")
    p.add_argument("--model-dir")
    p.add_argument("--tokens")
    p.add_argument("--result")
    args = p.parse_args()
    if args.child:
        return child(args)
    args.profile = args.profile or args.profile_only

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    ceiling = ceilings()
    print(f"ceilings: {ceiling}", flush=True)
    records = synthetic_records(args.steps * BATCH * ACCUM)
    write_tokens(records, work / "tokens")
    lengths = [len(r["input_ids"]) for r in records]
    print(f"records: {len(records)}, tokens {sum(lengths)}, mean {statistics.mean(lengths):.0f}")

    rows = []
    methods = args.methods.split(",")
    for model in args.models.split(","):
        paths = {"model": work / f"model-{model}", "tokens": work / "tokens"}
        make_model(model, paths["model"], Path(args.tokenizer))
        n = matmul_params(MODELS[model])
        plan = [("baseline", m, m, {}) for m in methods if m != "qlora"]
        if args.ladder:
            plan += [("levers", m, f"{m} {lv}", {"levers": lv}) for m, lv in LADDER
                     if m in methods]  # fmt: skip
        else:
            plan += [("llmft", m, m, {}) for m in methods]
        if "qlora" in methods and not args.ladder and model == "1b":  # the memory target's row
            plan.append(("llmft", "qlora", "qlora+ckpt", {"gradient_checkpointing": True}))
        if args.noise:
            plan.append(("llmft", "lora", "lora seed+1", {"seed": SEED + 1}))
        for impl, method, label, extra in [] if args.profile_only else plan:
            extra = dict(extra)
            if label != method:
                extra["tag"] = "-" + label.replace("+", "_").replace(" ", "_").replace(",", "_")
            r = run_row(impl, model, method, paths, args, **extra)
            rows.append(r | {"impl": impl, "model": model, "method": method, "label": label,
                             "N": n})  # fmt: skip
            (out / "results.json").write_text(json.dumps({"ceiling": ceiling, "rows": rows}))
    if args.profile:  # last: the table does not need it
        lv = "pack,lora,loss,liger,budget"
        for model in args.models.split(","):
            paths = {"model": work / f"model-{model}", "tokens": work / "tokens"}
            make_model(model, paths["model"], Path(args.tokenizer))
            r = run_row("levers", model, "lora", paths, args, levers=lv, profile=1,
                        tag="-profiled")  # fmt: skip
            rows.append(r | {"impl": "levers", "model": model, "method": "lora",
                             "label": "lora (profiled)", "N": matmul_params(MODELS[model])})  # fmt: skip
            (out / "results.json").write_text(json.dumps({"ceiling": ceiling, "rows": rows}))
            table_file = work / "rows" / f"levers-{model}-lora-profiled" / "profile.txt"
            if table_file.exists():
                shutil.copy(table_file, out / f"profile-{model}.txt")
            if not r.get("error"):
                print("profile:", json.dumps({k: v for k, v in r.items() if k != "losses"}),
                      flush=True)  # fmt: skip
    text = table(rows, ceiling)
    (out / "table.txt").write_text(text + "\n")
    print(
        f"\nbf16 matmul ceiling {ceiling['matmul_tflops']} TFLOP/s, copy {ceiling['copy_gbs']} GB/s"
    )
    print("N (matmul params): " + ", ".join(f"{m} {matmul_params(MODELS[m]) / 1e9:.3f} B"
                                           for m in args.models.split(",")))  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
