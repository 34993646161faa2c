"""The kernels the training plan switches on (tasks/train/fastpath.py decides which).

Each one computes exactly what the plain PyTorch / transformers path computes, only
cheaper; tests/test_fastpath.py compares each against that path on CPU.

- `llmft_varlen` attention: causal attention within each record of a packed row, read
  from the row's record boundaries (flash varlen on CUDA, one SDPA call per record
  elsewhere).
- fused LoRA: y = x Wᵀ + s·(x Aᵀ) Bᵀ as two GEMMs, the low-rank update added in the
  second one's epilogue.
- the LM head fused with the loss: hidden states at labelled positions only, logits a
  chunk at a time (or Liger's kernel), gradients computed in the forward pass.

The loss that calls them, and the batches they read, are tasks/train/batches.py.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

ATTN_NAME = "llmft_varlen"


# --------------------------------------------------------------------------- attention


def flash_varlen_ok() -> bool:
    """PyTorch's flash kernel is usable here (CUDA, and not turned off)."""
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

    Record boundaries come as `cu_seq_lens_q` from `batches.loss_sum`; a packed row that arrives
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
    base = unwrap(model)
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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
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
        compute_dtype(x),
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


def unwrap(model: Any) -> Any:
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


class HeadBypass:
    """While active, the LM head returns its input, so the model's `logits` are the final
    hidden states and the loss applies the head itself, at labelled positions only. Only
    the module's forward is shadowed: its weights and state dict stay as they are."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.head = head

    def __enter__(self) -> None:
        self.head.forward = types.MethodType(lambda _self, x: x, self.head)

    def __exit__(self, *exc: object) -> None:
        del self.head.forward


def plain_head(model: Any) -> bool:
    """A head the fused loss computes exactly: a bias-free linear layer, with no logit
    softcapping or scaling after it."""
    base = unwrap(model)
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    head = base.get_output_embeddings()
    return type(head) is torch.nn.Linear and head.bias is None and hasattr(base, "get_decoder")
