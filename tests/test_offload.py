"""`train.offload_checkpoints`: checkpointed layer inputs wait in host memory and come back
for backward, with the same loss and gradients as checkpointing that keeps them."""

from __future__ import annotations

import copy

import pytest
import torch

from tasks.config import ConfigError, TrainConfig, load_config
from tasks.train import fastpath, offload

LAYERS = 3


def tiny_lora(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    # B random, not zero: A's gradients are then not zero either, and are compared too
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
        init_lora_weights=False,
    )  # fmt: skip
    return get_peft_model(model, lora)


def train_grads(model, batches, offloaded: bool, device: str = "cpu", compiled: bool = False):
    """Loss and LoRA gradients of `batches` accumulated, checkpointing on."""
    model = copy.deepcopy(model).to(device)
    model.train()
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    offloader = offload.install(model, device) if offloaded else None
    if compiled:
        assert fastpath.compile_layers(model) == LAYERS
    torch.manual_seed(1)  # the same dropout masks on both sides
    losses = []
    for ids in batches:
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return losses, grads, offloader


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offloaded_inputs_give_the_same_loss_and_gradients(dropout):
    model = tiny_lora(dropout)
    batches = [torch.randint(0, 1000, (2, 600)), torch.randint(0, 1000, (1, 900))]
    kept_losses, kept, _ = train_grads(model, batches, offloaded=False)
    losses, grads, offloader = train_grads(model, batches, offloaded=True)
    assert offloader is not None
    assert offloader.offloaded == LAYERS * len(batches)  # every layer's input, each micro-batch
    assert losses == kept_losses
    assert grads.keys() == kept.keys() and len(grads) == LAYERS * 7 * 2  # A and B of 7 linears
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(grad, kept[name]), name  # the same recompute from the same input


def test_compiled_layers_offload_the_same_inputs_to_the_same_gradients():
    """`train.compile` and `offload_checkpoints` together (a few seconds of compiling)."""
    model = tiny_lora(0.0)
    batches = [torch.randint(0, 1000, (1, 700))]
    kept_losses, kept, _ = train_grads(model, batches, offloaded=False)
    losses, grads, offloader = train_grads(model, batches, offloaded=True, compiled=True)
    assert offloader.offloaded == LAYERS
    assert losses == pytest.approx(kept_losses, abs=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, kept[name], rtol=1e-4, atol=1e-6)


def test_pack_moves_the_layer_input_and_unpack_returns_its_values():
    offloader = offload.Offloader("cpu")
    hidden = torch.randn(2, 600, 256)  # 1.2 MB: offloaded (64 KiB and up)
    saved = offloader.pack(hidden)
    assert isinstance(saved, offload._Saved)
    assert saved.host.data_ptr() != hidden.data_ptr()  # its own copy: the input may go
    back = offloader.unpack(saved)
    assert torch.equal(back, hidden)
    marker = torch.empty(0, requires_grad=True)  # checkpoint's own empty input stays put
    assert offloader.pack(marker) is marker and offloader.offloaded == 1


def test_install_needs_checkpointing_turned_on():
    model = tiny_lora(0.0)
    assert offload.install(model, "cpu") is None  # no layer checkpoints: nothing to route


def test_the_config_asks_for_checkpointing_with_it():
    with pytest.raises(ConfigError, match="fix: --set train.gradient_checkpointing=true"):
        load_config(None, ["train.offload_checkpoints=true"], for_training=True)
    both = ["train.offload_checkpoints=true", "train.gradient_checkpointing=true"]
    cfg = load_config(None, both, for_training=True)
    assert cfg.train.offload_checkpoints


def test_the_plan_turns_it_on_for_cuda_only():
    t = TrainConfig(gradient_checkpointing=True, offload_checkpoints=True)
    assert not fastpath.make_plan(t, "cpu").offload_checkpoints  # host to host: nothing saved


@pytest.mark.gpu
def test_offload_on_a_gpu_lowers_peak_memory_and_keeps_the_gradients():
    """8 layers of hidden 2048 at 8,192 tokens: each layer input is 32 MiB in bf16."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=2000, dtype="bfloat16",
    )  # fmt: skip
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, lora)
    batches = [torch.randint(0, 2000, (1, 8192)) for _ in range(2)]
    peaks = {}
    results = {}
    for offloaded in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        results[offloaded] = train_grads(model, batches, offloaded, "cuda")
        peaks[offloaded] = torch.cuda.max_memory_allocated()
    (kept_losses, kept, _), (losses, grads, offloader) = results[False], results[True]
    assert offloader.offloaded == 8 * 2
    # flash attention's backward adds in no fixed order on a GPU: equal within that noise;
    # an input restored wrong or too early (a stream race) is far outside it
    assert losses == pytest.approx(kept_losses, rel=1e-3)
    for name, grad in grads.items():
        error = (grad.float() - kept[name].float()).norm() / kept[name].float().norm()
        assert error < 1e-2, (name, float(error))
    one_input = 8192 * 2048 * 2
    saved = peaks[False] - peaks[True]
    print(f"\npeak {peaks[False] / 2**20:.0f} MiB kept, {peaks[True] / 2**20:.0f} offloaded")
    assert saved >= 4 * one_input  # 8 inputs held before, at most 2 (+ one in flight) now
