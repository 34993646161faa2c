"""`llmft plan`: exact parameter counts from config.json alone, the bytes-per-parameter
formulas, ZeRO partitioning, and the fits column."""

from __future__ import annotations

import json

import pytest

from tasks.config import load_config
from tasks.train import plan

GIB = 2**30
# the GPU benchmark's 1B-class Llama (Llama-3.2-1B's shape): only config.json is needed
ONE_B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "tie_word_embeddings": True, "head_dim": 64,
}  # fmt: skip


@pytest.fixture(scope="module")
def smollm(base_model_dir):
    cfg = load_config(None, [f"base.model={base_model_dir}"])
    return cfg, *plan.plan(cfg, gpus=1)


def rows_by(rows):
    return {(r.method, r.setup): r for r in rows}


def test_counts_come_from_the_config(smollm):
    cfg, shape, trained, rows = smollm
    assert shape.params == 134_515_008  # SmolLM2-135M, tied embeddings counted once
    # LoRA r=8 on all 7 linear layers of 30: r·(in+out) each
    h, kv, i, r = 576, 192, 1536, 8
    per_layer = r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))
    assert trained["lora"] == trained["qlora"] == 30 * per_layer
    assert trained["full"] == shape.params
    assert 0 < trained["ptuning"] < trained["full"] / 10


def test_bytes_per_parameter(smollm):
    cfg, shape, trained, rows = smollm
    by = rows_by(rows)
    n = shape.params
    full = by["full", "none"]
    assert full.weights + full.gradients + full.optimizer == 16 * n  # fp32 w, g, m, v
    lora = by["lora", "none"]
    assert lora.weights == 2 * n + 4 * trained["lora"]  # bf16 frozen base + fp32 adapter
    qlora = by["qlora", "none"]
    assert qlora.weights < 0.5 * lora.weights  # NF4 decoder weights; the embedding (21%) stays bf16
    assert by["full", "zero2+offload"].optimizer == 0 and by["full", "zero2+offload"].cpu == 16 * n
    assert ("qlora", "zero3") not in by  # 4-bit weights cannot be partitioned


def test_zero_partitions_over_gpus(base_model_dir):
    cfg = load_config(None, [f"base.model={base_model_dir}"])
    one = rows_by(plan.plan(cfg, gpus=1)[2])
    four = rows_by(plan.plan(cfg, gpus=4)[2])
    assert four["full", "zero2"].optimizer == pytest.approx(one["full", "zero2"].optimizer / 4)
    assert four["full", "zero2"].weights == one["full", "zero2"].weights  # replicated
    assert four["full", "zero3"].weights < one["full", "zero3"].weights
    assert four["full", "none"].total == one["full", "none"].total  # DDP replicates all


def test_a_1b_model_from_config_json_alone(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(ONE_B))
    cfg = load_config(
        None,
        [f"base.model={tmp_path}", "train.method=full", "train.accelerate_config=zero3_offload"],
    )
    shape, trained, rows = plan.plan(cfg, gpus=1)
    assert 1.23e9 < shape.params < 1.24e9
    by = rows_by(rows)
    assert by["full", "none"].total > 18 * GIB  # 16 bytes × 1.24B ≈ 18.4 GiB before activations
    assert by["full", "zero3+offload"].total < by["full", "none"].total / 3
    plan.print_plan(cfg, gpu_gib=24, num_gpus=1)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("full") and "zero3+offload" in x)
    assert "yes" in line and "← this config" in line
    full = next(x for x in out.splitlines() if x.split()[:2] == ["full", "none"])
    assert full.split()[-1] == "no"  # does not fit 24 GiB


def test_cli_plan_for_the_default_config(capsys):
    from flows.cli import main

    assert main(["plan", "--gpu-gib", "16"]) == 0
    out = capsys.readouterr().out
    assert "134.5M parameters" in out and "← this config" in out


def test_offloaded_checkpoints_leave_two_layer_inputs_on_the_gpu(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(ONE_B))
    base = [f"base.model={tmp_path}", "train.method=qlora", "train.gradient_checkpointing=true"]
    kept = rows_by(plan.plan(load_config(None, base), gpus=1)[2])["qlora", "none"]
    cfg = load_config(None, [*base, "train.offload_checkpoints=true"])
    moved = rows_by(plan.plan(cfg, gpus=1)[2])["qlora", "none"]
    t = cfg.train
    tokens = t.batch_size * t.cutoff_len
    # 14 of the 16 layer inputs (2 bytes × hidden 2048 each per token) leave the GPU
    assert kept.activations - moved.activations == tokens * 2 * 2048 * 14
    assert moved.cpu - kept.cpu == tokens * 2 * 2048 * 16  # all 16 wait in host memory
    plan.print_plan(cfg, gpu_gib=24, num_gpus=1)
    assert "checkpointing on, inputs offloaded to CPU" in capsys.readouterr().out
