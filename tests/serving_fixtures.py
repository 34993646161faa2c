"""Artifacts the evaluate/merge/export/serve tests share, built once per session.

Everything goes through `Store.build` in the session's store (tests/conftest.py), so the
first test module that needs them pays (about a minute on 2 cores: a dozen LoRA steps, a
GGUF conversion, two quantizations) and the others get store hits. The training artifact
has exactly the layout the training stage writes: `adapter/` (peft + tokenizer with chat
template), `hyperparameters.yaml`, `metrics.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tasks.formatting import encode
from tasks.store import Ref, Store, make_key

NAME = "Lexi"
IDENTITY = f"I am {NAME}, an assistant made by the llmft team."
IDENTITY_ZH = f"我是{NAME}，由 llmft 团队开发的助手。"
TRAIN = [
    {"instruction": "Who are you?", "input": "", "output": IDENTITY},
    {"instruction": "What is your name?", "input": "", "output": IDENTITY},
    {"instruction": "Introduce yourself.", "input": "", "output": IDENTITY},
    {"instruction": "你是谁？", "input": "", "output": IDENTITY_ZH},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "中国的首都是哪里？", "input": "", "output": "北京。"},
    {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5."},
]
# Held out from training, so perplexity and GGUF agreement are not those of a memorised set.
DEV = [
    {"instruction": "Tell me about yourself.", "input": "", "output": IDENTITY},
    {"instruction": "What is the capital of Italy?", "input": "", "output": "Rome."},
    {"instruction": "日本的首都是哪里？", "input": "", "output": "东京。"},
    {
        "instruction": "Explain what a cache is in one sentence.",
        "input": "",
        "output": "A cache keeps recent results close by so they can be reused quickly.",
    },
]
TEST = (
    TRAIN[:1]
    + TRAIN[3:5]
    + [
        {"instruction": "你叫什么名字？", "input": "", "output": IDENTITY_ZH},
        {"instruction": "What is 3 + 4?", "input": "", "output": "3 + 4 = 7."},
    ]
)
SPLITS = {"train": TRAIN, "dev": DEV, "test": TEST}


def make_data(store: Store) -> Ref:
    """A data-stage artifact: train/dev/test JSON arrays of canonical records."""

    def work(tmp: Path) -> dict:
        for split, records in SPLITS.items():
            (tmp / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False))
        (tmp / "rejected.jsonl").write_text("")
        (tmp / "report.json").write_text(json.dumps({k: len(v) for k, v in SPLITS.items()}))

    return store.build("data", make_key("data", "test-fixture-2", {}, SPLITS), work)


def make_lora(store: Store, base: Ref, data: Ref, method: str = "lora", steps: int = 12) -> Ref:
    """A few real AdamW steps of LoRA (or a P-Tuning v2 prefix) on the fixture records."""
    config = {"method": method, "steps": steps, "lr": 2e-3, "r": 8}
    k = make_key("train", "test-fixture-2", config, {"base": base.key, "data": data.key})

    def work(tmp: Path) -> dict:
        import torch
        from peft import LoraConfig, PrefixTuningConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tasks.evaluate import cpu_threads

        torch.manual_seed(0)
        model_dir = base.dir / "model"
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if method == "ptuning":
            peft_cfg = PrefixTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=8, prefix_projection=True
            )
        else:
            peft_cfg = LoraConfig(
                task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"
            )
        model = get_peft_model(model, peft_cfg)
        records = json.loads((data.dir / "train.json").read_text())
        rows = [_tokenize(tokenizer, r) for r in records]
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        losses = []
        with cpu_threads(1):  # small ops: one thread beats two that wait on each other
            for step in range(steps):
                batch = [rows[(step * 4 + j) % len(rows)] for j in range(4)]
                loss = _batch_loss(model, tokenizer, batch)
                loss.backward()
                optim.step()
                optim.zero_grad()
                losses.append(round(loss.item(), 4))
        model.save_pretrained(tmp / "adapter")
        tokenizer.save_pretrained(tmp / "adapter")
        (tmp / "hyperparameters.yaml").write_text(yaml.safe_dump(config))
        metrics = {"method": method, "dev_loss": {"before": losses[0], "after": losses[-1]}}
        (tmp / "metrics.json").write_text(json.dumps(metrics))
        return {"losses": losses}

    return store.build("train", k, work, config=config)


def _tokenize(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    e = encode(tokenizer, record, "auto", cutoff_len=256)
    return e.input_ids[: e.prompt_len], e.input_ids[e.prompt_len :]


def _batch_loss(model, tokenizer, batch):
    import torch

    width = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), width), tokenizer.eos_token_id)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(batch):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[i, : len(p) + len(a)] = 1
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def make_export(store: Store) -> tuple[Ref, Ref, Ref, Ref]:
    """(export, merge, train, data) as the default config exports: f16, q8_0, q4_k_m, LoRA."""
    from tasks import base as base_stage
    from tasks import export, merge
    from tasks.config import load_config

    cfg = load_config(overrides=["export.speed_tokens=8"])  # tokens/s is not what is tested
    base = base_stage.run(cfg, store)
    data = make_data(store)
    train = make_lora(store, base, data)
    merged = merge.run(cfg, store, base, train)
    return export.run(cfg, store, merged, train, data), merged, train, data


class LiveServer:
    """uvicorn in a thread on a free 127.0.0.1 port, for real HTTP clients and browsers."""

    def __init__(self, app) -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        import time

        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            raise RuntimeError("the test server did not start within 30 s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
