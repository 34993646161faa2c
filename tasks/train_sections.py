"""The train section's settings: method, budget, launch, and the checks across them.

`tasks.config` assembles the sections into one `Config` and re-exports these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

from tasks.chain import ThenSettings
from tasks.chain import second_train as second
from tasks.sections import Section

ACCELERATE_DIR = Path(__file__).resolve().parent.parent / "deploy" / "accelerate"


class LoraConfig(Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="'all-linear' (every linear layer but the LM head) or module names: "
        "a list [q_proj, v_proj], or one string 'q_proj,v_proj' or 'Wqkv'.",
    )


class QuantConfig(Section):
    bits: Literal[4, 8] = Field(4, description="Base weights in 4-bit NF4 or 8-bit (qlora).")
    double_quant: bool = Field(True, description="Quantise the 4-bit scales too (qlora).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (qlora).")


class PtuningConfig(Section):
    pre_seq_len: int = Field(16, gt=0, description="Number of virtual prefix tokens per layer.")
    prefix_projection: bool = Field(
        True, description="Reparameterise the prefix through an MLP (P-Tuning v2)."
    )


class BudgetConfig(Section):
    epochs: float = Field(
        2.0,
        gt=0,
        description="With train.num_epochs='auto': the epochs a dataset trains for when they "
        "give at least min_steps optimizer steps (a large dataset).",
    )
    min_steps: int = Field(
        100,
        gt=0,
        description="With train.num_epochs='auto': the fewest optimizer steps a run gets; a "
        "small dataset trains ceil(min_steps / steps per epoch) epochs instead (69 records at "
        "batch 8: 9 steps/epoch, 12 epochs).",
    )
    max_epochs: float = Field(
        20.0,
        gt=0,
        description="With train.num_epochs='auto': the most epochs a tiny dataset gets, even "
        "when that leaves it under min_steps.",
    )


class PreferenceConfig(Section):
    beta: float | None = Field(
        None,
        gt=0,
        description="Strength of the preference term: DPO's β (default 0.1), the reward scale "
        "of ORPO (0.1) and SimPO (2.0).",
    )
    orpo_lambda: float = Field(
        0.1, ge=0, description="ORPO: weight of the odds-ratio term beside the chosen NLL."
    )
    simpo_gamma: float = Field(
        1.0, ge=0, description="SimPO: the target reward margin γ (γ/β = 0.5 at the default β)."
    )

    def strength(self, objective: str) -> float:
        return self.beta if self.beta is not None else {"simpo": 2.0}.get(objective, 0.1)


class TrainConfig(Section):
    method: Literal["lora", "qlora", "full", "ptuning"] = Field(
        "lora", description="Fine-tuning method: which weights train and how."
    )
    objective: Literal["sft", "dpo", "orpo", "simpo"] = Field(
        "sft",
        description="What they learn: sft (the answers), or from preference pairs dpo, orpo "
        "or simpo (chosen over rejected; docs/preference.md).",
    )
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Settings of train.objective dpo/orpo/simpo."
    )
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto",
        description="Prompt template: 'auto' (the model's chat template, else alpaca), "
        "'chat' (require the model's template) or 'alpaca'.",
    )
    cutoff_len: int = Field(512, gt=0, description="Maximum tokens per training example.")
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt tokens.")
    packing: bool = Field(
        False, description="Pack several records per row without attention across records."
    )
    group_by_length: bool = Field(
        False,
        description="Give each step records of similar length (less padding; the order stays "
        "seeded and random between steps). Ignored with packing, which pads nothing.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    quant: QuantConfig = Field(default_factory=QuantConfig, description="QLoRA settings.")
    ptuning: PtuningConfig = Field(
        default_factory=PtuningConfig, description="P-Tuning v2 settings."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    num_epochs: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description="Epochs (ignored when max_steps is set); 'auto' sizes them from the train "
        "record count as train.budget says, and the run prints what it chose and why.",
    )
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    budget: BudgetConfig = Field(
        default_factory=BudgetConfig, description="How num_epochs='auto' sizes training."
    )
    batch_size: int = Field(4, gt=0, description="Per-device micro-batch size (records).")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warmup as a fraction of steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    logging_steps: int = Field(5, gt=0, description="Log metrics every N optimizer steps.")
    eval_steps: int | None = Field(
        None, gt=0, description="Dev loss every N steps (None: at start and end only)."
    )
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="Stop when the dev loss has not improved for this many evaluations (every "
        "eval_steps steps; every epoch when eval_steps is unset) and end with the weights of "
        "the best one (None: off, train the whole budget).",
    )
    save_steps: int = Field(50, gt=0, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, gt=0, description="Keep the last K checkpoints.")
    keep_checkpoints: bool = Field(
        False,
        description="Keep checkpoints/ in the finished artifact (off: deleted once the final "
        "weights are saved; they are only needed to resume an interrupted run).",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on CUDA, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    gpu_memory_share: float = Field(
        0.6,
        gt=0,
        le=0.95,
        description="With packing on a GPU: the share of its memory that micro-batches are "
        "sized to fill after weights, gradients and optimizer states. More: fewer, larger "
        "micro-batches (fewer kernel launches per token); too much: out of memory.",
    )
    offload_checkpoints: bool = Field(
        False,
        description="With gradient checkpointing on a GPU: each layer's saved input waits in "
        "pinned CPU memory until backward (copies overlap compute; 2 bytes x hidden x tokens "
        "per layer less GPU memory, e.g. 2.1 GB for an 8B model at 8k tokens).",
    )
    neftune_alpha: float = Field(0.0, ge=0, description="NEFTune embedding noise (0: off).")
    seed: int = Field(42, description="Training seed.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    launcher: Literal["python", "accelerate", "torchrun"] = Field(
        "python", description="How the training subprocess starts (several GPUs: accelerate)."
    )
    num_processes: int = Field(
        1, gt=0, description="Processes (GPUs) per node for accelerate/torchrun."
    )
    nodes: int = Field(
        1,
        gt=0,
        description="Hosts the training spans, num_processes each: node 0 runs the train "
        "stage, the others `python -m tasks.train.nodes` on the same store (docs/production.md).",
    )
    node_rank: int | None = Field(
        None,
        ge=0,
        description="This host's rank among train.nodes (None: NODE_RANK, SLURM_NODEID or "
        "JOB_COMPLETION_INDEX from the environment, else 0). Not in the key.",
    )
    master_addr: str | None = Field(
        None,
        description="Rendezvous: node 0's address, reachable from every node (None: "
        "MASTER_ADDR from the environment, else 127.0.0.1). Not in the key.",
    )
    master_port: int | None = Field(
        None,
        gt=0,
        lt=65536,
        description="Rendezvous: a free port on node 0 (None: MASTER_PORT from the "
        "environment, else 29500). Not in the key.",
    )
    accelerate_config: str | None = Field(
        None,
        description="accelerate config for launcher=accelerate: a file in deploy/accelerate/ "
        "by name (ddp, zero2_offload, zero3_offload, ...) or a path.",
    )
    liger: bool | Literal["auto"] = Field(
        "auto", description="Liger fused kernels on CUDA when installed."
    )
    compile: bool = Field(False, description="torch.compile the model.")
    then: ThenSettings = Field(
        None,
        description="A second training stage after this SFT one, in the same run: the train "
        "settings it changes, e.g. {objective: dpo, learning_rate: 5.0e-5}. It starts from "
        "this stage's model and DPO's reference is that model (docs/preference.md).",
    )  # last: its check reads the settings above


def accelerate_config_path(name: str) -> Path:
    """'zero2_offload' → deploy/accelerate/zero2_offload.yaml; a path is taken as it is."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    return ACCELERATE_DIR / f"{path.stem}.yaml"


def accelerate_launch(t: TrainConfig) -> dict[str, Any]:
    """The accelerate config file's settings ({} without one, or when it is missing)."""
    if t.launcher != "accelerate" or not t.accelerate_config:
        return {}
    path = accelerate_config_path(t.accelerate_config)
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def train_problems(t: TrainConfig) -> list[str]:
    """Settings of the train section that contradict each other (no model, no machine)."""
    problems = []
    if t.launcher == "python" and t.num_processes > 1:
        problems.append(
            f"train.num_processes: got {t.num_processes}: launcher='python' starts one "
            "process; fix: --set train.launcher=accelerate or torchrun"
        )
    if t.launcher == "python" and t.nodes > 1:
        problems.append(
            f"train.nodes: got {t.nodes}: launcher='python' trains on one host; "
            "fix: --set train.launcher=torchrun (or accelerate)"
        )
    if t.node_rank is not None and t.node_rank >= t.nodes:
        problems.append(
            f"train.node_rank: got {t.node_rank}: ranks run from 0 to train.nodes - 1 "
            f"= {t.nodes - 1}; fix: --set train.node_rank=0, or raise train.nodes"
        )
    if t.accelerate_config and t.launcher != "accelerate":
        problems.append(
            f"train.accelerate_config: got {t.accelerate_config!r}: only launcher='accelerate' "
            f"reads it (train.launcher is {t.launcher!r}); fix: --set train.launcher=accelerate"
        )
    elif t.accelerate_config:
        path = accelerate_config_path(t.accelerate_config)
        launch = accelerate_launch(t)
        stage = (launch.get("deepspeed_config") or {}).get("zero_stage")
        if not path.is_file():
            names = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
            problems.append(
                f"train.accelerate_config: got {t.accelerate_config!r}: {path} not found; "
                f"fix: --set train.accelerate_config=<one of {names}>"
            )
        elif t.method == "qlora" and ("zero3" in path.stem or stage == 3):
            problems.append(
                f"train.accelerate_config: got {t.accelerate_config!r}: ZeRO-3 partitions the "
                "weights, and the 4-bit weights of train.method='qlora' cannot be partitioned; "
                "fix: --set train.accelerate_config=zero2_offload (or ddp)"
            )
    if t.then is not None:  # the second stage's own, named as under train.then
        problems += [p.replace("train.", "train.then.") for p in train_problems(second(t))]
    if t.offload_checkpoints and not t.gradient_checkpointing:
        problems.append(
            "train.offload_checkpoints: got True: it moves the inputs that gradient "
            "checkpointing keeps, and train.gradient_checkpointing is off; "
            "fix: --set train.gradient_checkpointing=true"
        )
    if t.method == "ptuning" and t.packing:
        problems.append(
            "train.packing: got True: with train.method='ptuning' every token of a row attends "
            "the prefix, so packed records would share it as one sequence; "
            "fix: --set train.packing=false"
        )
    return problems
