"""The training plan: which kernels a run uses, each behind a config switch.

There is one batch path (tasks/train/batches.py: packing, padding, shifted labels, the
loss), on CPU and GPU alike; the plan only picks the kernels it calls. Where a GPU
step's time goes, for a 1.2B Llama and LoRA on one H100 (bench/NOTES.md): 4·N ≈ 4.9
GFLOP per trained token is ~6 µs at the measured ~800 TFLOP/s bf16 matmul rate, and the
usual setup spends several times that on padding, fp32 logits over a 128k vocabulary,
unfused norms/activations, and LoRA's side branch casting its input to fp32. The levers,
the switch behind each (`train.*` in the config) and where they run:

| lever                                                    | switch                 | where   |
| -------------------------------------------------------- | ---------------------- | ------- |
| padding-free rows; attention kept within each record     | `packing`              | all     |
| ... from the record boundaries by flash varlen (kernels.py) | `packing`           | CUDA    |
| micro-batches filled to a token budget sized to memory   | `packing`, `gpu_memory_share` | CUDA |
| LoRA as one autograd function, update in the GEMM epilogue | `lora.dropout: 0`    | all     |
| loss fused with the LM head, only at labelled positions  | always                 | all     |
| Liger RMSNorm, SwiGLU, RoPE (and its fused linear CE)    | `liger: auto`          | CUDA    |
| fused AdamW                                              | always                 | CUDA    |
| torch.compile of each decoder layer (regional, dynamic shapes) | `compile` (off)  | all     |
| gradient checkpointing                                   | `gradient_checkpointing`, or on by itself when the estimate says the batch won't fit | all |
| ... its saved layer inputs in pinned CPU memory (offload.py) | `offload_checkpoints` | CUDA |

The kernels are plain PyTorch where no CUDA is needed, so a CPU run (and `make test`)
goes through the same code as a GPU run; only flash, Liger and fused AdamW are CUDA's.
Under DeepSpeed, where a lever would read partitioned weights, the plan turns it off.
The loop (tasks/train/loop.py) calls `prepare(model, cfg, device)` once, before
accelerate wraps the model.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tasks.train import offload
from tasks.train.kernels import (
    ATTN_NAME,
    flash_varlen_ok,
    fuse_lora,
    plain_head,
    set_attention,
    unwrap,
)

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Which levers are on for this run; written to the metrics so a run says how it ran."""

    device: str
    packing: bool
    rows: int | None  # micro-batches per step fixed (DeepSpeed), else None: token budget
    # llmft_varlen (record boundaries, flash varlen), or the model's own implementation
    # (sdpa, eager: a block-diagonal mask from the position ids)
    attention: str
    fused_lora: bool
    fused_loss: str  # liger | chunked | off
    liger: bool
    fused_adamw: bool
    compile: bool
    gradient_checkpointing: bool
    token_budget: int
    # the loss's matmul dtype when it runs outside autocast (accelerate autocasts only the
    # model's forward and hands back fp32 outputs); None: the hidden states' own dtype
    compute_dtype: str | None = None
    offload_checkpoints: bool = False  # the checkpointed layer inputs wait in host memory

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def make_plan(
    train_cfg: Any, device: torch.device | str, model: Any = None, deepspeed: bool = False
) -> Plan:
    """Decide the levers from the config (`TrainConfig`), the device and the model."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    method = train_cfg.method
    want_liger = train_cfg.liger is True or (train_cfg.liger == "auto" and cuda)
    liger = want_liger and liger_available() and _liger_supports(model)
    if train_cfg.liger is True and not liger:
        log.warning("train.liger=true but liger-kernel is not usable here; running without it")
    # ZeRO-3 gathers a module's weights only around that module's own forward; the fused
    # LoRA and the fused loss read weights outside it, so under DeepSpeed both stay off
    fused = not deepspeed
    packing = bool(train_cfg.packing)
    attention = "unchanged" if model is None else unwrap(model).config._attn_implementation
    if packing and flash_varlen_ok():
        attention = ATTN_NAME
    return Plan(
        device=dev.type,
        packing=packing,
        rows=train_cfg.grad_accum if deepspeed else None,
        attention=attention,
        fused_lora=fused and method in ("lora", "qlora") and train_cfg.lora.dropout == 0.0,
        fused_loss=("liger" if liger else "chunked")
        if fused and (model is None or plain_head(model))
        else "off",
        liger=liger,
        fused_adamw=cuda and not deepspeed,
        compile=bool(train_cfg.compile),
        gradient_checkpointing=bool(train_cfg.gradient_checkpointing),
        offload_checkpoints=cuda and bool(train_cfg.offload_checkpoints),
        token_budget=train_cfg.batch_size * train_cfg.cutoff_len,
        compute_dtype=_precision_dtype(train_cfg.precision, dev),
    )


def _precision_dtype(precision: str, device: torch.device) -> str:
    if device.type != "cuda" or precision == "fp32":
        return "float32"
    if precision == "auto":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return {"bf16": "bfloat16", "fp16": "float16"}[precision]


# --------------------------------------------------------------------------- applying it


def _liger_supports(model: Any) -> bool:
    if model is None:
        return True
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return unwrap(model).config.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def apply_liger(model: Any) -> None:
    """Liger's Triton RMSNorm, SwiGLU and RoPE on this model instance (loss is ours)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=unwrap(model),
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )


def activation_bytes(config: Any, tokens: int) -> int:
    """Saved activations for `tokens` tokens in bf16 without checkpointing.

    Per layer and token: norm in/out (2d), q and rotated k (d + kv), v (kv), attention out
    (d), residual and post-norm (2d), the o_proj input (d), gate, up and their product (3i):
    7d + 2kv + 3i values. 1B config: (14336 + 1024 + 24576) × 2 B × 16 ≈ 1.3 MB per token.
    """
    d = config.hidden_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * (7 * d + 2 * kv + 3 * config.intermediate_size)
    return int(per_token * tokens * 1.2)  # 20% for what the count leaves out


def token_budget(model: Any, train_cfg: Any, device: torch.device) -> int:
    """Tokens per micro-batch: as many as `gpu_memory_share` of the GPU (0.6 by default)
    holds after weights, gradients and AdamW states, capped by a step's worst case
    (batch_size × grad_accum × cutoff_len), and never below batch_size × cutoff_len (what
    a padded micro-batch may hold). With gradient checkpointing asked for in the config,
    memory is the point: the floor.

    Why big: per micro-batch the host issues ~10 k kernel launches whatever its size; at
    8 k tokens a 1B model's step on an H100 waited on the host (bench/NOTES.md), so
    fewer, fuller micro-batches buy speed. The maths is unchanged: the loss is a token
    mean over the whole step however its tokens are split.
    """
    floor = train_cfg.batch_size * train_cfg.cutoff_len
    if device.type != "cuda" or train_cfg.gradient_checkpointing:
        return floor  # checkpointing asked for (QLoRA recipe): memory before speed
    total = torch.cuda.get_device_properties(device).total_memory
    base = unwrap(model)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    spare = train_cfg.gpu_memory_share * total - weights - 12 * trainable
    fit = int(spare / max(1, activation_bytes(base.config, 1))) if spare > 0 else 0
    return max(floor, min(fit, floor * train_cfg.grad_accum))


def needs_checkpointing(model: Any, tokens: int, device: torch.device) -> bool:
    """True when weights, gradients and AdamW states plus one micro-batch's activations
    would exceed 90% of the GPU's memory."""
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    base = unwrap(model)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    states = trainable * 12  # fp32 gradient + two AdamW moments
    return weights + states + activation_bytes(base.config, tokens) > 0.9 * total


def prepare(
    model: Any, train_cfg: Any, device: torch.device | str, deepspeed: bool = False
) -> Plan:
    """Apply the levers to a freshly built (peft-wrapped) model; returns the plan.

    Call before accelerate wraps the model. torch.compile stays with the loop
    (`train.compile`). Checkpointing is turned on here only when the config left it off
    and the micro-batch would not fit without it.
    """
    device = torch.device(device)
    plan = make_plan(train_cfg, device, model, deepspeed)
    if plan.rows is None:
        plan.token_budget = token_budget(model, train_cfg, device)
    if plan.liger:
        apply_liger(model)
    if plan.attention == ATTN_NAME:
        set_attention(model, ATTN_NAME)
    if plan.fused_lora:
        plan.fused_lora = fuse_lora(model) > 0
    if not plan.gradient_checkpointing and needs_checkpointing(model, plan.token_budget, device):
        plan.gradient_checkpointing = True
        log.warning(
            "micro-batches of %d tokens won't fit without gradient checkpointing: on",
            plan.token_budget,
        )
        unwrap(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if plan.offload_checkpoints:
        plan.offload_checkpoints = offload.install(model, device) is not None
        if not plan.offload_checkpoints:
            log.warning("train.offload_checkpoints: no layer of this model checkpoints; off")
    log.info("training plan: %s", plan.describe())
    return plan


def compile_layers(model: Any) -> int:
    """torch.compile each decoder layer in place; returns how many.

    Regional: the layers share one class and so one compiled graph, compiled once (the
    whole model would take as long per distinct shape), and shapes are dynamic from the
    start because packed micro-batches differ in length from step to step. Fewer kernel
    launches is the point: norms, residual adds and the LoRA branch fuse.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in unwrap(model).modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    if not layers:
        log.warning("train.compile: no decoder layers found in this model; not compiled")
    return len(layers)


def adamw(
    params: Any, lr: float, weight_decay: float, plan: Plan | None = None, **kwargs: Any
) -> torch.optim.Optimizer:
    """AdamW, the fused CUDA kernel when every parameter is on the GPU (one launch for
    all tensors instead of a dozen per tensor group)."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [p for p in params if p.requires_grad]
    fused = plan.fused_adamw if plan is not None else torch.cuda.is_available()
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused, **kwargs)
