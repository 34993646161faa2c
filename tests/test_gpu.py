"""The four methods on one GPU, and full fine-tuning under DeepSpeed ZeRO-2 with the
optimizer offloaded to the CPU: each runs the shipped GPU recipe through the training
stage for a few dozen steps on the demo data, the loss must fall, and a table of
tokens/s and peak GPU memory is printed.

The model is SmolLM2-135M's architecture and tokenizer with random weights: the GPU
machine cannot receive the real weights, and speed and memory do not depend on their
values. `LLMFT_GPU_MODEL` names a folder with its config.json and tokenizer files;
without it they come from the bundled model (tests/conftest.py's base_model_dir).
`LLMFT_GPU_RUNS=lora,ptuning` keeps the runs whose name starts with one of those.

    pytest -m gpu tests/test_gpu.py -s
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

import pytest
import torch

from tasks import train
from tasks.config import REPO_ROOT, load_config
from tasks.store import Ref, Store

# without CUDA these fail, they do not skip (tests/conftest.py); -m "not gpu" leaves them out
pytestmark = pytest.mark.gpu

RUNS = [  # (name in the table, recipe, overrides)
    ("lora bf16", "lora_gpu", []),
    ("qlora 4-bit", "qlora_gpu", []),
    ("full bf16", "lora_gpu", ["train.method=full", "train.learning_rate=1e-4"]),
    ("ptuning", "ptuning_gpu", ["train.ptuning.pre_seq_len=32", "train.learning_rate=1e-2"]),
    ("full, ZeRO-2 + CPU offload", "full_deepspeed", ["train.learning_rate=1e-4"]),
]
COMMON = [
    "train.max_steps=40", "train.cutoff_len=512", "train.batch_size=16", "train.grad_accum=1",
    "train.logging_steps=5", "train.eval_steps=null", "train.save_steps=20",
    "train.warmup_ratio=0.05",
]  # fmt: skip


@pytest.fixture(scope="module")
def random_smollm(tmp_path_factory, request) -> Path:
    """A base-stage folder: SmolLM2-135M's shape and tokenizer, seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = os.environ.get("LLMFT_GPU_MODEL")
    src = Path(src) if src else request.getfixturevalue("base_model_dir")
    out = tmp_path_factory.mktemp("random-smollm2") / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return out.parent


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """datasets_raw/ as canonical records (placeholders filled), 90 % train, 10 % dev."""
    raw = REPO_ROOT / "datasets_raw"
    records = json.loads((raw / "self_cognition.json").read_text(encoding="utf-8"))
    records += [json.loads(x) for x in (raw / "law_qa.jsonl").open(encoding="utf-8") if x.strip()]
    for r in records:
        r["output"] = r["output"].replace("{{name}}", "Lexi").replace("{{author}}", "llmft")
    out = tmp_path_factory.mktemp("demo-data")
    (out / "train.json").write_text(json.dumps([r for i, r in enumerate(records) if i % 10]))
    (out / "dev.json").write_text(json.dumps(records[::10]))
    (out / "test.json").write_text("[]")
    return out


def test_methods_train_on_one_gpu(random_smollm, demo_data, tmp_path):
    store = Store(tmp_path / "store")
    data, base = Ref("data", "demo", str(demo_data)), Ref("base", "random", str(random_smollm))
    table = []
    only = [x for x in os.environ.get("LLMFT_GPU_RUNS", "").split(",") if x]
    for name, recipe, extra in RUNS:
        if only and not name.startswith(tuple(only)):
            continue
        cfg = load_config(REPO_ROOT / "configs" / f"{recipe}.yaml", COMMON + extra)
        torch.cuda.empty_cache()
        ref = train.run(cfg, store, data, base)
        m = json.loads((ref.dir / "metrics.json").read_text())
        log = [json.loads(x) for x in (ref.dir / "log_history.jsonl").open()]
        losses = [h["loss"] for h in log if "loss" in h]
        steady = [h["tokens_per_second"] for h in log if "loss" in h][1:]  # skip warm-up
        table.append(
            {
                "run": name,
                "tokens/s": round(statistics.median(steady)),
                "peak GiB": m["peak_gpu_memory_gib"],
                "loss first → last": f"{losses[0]:.2f} → {losses[-1]:.2f}",
                "dev before → after": f"{m['dev_loss']['before']:.2f} → {m['dev_loss']['after']:.2f}",
                "trainable": f"{m['trainable_parameters'] / 1e6:.2f}M",
                "step + eval + save s": "{step_seconds:.1f} + {eval_seconds:.1f} + "
                "{save_seconds:.1f}".format(**m),
                "fast path": _levers(m.get("fast_path")),
            }
        )
        assert m["steps"] == 40 and m["device"] == "cuda"
        assert losses[-1] < losses[0], (name, losses)
        assert m["dev_loss"]["after"] < m["dev_loss"]["before"], (name, m["dev_loss"])
        assert (ref.dir / ("model" if "full" in name else "adapter")).is_dir()
        # each step timed after its device sync: tokens/s over the steps' time alone, and
        # steps, evaluations and saves fill the training's wall time between them
        rate = m["trained_tokens"] / m["step_seconds"]
        assert m["tokens_per_second"] == pytest.approx(rate, rel=0.01)
        parts = m["step_seconds"] + m["eval_seconds"] + m["save_seconds"]
        assert parts == pytest.approx(m["train_wall_seconds"], abs=0.02)
    _print(table)


def _levers(described: str | None) -> str:
    if not described:
        return "-"
    on = dict(re.findall(r"(\w+)=([^,]+)", described))
    keep = ("packing", "attention", "fused_lora", "fused_loss", "liger")
    return " ".join(f"{k}={on[k]}" for k in keep if k in on)


def _print(table: list[dict]) -> None:
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in table]
    text = "\n".join(lines)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}\n{text}")
    if report := os.environ.get("LLMFT_GPU_REPORT"):
        Path(report).write_text(text + "\n")
