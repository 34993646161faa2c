"""CPU checks of the GPU fast path's logic: packing, per-record attention, fused loss, fused LoRA.

A 2-layer Llama with random weights is enough: each check compares two ways of computing
the same function, so the weights' values don't matter, only that they are not trivial.
"""

from __future__ import annotations

import random

import pytest
import torch

from tasks.train import fastpath, packing


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def records(n: int, seed: int = 0, vocab: int = 211) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = rng.randint(2, 20), rng.randint(1, 25)
        ids = [rng.randrange(1, vocab) for _ in range(prompt + answer)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_plan_microbatches_covers_each_record_once_within_budget():
    rng = random.Random(1)
    lengths = [rng.randint(30, 1024) for _ in range(32)]
    groups = packing.plan_microbatches(lengths, 8192)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(32))
    loads = [sum(lengths[i] for i in g) for g in groups]
    assert max(loads) <= 8192
    assert len(groups) == -(-sum(lengths) // 8192) or min(loads) > 0.5 * max(loads)
    # a record over the budget still trains, alone in its row
    assert packing.plan_microbatches([5000, 10], 4096) == [[0], [1]]


def test_pack_resets_positions_and_never_shifts_labels_across_records():
    recs = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
    ]
    b = packing.pack(recs)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5]
    # record 1's last token must not learn to predict record 2's first token (8)
    assert b["shift_labels"].tolist() == [[6, 7, -100, 9, -100]]
    assert b["target_index"].tolist() == [0, 1, 3]
    assert b["targets"].tolist() == [6, 7, 9]
    assert b["num_tokens"] == 5 and b["max_length_q"] == 3


@pytest.mark.parametrize(
    "attention,boundaries",
    [("sdpa", True), (fastpath.ATTN_NAME, True), (fastpath.ATTN_NAME, False)],
)
def test_packed_row_has_no_attention_across_records(attention, boundaries):
    model = tiny_llama()
    fastpath.set_attention(model, attention)
    recs = records(3, seed=2)
    alone = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in recs]
    b = packing.pack(recs)
    keys = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    # without them, llmft_varlen reads the boundaries from the position_ids
    kwargs = {k: b[k] for k in keys} if boundaries else {}
    # use_cache=False matters: with a cache transformers stops reading record boundaries
    # from position_ids, and SDPA would attend across records
    packed = model(
        input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False, **kwargs
    ).logits[0]
    for (start, end), ref in zip(
        zip(b["cu_seq_lens_q"][:-1].tolist(), b["cu_seq_lens_q"][1:].tolist(), strict=True),
        alone,
        strict=True,
    ):
        torch.testing.assert_close(packed[start:end], ref, atol=2e-5, rtol=1e-4)


def test_chunked_linear_cross_entropy_matches_plain_logits():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="sum")
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = fastpath._ChunkedLinearCE.apply(h, w, y, 8)  # 5 chunks, the last one short
    (got * 0.5).backward()
    torch.testing.assert_close(got.double(), ref)
    torch.testing.assert_close(h.grad, 0.5 * gh)
    torch.testing.assert_close(w.grad, 0.5 * gw)


def _plan(fused_loss: str, attention: str = "sdpa") -> fastpath.Plan:
    return fastpath.Plan(
        device="cpu",
        batches=True,
        packing=True,
        rows=None,
        attention=attention,
        fused_lora=False,
        fused_loss=fused_loss,
        liger=False,
        fused_adamw=False,
        compile=False,
        gradient_checkpointing=False,
        token_budget=256,
    )


@pytest.mark.parametrize(
    "fused_loss,attention", [("off", "sdpa"), ("chunked", "sdpa"), ("chunked", fastpath.ATTN_NAME)]
)
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(fused_loss, attention):
    model = tiny_llama().train()
    fastpath.set_attention(model, attention)  # llmft_varlen: padded rows still get a mask
    recs = records(6, seed=3)
    plan = _plan(fused_loss, attention)
    losses, grads = [], []
    for batch in (packing.pack(recs), packing.pad(recs, pad_id=0)):
        model.zero_grad()
        loss = fastpath.loss_sum(model, batch, plan) / batch["num_targets"]
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.layers[0].mlp.down_proj.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    # the head is bypassed only inside loss_sum: the model still returns logits after it
    assert model(input_ids=torch.tensor([[5, 6]])).logits.shape[-1] == model.config.vocab_size


def test_fused_lora_linear_matches_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )
    for name, p in model.named_parameters():  # B starts at zero: make the update visible
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = packing.pack(records(4, seed=4))
    plan = _plan("off")

    def run():
        model.zero_grad()
        loss = fastpath.loss_sum(model, batch, plan) / batch["num_targets"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    ref_loss, ref_grads = run()
    assert fastpath.fuse_lora(model) == 14  # 7 projections × 2 layers
    loss, grads = run()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_step_batches_respects_the_token_budget():
    recs = records(16, seed=5)
    mbs = packing.step_batches(recs, token_budget=128, packing=True)
    assert sum(mb["num_tokens"] for mb in mbs) == sum(len(r["input_ids"]) for r in recs)
    assert all(mb["num_tokens"] <= 128 for mb in mbs)
    padded = packing.step_batches(recs, token_budget=128, packing=False)
    assert sum(mb["num_targets"] for mb in padded) == sum(mb["num_targets"] for mb in mbs)


def test_fused_loss_outside_autocast_runs_in_the_training_dtype(monkeypatch):
    """accelerate autocasts only the model's forward and returns fp32 outputs; the loss
    fused with the head must still run its matmuls in the training's dtype."""
    model = tiny_llama().train()
    batch = packing.pack(records(3, seed=6))
    seen = []

    def spy(h, weight, targets, impl):
        seen.append((h.dtype, weight.dtype))
        return (h.float() @ weight.float().t()).logsumexp(-1).sum()

    monkeypatch.setattr(fastpath, "linear_cross_entropy_sum", spy)
    plan = _plan("chunked")
    fastpath.loss_sum(model, batch, plan)
    plan.compute_dtype = "bfloat16"
    fastpath.loss_sum(model, batch, plan)
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
