"""GPU training speed: llmft's training stage against its peers, each timed from outside.

    python bench/train_gpu.py [--rows 1b:lora:3:60:15,8b:lora:2:14:5,...] [--impls llmft,trl,...]
                              [--short 3] [--long 35] [--repeat 2] [--out DIR]

Every implementation of every row runs as two whole processes on the same records, one
of `--short` and one of `--long` optimizer steps, and the bench reads each process's
wall clock from outside, start to exit:

    tokens/s = (tokens_long − tokens_short) / (wall_long − wall_short)

so interpreter start, imports, loading, quantization, warm-up, compilation and saving
cancel out and what is left is the steady step rate, however the tool times itself.
A process's start varies by a second or two from one run to the next (measured: the same
1B job's short and long processes 1.9 s apart where its steps took 3.4 s), so the long
process must run many seconds more than the short one, and `--repeat` pairs are taken
and their median reported, with the spread in results.json (`rates`).
A row's third number (`1b:lora:3:60:15`) gives the peers a shorter long process than
llmft's, so that each side's two processes are a similar number of seconds apart; the
steps are the same records for every tool, and the table prints each side's step counts.
That figure is the table's `tok/s`, and its ratios and MFU use it. Beside it, `own` is the
tool's own in-process figure from the long run (trained tokens over the steps after
`--warmup`, every step closed by a device sync): the two should agree; where they do not,
the process spends time between steps that its own timer does not see.

Rows (model × method), on one GPU, the same data and the same effective batch (32
records per optimizer step, the same records in the same steps), AdamW (fused), constant
lr, clip 1.0, bf16; LoRA rank 8, alpha 16, dropout 0 on every linear layer; QLoRA: NF4 +
double quantization with gradient checkpointing on for every tool, LoRA and full with it
off for every tool. Implementations:

- llmft: `python -m tasks.train --spec FILE`, the training stage exactly as a GPU worker
  runs it (packing on, liger auto);
- llmft+compile, llmft-offload, llmft+half-mb, llmft+mem80: the same with one switch changed
  (LLMFT_VARIANTS), to measure what a lever buys; compared with the peers, not with llmft;
- baseline, trl, unsloth: bench/peers.py (what each runs is written there and in the
  JSON results: versions and settings).

Models have random weights (speed does not depend on their values): the 1B-class Llama
config (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256,
tied head), Llama-3-8B's shape (hidden 4096, 32 layers, 32/8 heads, intermediate 14336,
vocab 128256, untied head) and SmolLM2-135M's shape. Records are synthetic token ids
(prompt 20–300 tokens, response 10–700, cutoff 1024, unigram-skewed so the loss moves).

MFU = tok/s × c·N / the bf16 matmul rate measured at the start of this run, with N the
weights that take part in matmuls (every linear layer and the LM head), c = 6 for full
fine-tuning (forward 2N, backward 4N) and 4 for LoRA/QLoRA (frozen weights need no weight
gradient). Attention FLOPs are left out (~3% at these lengths); checkpointing's extra
forward is not counted (it is work a QLoRA row chooses to redo). Peak GPU memory is
torch's max_memory_allocated in the long run. loss@1 is the first step's loss (same
weights, same records: shows every tool computes the same function); loss@k the loss
after step k, the last step every tool of the row ran.

Results: the table on stdout and in `--out`/table.txt; every process's numbers and log
under `--work`, results.json in both (rewritten after each process, so a run cut short
keeps what it measured; `--resume` skips what results.json already holds).
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
from bench.train_table import table  # noqa: E402

_LLAMA = dict(rms_norm_eps=1e-5, head_dim=64, max_position_embeddings=8192)
MODELS = {
    "1b": _LLAMA | dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "8b": _LLAMA | dict(
        hidden_size=4096, head_dim=128, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "smollm2": _LLAMA | dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    # plumbing check on a CPU: `--rows tiny:lora --short 1 --long 3 --warmup 1`
    "tiny": _LLAMA | dict(
        hidden_size=64, head_dim=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, vocab_size=32200, rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
}  # fmt: skip
BATCH, ACCUM, CUTOFF = 8, 4, 1024
LR = {"lora": 1e-3, "qlora": 1e-3, "full": 5e-5}
SEED = 42
RECORD_STEPS = 64  # the records of 64 steps; no run takes more
ROWS = "1b:lora,8b:lora,1b:qlora,8b:qlora,1b:full,smollm2:lora"
IMPLS = "llmft,unsloth,trl,baseline"
# llmft with one lever flipped from what the row's recipe sets: `--impls llmft,llmft+compile`
LLMFT_VARIANTS = {
    "llmft": {},
    "llmft+compile": {"compile": True},
    "llmft-offload": {"offload_checkpoints": False},
    # the same 32 records a step in micro-batches of half the tokens: memory before speed
    "llmft+half-mb": {"batch_size": BATCH // 2, "grad_accum": ACCUM * 2},
    # micro-batches sized to 80% of the GPU instead of 60%: the 8B step in one
    "llmft+mem80": {"gpu_memory_share": 0.8},
}
# peers looked at and not run, with the reason (a row each in the table)
NOT_RUN = {
    "axolotl": "not run: axolotl 0.19.0 pins transformers==5.16.1, peft==0.20.0, trl==1.9.0, "
    "liger-kernel==0.8.1 (image: transformers 5.17) and needs xformers, kernels, gradio, "
    "lm_eval and ~45 more; it trains through TRL's SFTTrainer + Liger (the trl row)",
    "llamafactory": "not run: LLaMA-Factory 0.9.5 requires transformers<=5.6.0, "
    "peft<=0.18.1, trl<=0.24.0, datasets<=4.0.0, accelerate<=1.11.0 (image: transformers "
    "5.17); its LoRA path is HF Trainer + peft (the baseline row)",
}


# ----------------------------------------------------------------------------- inputs


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

    def median_seconds(fn, repeat: int, warm: int) -> float:
        times = []
        for i in range(repeat):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            if i >= warm:
                times.append(s.elapsed_time(e) / 1e3)
        return statistics.median(times)

    def rates() -> tuple[float, float]:
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        tflops = 2 * n**3 / median_seconds(lambda: a @ b, 25, 5) / 1e12
        x = torch.randint(0, 255, (2**30,), dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        return tflops, 2 * x.numel() / median_seconds(lambda: y.copy_(x), 15, 5) / 1e9

    tflops, gbs = rates()
    torch.cuda.empty_cache()  # the inputs are gone with rates()
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
        data = pa.table(
            {k: pa.array([r[k] for r in rows], type=ints) for k in ("input_ids", "labels")}
        )
        path = str(folder / f"{split}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, data.schema) as writer:
            writer.write_table(data)


def make_model(name: str, folder: Path, tokenizer_dir: Path) -> None:
    """Random-weight Llama of the named shape, saved in bf16 with a tokenizer beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(**MODELS[name], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 8B: built in bf16 directly, not fp32 then cast
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    for f in tokenizer_dir.iterdir():  # the tokenizer only: the config is the model's own
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    del model
    torch.cuda.empty_cache()


def step_tokens(records: list[dict], steps: int) -> list[int]:
    """Trained tokens of each optimizer step, in the training stage's record order."""
    from tasks.train.batches import epoch_order

    order = epoch_order(len(records), 0, SEED, BATCH * ACCUM)
    per = BATCH * ACCUM
    return [
        sum(len(records[i]["input_ids"]) for i in order[s * per : (s + 1) * per])
        for s in range(steps)
    ]


# ----------------------------------------------------------------------------- one process


def llmft_command(impl: str, row: dict, steps: int, work: Path, args) -> tuple[list[str], Path]:
    """`python -m tasks.train --spec FILE` with the GPU recipe's switches (and the
    variant's, LLMFT_VARIANTS)."""
    from tasks.config import TrainConfig

    method = row["method"]
    train = TrainConfig(
        method=method, cutoff_len=CUTOFF, packing=True, liger="auto",
        batch_size=BATCH, grad_accum=ACCUM, max_steps=steps, learning_rate=LR[method],
        scheduler="constant", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_steps=10_000, precision="auto", device="auto", seed=SEED,
        gradient_checkpointing=method == "qlora", offload_checkpoints=method == "qlora",
    ).model_copy(update=LLMFT_VARIANTS[impl])  # fmt: skip
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {
        "train": train.model_dump(mode="json"),
        "model_dir": str(row["model_dir"]),
        "tokens_dir": str(args.tokens),
        "output_dir": str(out),
        "keys": {},
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    return [sys.executable, "-m", "tasks.train", "--spec", str(work / "spec.json")], out


def read_run(out: Path, warmup: int) -> dict:
    """What a training job wrote (logging_steps=1): its step losses, its metrics, and its
    own tokens per second over the steps after the first `warmup`."""
    history = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    steps = [h for h in history if "loss" in h]
    before = [0] + [h["tokens"] for h in steps[:-1]]
    tokens = seconds = 0.0
    for h, prev in zip(steps, before, strict=True):
        if h["step"] > warmup:
            t = h["tokens"] - prev
            tokens += t
            seconds += h["step_seconds"] if "step_seconds" in h else t / h["tokens_per_second"]
    return {
        "tokens_per_second": tokens / seconds if seconds else float("nan"),
        "timed_seconds": seconds,
        "timed_tokens": tokens,
        "losses": [h["loss"] for h in steps],
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


def run_process(impl: str, row: dict, steps: int, args) -> dict:
    """One whole process of `steps` optimizer steps: its wall clock and its own numbers."""
    work = Path(args.work) / "runs" / f"{row['name']}-{impl}-{steps}"
    work.mkdir(parents=True, exist_ok=True)
    if impl in LLMFT_VARIANTS:
        cmd, out = llmft_command(impl, row, steps, work, args)
    else:
        result_file = work / "result.json"
        result_file.unlink(missing_ok=True)
        cmd = [
            sys.executable, str(REPO / "bench" / "peers.py"), "--impl", impl,
            "--method", row["method"], "--model-dir", str(row["model_dir"]),
            "--tokens", str(args.tokens), "--steps", str(steps), "--warmup", str(args.warmup),
            "--result", str(result_file), "--work", str(work),
        ]  # fmt: skip
    log = work / "process.log"
    # every process starts with empty kernel caches (Triton, Inductor, unsloth's generated
    # modules), as a first run does: a cache left by the short process would make the long
    # one skip compiling what the short one paid for, and the difference would lose it
    caches = work / "caches"
    shutil.rmtree(caches, ignore_errors=True)
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRITON_CACHE_DIR": str(caches / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "UNSLOTH_COMPILE_LOCATION": str(caches / "unsloth"),
    }
    started = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                timeout=args.process_timeout,
            )  # fmt: skip
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - started
    if rc != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        errors = [x for x in lines if "Error" in x or "error:" in x]
        return {"wall": wall, "error": f"exit {rc}: " + (errors[-1] if errors else lines[-1])[:400]}
    if impl in LLMFT_VARIANTS:
        run = read_run(out, args.warmup)
        m = run["metrics"]
        return {
            "wall": wall, "own": run["tokens_per_second"], "losses": run["losses"],
            "peak_gib": m.get("peak_gpu_memory_gib") or 0.0, "trained_tokens": m["trained_tokens"],
            "ran": {"fast_path": m.get("fast_path"), "job_wall_seconds": m.get("wall_seconds")},
        }  # fmt: skip
    r = json.loads(result_file.read_text())
    return {"wall": wall, "own": r["tokens_per_second"], "losses": r["losses"],
            "peak_gib": r["peak_gib"], "ran": r["ran"]}  # fmt: skip


def measure(impl: str, row: dict, args) -> dict:
    """The two processes of one implementation, `--repeat` times, and the tokens/s between
    them (the median pair; the spread shows how much one pair can be trusted).

    Pairs alternate their order (short, long, then long, short), so a drift over the run
    (a page cache filling, clocks settling) falls on both sides.
    """
    walls: dict[str, list[float]] = {"short": [], "long": []}
    last = {}
    for i in range(args.repeat if impl in LLMFT_VARIANTS else args.peer_repeat or args.repeat):
        for kind in ("short", "long") if i % 2 == 0 else ("long", "short"):
            r = run_process(impl, row, row[kind], args)
            if r.get("error"):
                return {"error": r["error"], kind: r}
            walls[kind].append(r["wall"])
            last[kind] = r
    tokens = sum(args.step_tokens[row["short"] : row["long"]])
    rates = sorted(tokens / (lw - sw) for sw, lw in zip(walls["short"], walls["long"], strict=True))
    long = last["long"]
    return {
        "tokens_per_second": statistics.median(rates),
        "rates": [round(x, 1) for x in rates],
        "own": long["own"],
        "peak_gib": long["peak_gib"],
        "losses": long["losses"],
        "wall_short": round(statistics.median(walls["short"]), 2),
        "wall_long": round(statistics.median(walls["long"]), 2),
        "walls": {k: [round(x, 2) for x in v] for k, v in walls.items()},
        "tokens_between": tokens,
        "ran": long["ran"],
        "error": None,
    }


# ----------------------------------------------------------------------------- table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--rows", default=ROWS,
        help=f"model:method[:short:long[:peer_long]],... (default {ROWS})",
    )  # fmt: skip
    p.add_argument("--impls", default=IMPLS, help=f"in this order per row (default {IMPLS})")
    p.add_argument("--short", type=int, default=3, help="optimizer steps of the short process")
    p.add_argument("--long", type=int, default=35, help="optimizer steps of the long process")
    p.add_argument("--warmup", type=int, default=2, help="steps the in-process figure skips")
    p.add_argument("--repeat", type=int, default=2, help="pairs of processes per figure")
    p.add_argument("--peer-repeat", type=int, default=0, help="the peers' pairs (default --repeat)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/llmft-bench"))
    p.add_argument("--work", default="/tmp/llmft-bench-work")
    p.add_argument("--tokenizer", default=str(REPO / ".bench" / "tok"))
    p.add_argument("--process-timeout", type=int, default=300)
    p.add_argument("--deadline", type=float, default=0, help="seconds: start no row after it")
    p.add_argument("--resume", action="store_true", help="skip what results.json measured")
    p.add_argument("--table", action="store_true", help="only print results.json's table")
    args = p.parse_args()
    started = time.time()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "results.json"
    resume = args.resume or args.table
    state = json.loads(saved.read_text()) if resume and saved.exists() else {}
    ceiling = state.get("ceiling") or ceilings()
    # a resumed run measures again what failed before (a fix may have landed since)
    results: list[dict] = [r for r in state.get("results", []) if not r.get("error")]
    print(f"ceilings: {ceiling}", flush=True)
    if args.table:
        return print(table(results, ceiling, NOT_RUN))

    # a fixed number of records (not one epoch of --long steps): the epoch's order, so each
    # step's records, stay the same whatever step counts a run (or a resumed one) asks for
    records = synthetic_records(RECORD_STEPS * BATCH * ACCUM)
    args.tokens = work / "tokens"
    write_tokens(records, args.tokens)
    args.step_tokens = step_tokens(records, RECORD_STEPS)
    print(f"records {len(records)}, tokens per step {statistics.mean(args.step_tokens):.0f}")

    for spec in args.rows.split(","):
        model, method, *steps = spec.split(":")
        short, long, peer_long = (
            (int(steps[0]), int(steps[1]), int(steps[2] if len(steps) > 2 else steps[1]))
            if steps else (args.short, args.long, args.long)
        )  # fmt: skip
        name = f"{model} {method}"
        for impl in args.impls.split(","):
            # a peer several times slower reaches the same seconds between its two
            # processes in fewer steps; the records of each step are the same for all
            row = {"name": name.replace(" ", "-"), "method": method, "short": short,
                   "long": long if impl in LLMFT_VARIANTS else peer_long,
                   "model_dir": work / f"model-{model}"}  # fmt: skip
            if any(r["row"] == name and r["impl"] == impl for r in results):
                continue
            if args.deadline and time.time() - started > args.deadline:
                print(f"[{name} {impl}] not started: past --deadline", flush=True)
                continue
            make_model(model, row["model_dir"], Path(args.tokenizer))
            r = measure(impl, row, args)
            r |= {"row": name, "impl": impl, "N": matmul_params(MODELS[model]),
                  "c": 6 if method == "full" else 4, "short": row["short"], "long": row["long"]}  # fmt: skip
            results.append(r)
            print(f"[{name} {impl}] {json.dumps(r)[:700]}", flush=True)
            text = json.dumps({"ceiling": ceiling, "results": results}, indent=1)
            saved.write_text(text)
            (out / "results.json").write_text(text)
    text = table(results, ceiling, NOT_RUN)
    (out / "table.txt").write_text(text + "\n")
    print(
        f"\nbf16 matmul ceiling {ceiling['matmul_tflops']} TFLOP/s, copy {ceiling['copy_gbs']} GB/s"
    )
    print("N: " + ", ".join(
        f"{m} {matmul_params(MODELS[m]) / 1e9:.3f} B" for m in ("1b", "8b", "smollm2")))  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
