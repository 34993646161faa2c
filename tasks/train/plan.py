"""`llmft plan`: GPU memory per method and ZeRO stage for a config, before renting the GPU.

The model is built on PyTorch's meta device from its config.json (no weights, no memory),
so parameter counts are exact for any architecture, and the method's trainable count is
what peft itself creates. Then, per GPU, in bytes (N parameters, T of them trained, G GPUs):

    no ZeRO (one GPU or DDP), PyTorch autocast, as tasks/train/loop.py trains:
        weights    frozen part: 2 (bf16) or qlora's ~0.52 (NF4 + double-quant scales);
                   trained part: 4 (fp32 master copy)
        gradients  4·T (fp32)          optimizer  8·T (AdamW m and v, fp32)
        → full fine-tuning: 4 + 4 + 8 = 16 bytes per parameter
    DeepSpeed keeps bf16 weights and gradients, and fp32 master weights + m + v (12 bytes)
    in the optimizer, partitioned over the G GPUs:
        ZeRO-2             weights 2·N (every GPU)     gradients 2·T/G   optimizer 12·T/G
        ZeRO-2 + offload   weights 2·N                 optimizer and fp32 gradients in CPU
                                                       RAM: 16·T on the host
        ZeRO-3             weights 2·N/G + the gathered working set (two of the largest
                           layer, 2 bytes each: the current and the prefetched one)
                           gradients 2·T/G             optimizer 12·T/G
        ZeRO-3 + offload   working set only on the GPU; weights and optimizer in CPU RAM
    activations, per token of a micro-batch (batch_size × cutoff_len tokens), bf16:
        per layer 7·h + 3·kv + 4·i values (norm in/out twice, q k v, rotated q k, attention
        output, MLP gate, up, act(gate), act·up), × 2 bytes, × layers
        + 10·V bytes for the logits (bf16 logits, their fp32 copy, the fp32 gradient)
        with gradient checkpointing: 2·h bytes per layer (each layer's input) + one layer;
        its inputs offloaded (offload_checkpoints): two layers' inputs, the rest in CPU RAM
    + 1 GiB for the CUDA context and allocator slack.
qlora with ZeRO-3 is not offered: 4-bit weights cannot be partitioned.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import Config, UserError

GIB = 2**30
CONTEXT_BYTES = 1 * GIB
METHODS = ("lora", "qlora", "full", "ptuning")
SETUPS = ("none", "zero2", "zero2+offload", "zero3", "zero3+offload")
NF4_DOUBLE_QUANT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit + 8-bit absmax per 64 + fp32 per 256·64
NF4 = 0.5 + 4 / 64  # 4-bit + an fp32 absmax per block of 64
INT8 = 1.0


@dataclass
class Shape:
    params: int
    quantizable: int  # decoder linear weights (what bitsandbytes quantizes)
    largest_layer: int  # largest module ZeRO-3 gathers at once (a decoder layer or the embedding)
    hidden: int
    kv: int
    intermediate: int
    layers: int
    vocab: int


@dataclass
class Row:
    method: str
    setup: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    cpu: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + CONTEXT_BYTES


def model_config(cfg: Config) -> Any:
    """The base model's transformers config, without loading or converting weights."""
    from transformers import AutoConfig

    from tasks import base

    name = cfg.base.model
    trust = cfg.base.trust_remote_code
    if name in base.BUNDLED:
        gguf = base.bundled_gguf(name)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if (Path(name) / "config.json").is_file():
        return AutoConfig.from_pretrained(name, trust_remote_code=trust)
    try:
        return AutoConfig.from_pretrained(name, revision=cfg.base.revision, trust_remote_code=trust)
    except OSError as exc:
        raise UserError(
            f"base.model={name!r}: no config.json here and the hub is unreachable "
            "(fix: point base.model at a folder with config.json)"
        ) from exc


def meta_model(config: Any, cfg: Config, method: str) -> tuple[Shape, int]:
    """(shape, trainable parameters) of the model as `method` would train it."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.train import methods

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings()
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
        layers = model.get_decoder().layers
        largest = max(
            max(sum(p.numel() for p in layer.parameters()) for layer in layers),
            model.get_input_embeddings().weight.numel(),
        )
        shape = Shape(
            params=sum(p.numel() for p in model.parameters()),
            quantizable=sum(m.weight.numel() for m in linear),
            largest_layer=largest,
            hidden=config.hidden_size,
            kv=config.hidden_size * config.num_key_value_heads // config.num_attention_heads,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
        )
        if method == "full":
            return shape, shape.params
        t = cfg.train
        if method == "ptuning":
            from peft import PrefixTuningConfig, TaskType, get_peft_model

            peft_cfg = PrefixTuningConfig(
                task_type=TaskType.CAUSAL_LM,
                num_virtual_tokens=t.ptuning.pre_seq_len,
                prefix_projection=t.ptuning.prefix_projection,
            )
        else:
            peft_cfg = methods._lora_config(t)
            from peft import get_peft_model
        with warnings.catch_warnings():  # transformers' deprecation notice inside peft
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, peft_cfg)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return shape, trainable


def activation_bytes(
    shape: Shape, tokens: int, checkpointing: bool, offload: bool = False
) -> float:
    per_layer = 2 * (7 * shape.hidden + 3 * shape.kv + 4 * shape.intermediate)
    logits = 10 * shape.vocab
    if checkpointing:
        # offloaded, two inputs are on the GPU: the one in backward and the prefetched one
        kept = min(2, shape.layers) if offload else shape.layers
        return tokens * (2 * shape.hidden * kept + per_layer + logits)
    return tokens * (per_layer * shape.layers + logits)


def offloaded_bytes(shape: Shape, tokens: int) -> float:
    """Host memory the offloaded layer inputs take (pinned)."""
    return tokens * 2 * shape.hidden * shape.layers


def estimate(method: str, setup: str, shape: Shape, trained: int, cfg: Config, gpus: int) -> Row:
    n, t, g = shape.params, trained, gpus
    if method == "full":
        frozen = 0.0
    elif method == "qlora":
        q = (
            INT8
            if cfg.train.quant.bits == 8
            else NF4_DOUBLE_QUANT
            if cfg.train.quant.double_quant
            else NF4
        )
        frozen = q * shape.quantizable + 2 * (n - shape.quantizable)
    else:
        frozen = 2.0 * n
    tokens = cfg.train.batch_size * cfg.train.cutoff_len
    checkpointing = cfg.train.gradient_checkpointing
    offload = checkpointing and cfg.train.offload_checkpoints
    act = activation_bytes(shape, tokens, checkpointing, offload)
    host = offloaded_bytes(shape, tokens) if offload else 0.0
    working_set = 2 * 2 * shape.largest_layer
    if setup == "none":
        return Row(method, setup, frozen + 4 * t, 4 * t, 8 * t, act, host)
    if setup == "zero2":
        return Row(method, setup, frozen + 2 * t, 2 * t / g, 12 * t / g, act, host)
    if setup == "zero2+offload":
        return Row(method, setup, frozen + 2 * t, 0, 0, act, host + 16 * t)
    if setup == "zero3":
        return Row(
            method, setup, (frozen + 2 * t) / g + working_set, 2 * t / g, 12 * t / g, act, host
        )
    return Row(method, setup, working_set, 0, 0, act, host + 16 * t + frozen + 2 * t)


def configured_setup(cfg: Config) -> str:
    name = (cfg.train.accelerate_config or "").lower()
    stage = "zero3" if "zero3" in name else "zero2" if "zero2" in name else "none"
    return f"{stage}+offload" if "offload" in name and stage != "none" else stage


def plan(cfg: Config, gpus: int = 1) -> tuple[Shape, dict[str, int], list[Row]]:
    config = model_config(cfg)
    rows, trained = [], {}
    shape = None
    for method in METHODS:
        shape, trained[method] = meta_model(config, cfg, method)
        for setup in SETUPS:
            if method == "qlora" and setup.startswith("zero3"):
                continue
            rows.append(estimate(method, setup, shape, trained[method], cfg, gpus))
    return shape, trained, rows


def checkpointing_words(t: Any) -> str:
    if not t.gradient_checkpointing:
        return "off"
    return "on, inputs offloaded to CPU" if t.offload_checkpoints else "on"


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def print_plan(cfg: Config, gpu_gib: float, num_gpus: int) -> None:
    shape, trained, rows = plan(cfg, num_gpus)
    t = cfg.train
    tokens = t.batch_size * t.cutoff_len
    print(
        f"model {cfg.base.model}: {shape.params / 1e6:.1f}M parameters, {shape.layers} layers, "
        f"hidden {shape.hidden}, vocab {shape.vocab}"
    )
    print(
        f"micro-batch {t.batch_size} × {t.cutoff_len} = {tokens} tokens, bf16, gradient "
        f"checkpointing {checkpointing_words(t)}; {num_gpus} GPU(s) of "
        f"{gpu_gib:g} GiB; GiB per GPU (CPU: host RAM for offload)"
    )
    print("trained: " + ", ".join(f"{m} {trained[m] / 1e6:.2f}M" for m in METHODS))
    mine = (t.method, configured_setup(cfg))
    header = ["method", "ZeRO", "weights", "grads", "optim", "activ.", "total", "CPU", "fits"]
    table = [header]
    for r in rows:
        fits = "yes" if r.total <= gpu_gib * GIB else "no"
        mark = "  ← this config" if (r.method, r.setup) == mine else ""
        table.append(
            [r.method, r.setup, _gib(r.weights), _gib(r.gradients), _gib(r.optimizer),
             _gib(r.activations), _gib(r.total), _gib(r.cpu), fits + mark]
        )  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
