"""On a GPU: packed training (the fast path) and padded training give the same losses.

Two copies of one random-weight Llama (SmolLM2-135M's shape, bf16, LoRA rank 8 on every
linear layer) train on the same records, the same steps, the same optimizer:
- padded: the usual batch (right padding, attention mask, SDPA, the model's own loss);
- packed: `tasks.train.fastpath.prepare` (varlen flash attention, fused LoRA, loss fused with
  the head, Liger kernels when installed) on padding-free rows.
Both go through the one batch path the training stage uses (`tasks.train.batches`); only
the kernels differ.
If any record attended to another, or labels crossed a record boundary, or a fused kernel
computed something else, the per-step losses would part. bf16 rounding alone moves them
by well under 1%.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from tasks.train import batches, fastpath, kernels

# without CUDA these fail, they do not skip (tests/conftest.py); -m "not gpu" leaves them out
pytestmark = pytest.mark.gpu

STEPS = 6


def smollm_shape():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        use_cache=False,
    )


def make_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    zipf = [1.0 / (i + 10) for i in range(8000)]  # a learnable unigram skew
    out = []
    for _ in range(n):
        prompt, answer = rng.randint(20, 300), rng.randint(10, 400)
        ids = rng.choices(range(100, 8100), weights=zipf, k=prompt + answer)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def lora_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(smollm_shape()).to(torch.bfloat16)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, cfg)


def train(model, steps: list[list[dict]], plan, packed: bool) -> list[float]:
    opt = fastpath.adamw(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for records in steps:
        mbs = batches.step_batches(records, token_budget=4096, packing=packed, pad_id=0)
        n_targets = sum(b["num_targets"] for b in mbs)
        total = 0.0
        for b in mbs:
            b = batches.to_device(b, "cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = batches.loss_sum(model, b, plan) / n_targets
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def test_packed_and_padded_training_give_the_same_losses():
    records = make_records(16 * STEPS, seed=0)
    steps = [records[i : i + 16] for i in range(0, len(records), 16)]

    padded_model = lora_model()
    padded_plan = fastpath.Plan(
        device="cuda",
        packing=False,
        rows=None,
        attention="unchanged",
        fused_lora=False,
        fused_loss="off",
        liger=False,
        fused_adamw=True,
        compile=False,
        gradient_checkpointing=False,
        token_budget=4096,
    )
    padded = train(padded_model, steps, padded_plan, packed=False)
    del padded_model
    torch.cuda.empty_cache()

    packed_model = lora_model()
    train_cfg = SimpleNamespace(
        method="lora",
        packing=True,
        liger="auto",
        lora=SimpleNamespace(dropout=0.0),
        compile=False,
        gradient_checkpointing=False,
        batch_size=4,
        cutoff_len=1024,
        precision="auto",
        grad_accum=1,
    )
    plan = fastpath.prepare(packed_model, train_cfg, "cuda")
    assert plan.attention == kernels.ATTN_NAME and plan.fused_lora and plan.fused_loss != "off"
    batches.check_packing(packed_model, plan, "cuda")  # as the stage does: records kept apart
    packed = train(packed_model, steps, plan, packed=True)

    print("padded", padded, "\npacked", packed, "\nplan", plan.describe())
    assert padded[-1] < padded[0]  # it trains
    for a, b in zip(padded, packed, strict=True):
        assert abs(a - b) / a < 5e-3, (padded, packed)


def test_varlen_attention_matches_per_record_sdpa_with_grouped_heads():
    torch.manual_seed(0)
    lengths = [1, 17, 300, 64, 1023]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    q = torch.randn(total, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = cu.cuda()
    out = kernels.varlen_attention(q, k, v, cu, max(lengths), 64**-0.5)
    ref = kernels.varlen_attention(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), cu.cpu(), max(lengths), 64**-0.5
    )
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < 1e-2, err
    g = torch.randn_like(out)
    dq, dk = torch.autograd.grad(out, (q, k), g)
    qr, kr, vr = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    rq, rk = torch.autograd.grad(
        kernels.varlen_attention(qr, kr, vr, cu.cpu(), max(lengths), 64**-0.5),
        (qr, kr),
        g.double().cpu(),
    )
    assert (dq.double().cpu() - rq).norm() / rq.norm() < 2e-2
    assert (dk.double().cpu() - rk).norm() / rk.norm() < 2e-2
