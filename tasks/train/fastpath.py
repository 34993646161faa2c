"""GPU training fast path: what makes a step cheap, each part behind a config switch.

Where a step's time goes on one H100 for a 1.2B Llama and LoRA (bench/NOTES.md):
4·N ≈ 4.9 GFLOP per trained token is ~6 µs at the measured ~800 TFLOP/s bf16 matmul
rate, and the usual setup spends several times that on padding, fp32 logits over a 128k
vocabulary, unfused norms/activations, and LoRA's side branch casting its input to fp32.
The levers, and the switch behind each (`train.*` in the config):

| lever                                                         | switch                      |
| ------------------------------------------------------------- | --------------------------- |
| padding-free rows, varlen flash attention keyed on record boundaries | `packing` (GPU recipes: on) |
| micro-batches filled to a token budget sized to GPU memory    | `packing`                   |
| LoRA as one autograd function: low-rank update added in the GEMM epilogue | `lora.dropout: 0` |
| loss fused with the LM head, only at labelled positions        | always on CUDA              |
| Liger RMSNorm, SwiGLU, RoPE (and its fused linear CE)          | `liger: auto`               |
| fused AdamW                                                   | always on CUDA              |
| torch.compile of each decoder layer                           | `compile` (off)             |
| gradient checkpointing                                        | `gradient_checkpointing`, or on by itself when the estimate says the batch won't fit |

The training loop (tasks/train/loop.py) calls `prepare(model, cfg, device)` once; when the plan
says `batches`, it forms each step's micro-batches with `micro_batches` (their number may
differ from grad_accum: the loop tells accelerate) and takes each micro-batch's summed loss
from `loss_sum`, which always runs the top-level module's forward (DDP hooks, compile and
peft see a normal call). On a CPU, for prefix tuning, and under DeepSpeed where a lever
would read partitioned weights, the plan turns that lever off and the loop's own path runs.
"""

from __future__ import annotations

import importlib.util
import logging
import types
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tasks.train.packing import IGNORE

log = logging.getLogger(__name__)

ATTN_NAME = "llmft_varlen"


@dataclass
class Plan:
    """Which levers are on for this run; written to the metrics so a run says how it ran."""

    device: str
    batches: bool  # micro-batches come from `micro_batches`, losses from `loss_sum`
    packing: bool
    rows: int | None  # micro-batches per step fixed (DeepSpeed), else None: token budget
    attention: str  # llmft_varlen (flash varlen) | sdpa (block-diagonal mask) | unchanged
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
    batches = cuda and method != "ptuning"  # prefixes need the loop's padded path
    packing = batches and bool(train_cfg.packing)
    want_liger = train_cfg.liger is True or (train_cfg.liger == "auto" and cuda)
    liger = want_liger and liger_available() and _liger_supports(model)
    if train_cfg.liger is True and not liger:
        log.warning("train.liger=true but liger-kernel is not usable here; running without it")
    plain_head = model is None or _plain_head(model)
    # ZeRO-3 gathers a module's weights only around that module's own forward; the fused
    # LoRA and the fused loss read weights outside it, so under DeepSpeed both stay off
    fused = batches and not deepspeed
    attention = "unchanged"
    if packing:
        attention = ATTN_NAME if _flash_varlen_ok() else "sdpa"
    return Plan(
        device=dev.type,
        batches=batches,
        packing=packing,
        rows=train_cfg.grad_accum if deepspeed else None,
        attention=attention,
        fused_lora=fused and method in ("lora", "qlora") and train_cfg.lora.dropout == 0.0,
        fused_loss=("liger" if liger else "chunked") if fused and plain_head else "off",
        liger=liger,
        fused_adamw=cuda and not deepspeed,
        compile=bool(train_cfg.compile),
        gradient_checkpointing=bool(train_cfg.gradient_checkpointing),
        token_budget=train_cfg.batch_size * train_cfg.cutoff_len,
        compute_dtype=_precision_dtype(train_cfg.precision, dev),
    )


def _precision_dtype(precision: str, device: torch.device) -> str:
    if device.type != "cuda" or precision == "fp32":
        return "float32"
    if precision == "auto":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return {"bf16": "bfloat16", "fp16": "float16"}[precision]


# --------------------------------------------------------------------------- attention


def _flash_varlen_ok() -> bool:
    return torch.cuda.is_available() and torch.backends.cuda.flash_sdp_enabled()


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    max_len: int,
    scale: float | None,
) -> torch.Tensor:
    """Causal attention within each record of a packed row. q: (T, Hq, D), k/v: (T, Hkv, D).

    On CUDA: the flash kernel PyTorch ships, in its variable-length form (the same kernel
    as SDPA's flash backend; grouped-query heads natively; differentiable). Elsewhere, and
    for dtypes flash does not take: one SDPA call per record (the reference).
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
        )[0]
        return out
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:], strict=False):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=ks.shape[0] != qs.shape[0]
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, dim=0)


def _attention_interface(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """transformers attention function: varlen on packed rows, SDPA on anything else.

    Record boundaries come as `cu_seq_lens_q` from `loss_sum`; a packed row that arrives
    without them (no mask, positions restarting at 0) has them derived from its
    position_ids (one device sync per layer: correct, not fast).
    """
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None and attention_mask is None and query.shape[0] == 1 and query.shape[2] > 1:
        cu, max_len = _boundaries(kwargs.get("position_ids"), query.shape[2])
    if cu is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if torch.is_autocast_enabled(query.device.type):
        # an fp32 residual stream (full fine-tuning, k-bit prepared bases) makes RoPE's
        # q, k fp32; flash takes bf16/fp16, as SDPA would under autocast
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    # transformers hands (1, H, T, D); flash wants (T, H, D) with the last dim contiguous.
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = varlen_attention(q, k, v, cu, int(max_len), scaling)
    return out.unsqueeze(0), None  # (1, T, H, D), as sdpa_attention_forward returns


def _boundaries(position_ids: Any, length: int) -> tuple[Any, int | None]:
    """cu_seq_lens of a packed row from its position_ids (records restart at 0)."""
    if position_ids is None:
        return None, None
    starts = (position_ids[0] == 0).nonzero().flatten()
    if starts.numel() < 2:
        return None, None  # one sequence: plain causal attention is right
    end = torch.tensor([length], device=starts.device)
    cu = torch.cat([starts, end]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def register_attention() -> None:
    """Make `llmft_varlen` an attention implementation transformers can dispatch to.

    A padded batch (evaluation, generation) gets SDPA's mask. A row without padding gets
    none: packed rows carry their boundaries as `cu_seq_lens_q` (or position_ids), and
    building transformers' block-diagonal T×T mask for them would cost T² bytes and
    int64 temporaries of 8·T² (2 GiB each at T = 16 k) for nothing.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        if attention_mask is None:
            return None
        return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(ATTN_NAME, _attention_interface)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, mask)


def set_attention(model: Any, name: str) -> str:
    """Switch every config in the model to attention `name`; returns the previous one."""
    base = _unwrap(model)
    previous = base.config._attn_implementation
    if name == ATTN_NAME:
        register_attention()
    base.set_attn_implementation(name)
    return previous


# --------------------------------------------------------------------------- fused LoRA


class _LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with frozen W, as two GEMMs and one epilogue.

    The usual path (peft under autocast) casts x to the adapter's fp32 and back, writes
    B's output, scales it, then adds it to y: five passes over (tokens × out) or
    (tokens × in) tensors per projection, each way. Here the low-rank update is added by
    the second GEMM itself (addmm with beta=1, alpha=s), and backward adds the low-rank
    part of dx the same way. Only x and the (tokens × r) product are kept for backward.
    `weight_fn` returns W in the compute dtype (a 4-bit base dequantizes here, forward and
    backward, as bitsandbytes does itself).
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scale, base, dtype):  # noqa: D102
        w = _base_weight(base, dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        xa = x2 @ a.t()  # (M, r)
        y = F.linear(x2, w, None if base.bias is None else base.bias.to(dtype))
        y = torch.addmm(y, xa, b.t(), alpha=scale)
        # the adapters in the compute dtype are kept (r × (in + out) values: nothing) so
        # backward does not cast them again: 224 fewer kernels a step on a 16-layer model
        ctx.save_for_backward(x2, xa, a, b)
        ctx.base, ctx.scale, ctx.dtype, ctx.x_dtype = base, scale, dtype, x.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        x2, xa, a, b = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scale
        g = gy.reshape(-1, gy.shape[-1]).to(dtype)
        gxa = (g @ b) * s  # (M, r)
        grad_b = (g.t() @ xa) * s  # (out, r)
        grad_a = gxa.t() @ x2  # (r, in)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.addmm(g @ _base_weight(ctx.base, dtype), gxa, a)
            gx = gx.reshape(*gy.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        return gx, grad_a.to(ctx.a_dtype), grad_b.to(ctx.b_dtype), None, None, None


def _base_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Linear4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).to(dtype)
    return weight.to(dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _fused_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or len(active) != 1 or args or kwargs:
        return self._llmft_peft_forward(x, *args, **kwargs)
    name = active[0]
    return _LoraLinear.apply(
        x,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        self.scaling[name],
        self.base_layer,
        _compute_dtype(x),
    )


def _fusable(module: torch.nn.Module) -> bool:
    """A peft LoRA linear whose forward is exactly y = base(x) + s·B(A(x))."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    if not isinstance(module, LoraLayer) or getattr(module, "fan_in_fan_out", False):
        return False
    if type(module).__name__ not in ("Linear", "Linear4bit"):
        return False
    base = module.base_layer
    if base.weight.requires_grad or getattr(module, "lora_variant", {}):
        return False
    quantized = type(base).__name__ == "Linear4bit"
    if not quantized and not isinstance(base, torch.nn.Linear):
        return False
    return all(isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values())


def fuse_lora(model: torch.nn.Module) -> int:
    """Route each eligible LoRA linear through `_LoraLinear`; returns how many."""
    n = 0
    for module in model.modules():
        if _fusable(module) and not hasattr(module, "_llmft_peft_forward"):
            module._llmft_peft_forward = module.forward
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    return n


# --------------------------------------------------------------------------- loss


class _ChunkedLinearCE(torch.autograd.Function):
    """sum over rows of CE(h Wᵀ, y), never holding more than `chunk` rows of logits.

    Gradients are computed in the forward pass, chunk by chunk (softmax − onehot), as
    Liger's fused linear cross-entropy does; this is its plain-PyTorch stand-in for when
    liger-kernel is not installed, and runs on CPU for the tests. Logits are computed in
    the input dtype and reduced in fp32, as the usual `logits.float()` path does.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):  # noqa: D102
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 in the tests
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start : start + chunk], targets[start : start + chunk]
            logits = (hc @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if grad_h is None and grad_w is None:
                continue
            probs = torch.exp_(logits.sub_(lse[:, None]))
            probs[torch.arange(len(yc), device=h.device), yc] -= 1.0
            p = probs.to(h.dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = p @ weight
            if grad_w is not None:
                grad_w.add_(p.t() @ hc)  # GEMM in the input dtype, summed in fp32
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * g.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * g).to(ctx.w_dtype)
        return gh, gw, None, None


def linear_cross_entropy_sum(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, impl: str = "chunked"
) -> torch.Tensor:
    """Σ cross-entropy(h · weightᵀ, targets) over rows, without the full logits tensor."""
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        # a trained head (full fine-tuning) accumulates its gradient over chunks in fp32
        accum = torch.float32 if weight.requires_grad else None
        return LigerFusedLinearCrossEntropyLoss(reduction="sum", accum_dtype=accum)(
            weight, h, targets
        )
    # 4096 rows × 128k vocab × 4 bytes = 2 GiB of logits at a time, at most
    chunk = max(256, (1 << 31) // (4 * weight.shape[0]))
    return _ChunkedLinearCE.apply(h, weight, targets, chunk)


def _unwrap(model: Any) -> Any:
    """The transformers model inside DDP, torch.compile and peft wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


class _HeadBypass:
    """While active, the LM head returns its input, so the model's `logits` are the final
    hidden states and the loss applies the head itself, at labelled positions only. Only
    the module's forward is shadowed: its weights and state dict stay as they are."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.head = head

    def __enter__(self) -> None:
        self.head.forward = types.MethodType(lambda _self, x: x, self.head)

    def __exit__(self, *exc: object) -> None:
        del self.head.forward


def _plain_head(model: Any) -> bool:
    base = _unwrap(model)
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    head = base.get_output_embeddings()
    return type(head) is torch.nn.Linear and head.bias is None and hasattr(base, "get_decoder")


def loss_sum(model: Any, batch: dict[str, Any], plan: Plan) -> torch.Tensor:
    """Summed token cross-entropy of one micro-batch (divide by the step's target count).

    Fused: the model's own forward with the head bypassed; the hidden states at labelled
    positions only (prompt tokens never reach the 128k-wide head) then go through the loss
    fused with the head. Otherwise: full logits and plain cross-entropy. Both read the
    same per-record shifted labels.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "cu_seq_lens_q" in batch and plan.attention == ATTN_NAME:
        for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            inputs[k] = batch[k]
    if plan.fused_loss == "off":
        logits = model(**inputs, use_cache=False).logits
        logits = logits.float().reshape(-1, logits.shape[-1])
        labels = batch["shift_labels"].reshape(-1)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    head = _unwrap(model).get_output_embeddings()
    with _HeadBypass(head):
        hidden = model(**inputs, use_cache=False).logits
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
    # outside autocast the hidden states arrive in fp32 (accelerate's output conversion):
    # the head's matmuls in fp32 would be ~10× slower than in bf16 (2·d·V = 0.5 GFLOP per
    # labelled token each way at 128k vocabulary), so they run in the training's dtype
    dtype = _compute_dtype(h)
    if not torch.is_autocast_enabled(h.device.type) and plan.compute_dtype is not None:
        dtype = getattr(torch, plan.compute_dtype)
    return linear_cross_entropy_sum(
        h.to(dtype), head.weight.to(dtype), batch["targets"], plan.fused_loss
    )


def micro_batches(
    records: list[dict[str, Any]], plan: Plan, batch_size: int, pad_id: int, device: Any
) -> list[dict[str, Any]]:
    """One optimizer step's records → its micro-batches, on the device.

    Packed: balanced padding-free rows within the token budget (exactly `plan.rows` rows
    under DeepSpeed). Not packed: the usual rows of batch_size records, right-padded.
    """
    from tasks.train import packing

    mbs = packing.step_batches(
        records, plan.token_budget, plan.packing, pad_id, batch_size=batch_size, rows=plan.rows
    )
    # from pinned memory a copy is queued behind the GPU's work; from pageable memory
    # the host would wait for the GPU to drain first and the GPU then for the host
    pin = torch.device(device).type == "cuda"
    return [
        {
            k: (v.pin_memory() if pin else v).to(device, non_blocking=True)
            if torch.is_tensor(v)
            else v
            for k, v in mb.items()
        }
        for mb in mbs
    ]


# --------------------------------------------------------------------------- setup


def _liger_supports(model: Any) -> bool:
    if model is None:
        return True
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return _unwrap(model).config.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def apply_liger(model: Any) -> None:
    """Liger's Triton RMSNorm, SwiGLU and RoPE on this model instance (loss is ours)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=_unwrap(model),
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
    """Tokens per micro-batch: as many as 60% of the GPU holds after weights, gradients and
    AdamW states, capped by a step's worst case (batch_size × grad_accum × cutoff_len),
    and never below batch_size × cutoff_len (what a padded micro-batch may hold).

    Why big: per micro-batch the host issues ~10 k kernel launches whatever its size; at
    8 k tokens a 1B model's step on an H100 waited on the host (bench/NOTES.md), so
    fewer, fuller micro-batches buy speed. The maths is unchanged: the loss is a token
    mean over the whole step however its tokens are split.
    """
    floor = train_cfg.batch_size * train_cfg.cutoff_len
    if device.type != "cuda":
        return floor
    total = torch.cuda.get_device_properties(device).total_memory
    base = _unwrap(model)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    spare = 0.6 * total - weights - 12 * trainable
    fit = int(spare / max(1, activation_bytes(base.config, 1))) if spare > 0 else 0
    return max(floor, min(fit, floor * train_cfg.grad_accum))


def needs_checkpointing(model: Any, tokens: int, device: torch.device) -> bool:
    """True when weights, gradients and AdamW states plus one micro-batch's activations
    would exceed 90% of the GPU's memory."""
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    base = _unwrap(model)
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
    if plan.batches and plan.rows is None:
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
        _unwrap(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    log.info("fast path: %s", plan.describe())
    return plan


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
