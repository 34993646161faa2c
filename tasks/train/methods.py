"""The one place where the four fine-tuning methods differ.

| method  | base weights on the device         | trained (fp32)                       | saved to |
| ------- | ---------------------------------- | ------------------------------------ | -------- |
| lora    | frozen, in the compute dtype       | A, B of each targeted linear layer   | adapter/ |
| qlora   | frozen, 4-bit NF4 or 8-bit (bnb)   | A, B on top of the quantized layers  | adapter/ |
| full    | fp32 master copy, all trained      | every weight                         | model/   |
| ptuning | frozen, in the compute dtype       | prefix encoder (P-Tuning v2: a key/  | adapter/ |
|         |                                    | value prefix for every layer, made   |          |
|         |                                    | by an MLP from pre_seq_len tokens)   |          |

Everything else (data, loop, schedule, checkpoints, logging) is the same code for all four.
`check` lists config problems that need the model's config and weight names, before any
weights load; `load` builds the trainable model; `output_folder` names where it is saved.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from tasks.config import TrainConfig

ADAPTER_METHODS = ("lora", "qlora", "ptuning")


def output_folder(method: str) -> str:
    return "model" if method == "full" else "adapter"


def target_modules(cfg: TrainConfig) -> str | list[str]:
    """'all-linear', or a list of module names (a comma-separated string is split)."""
    targets = cfg.lora.target_modules
    if isinstance(targets, str):
        if targets == "all-linear":
            return targets
        targets = targets.split(",")
    return [t.strip() for t in targets if t.strip()]


def weight_names(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name → shape, from the safetensors headers alone (no weights are read).

    A safetensors file starts with an 8-byte little-endian header length, then that many
    bytes of JSON: {name: {dtype, shape, data_offsets}}.
    """
    shapes: dict[str, list[int]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        shapes |= {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    return shapes


def linear_modules(model_dir: Path) -> set[str]:
    """Module paths of the 2-D weights inside the decoder layers (…layers.0.self_attn.q_proj)."""
    modules = set()
    for name, shape in weight_names(model_dir).items():
        parts = name.split(".")
        if len(shape) == 2 and parts[-1] == "weight" and any(p.isdigit() for p in parts):
            modules.add(".".join(parts[:-1]))
    return modules


def _matches(target: str, modules: set[str]) -> bool:
    return any(m == target or m.endswith("." + target) for m in modules)  # as peft matches


def check(cfg: TrainConfig, model_dir: Path) -> list[str]:
    """Problems of the method's settings against this model (empty: fine). What the config
    alone or the machine decides (qlora needs CUDA, ...) is checked when the config is
    loaded: tasks/train_sections.py `train_problems`, tasks/machine.py `machine_problems`."""
    problems = []
    if cfg.method in ("lora", "qlora"):
        targets = target_modules(cfg)
        modules = linear_modules(model_dir)
        if targets != "all-linear" and modules:
            missing = [t for t in targets if not _matches(t, modules)]
            if missing or not targets:
                leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
                problems.append(
                    f"train.lora.target_modules={cfg.lora.target_modules!r}: "
                    f"{', '.join(missing) or 'empty'} not among this model's linear layers "
                    f"(fix: all-linear, or some of {leaves})"
                )
    return problems


def load(cfg: TrainConfig, model_dir: Path, compute_dtype: Any, device: Any) -> Any:
    """The model to train: base weights loaded, the method applied, use_cache off."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.base import trusts_remote_code

    trust = trusts_remote_code(model_dir)  # base.trust_remote_code; off unless turned on
    # ----------------------------------------------------------------- where methods differ
    if cfg.method == "full":
        # fp32 master weights; autocast runs the matmuls in bf16/fp16 on a GPU
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=trust
        )
        _after_load(model, cfg)
        return model

    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        if cfg.quant.bits == 4:
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=cfg.quant.quant_type,
                bnb_4bit_use_double_quant=cfg.quant.double_quant,
                bnb_4bit_compute_dtype=compute_dtype,
            )
        else:
            quant = BitsAndBytesConfig(load_in_8bit=True)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            quantization_config=quant,
            dtype=compute_dtype,
            device_map={"": device},
            trust_remote_code=trust,
        )
        # norms to fp32, inputs that require grad, checkpointing wired for k-bit layers
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if compute_dtype == torch.bfloat16:
            # peft upcast every frozen weight it did not quantize (embeddings, LM head,
            # norms) to fp32: frozen weights need no fp32 copy, and an fp32 embedding makes
            # the residual stream, so every checkpointed layer input, fp32 (twice the bytes)
            for param in model.parameters():
                if not param.requires_grad and param.dtype == torch.float32:
                    param.data = param.data.to(compute_dtype)
        _after_load(model, cfg, checkpointing=False)
        return _peft(model, _lora_config(cfg))

    # lora and ptuning: the frozen base needs no fp32 master copy
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=compute_dtype, trust_remote_code=trust
    )
    _after_load(model, cfg)
    if cfg.method == "lora":
        return _peft(model, _lora_config(cfg))
    if cfg.method == "ptuning":
        from peft import PrefixTuningConfig, TaskType

        prefix = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=cfg.ptuning.pre_seq_len,
            prefix_projection=cfg.ptuning.prefix_projection,
        )
        return _peft(model, prefix)
    raise ValueError(f"unknown method {cfg.method!r}")  # pydantic already rejects it
    # --------------------------------------------------------------------------------------


def _lora_config(cfg: TrainConfig) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=target_modules(cfg),
    )


def _peft(model: Any, peft_config: Any) -> Any:
    from peft import get_peft_model

    # adapter weights in fp32 whatever the base dtype (peft's autocast_adapter_dtype)
    return get_peft_model(model, peft_config)


def _after_load(model: Any, cfg: TrainConfig, checkpointing: bool = True) -> None:
    model.config.use_cache = False  # a KV cache is for generation; training only wastes it
    if checkpointing and cfg.gradient_checkpointing:
        # non-reentrant: works with frozen embeddings (LoRA) without enable_input_require_grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as one parameter each."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3: the whole, not the shard
        n *= 2 if getattr(p, "quant_state", None) is not None else 1
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
