"""CPU checks of the kernels the training plan switches on: each computes what the plain
path computes. Per-record attention on packed rows, the LM head fused with the loss,
fused LoRA, and the plan a CPU run gets (the same batch path and loss as a GPU run; only
CUDA's own kernels are off).
"""

from __future__ import annotations

import pytest
import torch
from train_fixtures import tiny_llama, token_records

from tasks.config import TrainConfig
from tasks.train import batches, fastpath, kernels


@pytest.mark.parametrize(
    "attention,boundaries",
    [("sdpa", True), (kernels.ATTN_NAME, True), (kernels.ATTN_NAME, False)],
)
def test_packed_row_has_no_attention_across_records(attention, boundaries):
    model = tiny_llama()
    kernels.set_attention(model, attention)
    recs = token_records(3, seed=2)
    alone = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in recs]
    b = batches.pack(recs)
    # without them, llmft_varlen reads the boundaries from the position_ids
    kwargs = {k: b[k] for k in batches.BOUNDARY_KEYS} if boundaries else {}
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
    got = kernels._ChunkedLinearCE.apply(h, w, y, 8)  # 5 chunks, the last one short
    (got * 0.5).backward()
    torch.testing.assert_close(got.double(), ref)
    torch.testing.assert_close(h.grad, 0.5 * gh)
    torch.testing.assert_close(w.grad, 0.5 * gw)


def _plan(fused_loss: str, attention: str = "sdpa") -> fastpath.Plan:
    return fastpath.Plan(
        device="cpu",
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
    "fused_loss,attention", [("off", "sdpa"), ("chunked", "sdpa"), ("chunked", kernels.ATTN_NAME)]
)
def test_every_layout_and_kernel_gives_the_models_own_loss(fused_loss, attention):
    """Packed or padded, full logits or the fused head, SDPA or varlen attention: the loss
    and gradients are those of transformers' own loss on the padded batch (which shifts
    the unshifted labels itself)."""
    model = tiny_llama().train()
    recs = token_records(6, seed=3)
    width = max(len(r["input_ids"]) for r in recs)
    raw = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in recs])
    padded = batches.pad(recs, pad_id=0)
    ref = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=raw)
    ref.loss.backward()
    ref_grad = model.model.layers[0].mlp.down_proj.weight.grad.clone()

    kernels.set_attention(model, attention)  # llmft_varlen: padded rows still get a mask
    plan = _plan(fused_loss, attention)
    for batch in (batches.pack(recs), padded):
        model.zero_grad()
        loss = batches.loss_sum(model, batch, plan) / batch["num_targets"]
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref.loss.detach(), atol=1e-5, rtol=1e-5)
        grad = model.model.layers[0].mlp.down_proj.weight.grad
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)
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
    batch = batches.pack(token_records(4, seed=4))
    plan = _plan("off")

    def run():
        model.zero_grad()
        loss = batches.loss_sum(model, batch, plan) / batch["num_targets"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    ref_loss, ref_grads = run()
    assert kernels.fuse_lora(model) == 14  # 7 projections × 2 layers
    loss, grads = run()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_fused_loss_outside_autocast_runs_in_the_training_dtype(monkeypatch):
    """accelerate autocasts only the model's forward and returns fp32 outputs; the loss
    fused with the head must still run its matmuls in the training's dtype."""
    model = tiny_llama().train()
    batch = batches.pack(token_records(3, seed=6))
    seen = []

    def spy(h, weight, targets, impl):
        seen.append((h.dtype, weight.dtype))
        return (h.float() @ weight.float().t()).logsumexp(-1).sum()

    monkeypatch.setattr(kernels, "linear_cross_entropy_sum", spy)
    plan = _plan("chunked")
    batches.loss_sum(model, batch, plan)
    plan.compute_dtype = "bfloat16"
    batches.loss_sum(model, batch, plan)
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]


def test_a_cpu_run_gets_the_gpu_path_with_cuda_kernels_off():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.0))
    cfg = TrainConfig(packing=True, batch_size=4, cutoff_len=128, grad_accum=3)
    plan = fastpath.prepare(model, cfg, "cpu")
    assert plan.packing and plan.fused_loss == "chunked" and plan.fused_lora
    assert plan.attention == "sdpa"  # the model's own: its mask keeps records apart
    assert not (plan.liger or plan.fused_adamw) and plan.rows is None
    assert plan.token_budget == 4 * 128  # what a padded micro-batch may hold
    # under DeepSpeed the levers that read weights outside their module's forward are off
    ds = fastpath.make_plan(cfg, "cpu", model, deepspeed=True)
    assert ds.fused_loss == "off" and not ds.fused_lora and ds.rows == 3


def test_compile_layers_compiles_each_decoder_layer_in_place():
    model = tiny_llama()
    layers = list(model.model.layers)
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert fastpath.compile_layers(model) == 2
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert model._compiled_call_impl is None  # the rest (embedding, loss) stays eager


def test_token_budget_fills_the_gpu_memory_share(monkeypatch):
    """On a GPU (its size faked here) the budget is what the share holds after weights
    and optimizer states, between a padded micro-batch and the whole step."""
    from types import SimpleNamespace

    model = tiny_llama()  # full fine-tuning: 4 + 12 bytes per parameter
    params = sum(p.numel() for p in model.parameters())
    per_token = fastpath.activation_bytes(model.config, 1)

    def budget(gib: float, share: float, accum: int = 1000) -> int:
        total = int(gib * 2**30)
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(total_memory=total)
        )
        cfg = TrainConfig(batch_size=4, cutoff_len=128, grad_accum=accum, gpu_memory_share=share)
        return fastpath.token_budget(model, cfg, torch.device("cuda"))

    assert budget(1, 0.6) == int((0.6 * 2**30 - 16 * params) / per_token)
    assert budget(1, 0.8) > budget(1, 0.6) * 4 / 3 > 4 * 128
    assert budget(1, 0.8, accum=2) == 4 * 128 * 2  # never beyond a step's worst case
    assert budget(0.001, 0.6) == 4 * 128  # nor below a padded micro-batch
    cfg = TrainConfig(batch_size=4, cutoff_len=128, gradient_checkpointing=True)
    assert fastpath.token_budget(model, cfg, torch.device("cuda")) == 4 * 128  # memory first
