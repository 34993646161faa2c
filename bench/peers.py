"""The peers of bench/train_gpu.py: one training run of another tool, in this process.

    python bench/peers.py --impl trl --method lora --model-dir DIR --tokens DIR \
        --steps 15 --warmup 2 --result FILE [--work DIR]

Each peer trains on the same records in the same order as the training stage (the
stage's epoch order, 32 records per optimizer step as 8 per micro-batch × 4 accumulated),
with AdamW (fused), constant lr, clip 1.0 and bf16, and writes its own measurements to
FILE: the trained tokens per second over the steps after `--warmup` (a device sync
closes every step), peak GPU memory, and the per-step losses. The bench times the
whole process from outside as well; that is the figure the table compares.

- baseline: `transformers.Trainer` + peft LoRA (rank 8, alpha 16, all linear layers,
  dropout 0), SDPA, dynamic padding to the longest record of each micro-batch. QLoRA:
  bitsandbytes NF4 + double quantization, `prepare_model_for_kbit_training`. Full: the
  same Trainer without peft, fp32 master weights under bf16 autocast.
- trl: `trl.SFTTrainer` with what its documentation names for speed: padding-free
  batches (a micro-batch's records in one row, position ids restarting per record),
  `use_liger_kernel=True`, and SDPA, which keeps the records of a row apart through the
  block-diagonal mask transformers builds from those position ids. TRL's preferred
  attention for padding-free rows, FlashAttention 2/3, is not on the GPU image (the
  `flash-attn` package has no wheel for this torch; the Hub kernels need the network).
- unsloth: `FastLanguageModel` (LoRA rank 8, alpha 16, dropout 0 on q,k,v,o,gate,up,
  down; gradient checkpointing off; QLoRA: its 4-bit load and its own checkpointing)
  trained by unsloth's patched `SFTTrainer`, padding-free as unsloth decides by itself.

QLoRA rows turn gradient checkpointing on for every tool (what QLoRA is for; the memory
target compares peaks at the same batch); LoRA and full rows turn it off for every tool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH, ACCUM = 8, 4
LR = {"lora": 1e-3, "qlora": 1e-3, "full": 5e-5}
SEED = 42
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def step_records(tokens: Path, steps: int) -> list[dict]:
    """The first `steps` optimizer steps' records, in the training stage's order."""
    from tasks.train.batches import epoch_order
    from tasks.train.tokens import read_table

    rows = read_table(tokens, "train").to_pylist()
    order = epoch_order(len(rows), 0, SEED, BATCH * ACCUM)
    return [rows[i] for i in order[: steps * BATCH * ACCUM]]


def versions(*names: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "-"
    return out


def quant_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def hf_model(model_dir: str, method: str):
    """Base model + peft, built the same way for the Trainer baseline and for TRL."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "sdpa"}
    if method == "full":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    if method == "qlora":
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, quantization_config=quant_config(),
            device_map={"": 0}, **kwargs,
        )  # fmt: skip
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )  # fmt: skip
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kwargs)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    torch.manual_seed(SEED)  # A's random init, as the training stage seeds before its own
    return get_peft_model(model, lora)


def common_args(args: argparse.Namespace) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(Path(args.work) / "trainer"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=args.steps,
        learning_rate=LR[args.method],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=cuda,
        use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=SEED,
        gradient_checkpointing=args.method == "qlora",
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def timer_callback():
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Each step's end after a device sync; each logged step loss."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, *a, **k):  # noqa: ANN002
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_log(self, *a, logs=None, **k):  # noqa: ANN002
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Timer()


def in_order(trainer_cls):
    """The trainer with its records in the dataset's order (the stage's step order)."""
    from torch.utils.data import SequentialSampler

    class InOrder(trainer_cls):
        def _get_train_sampler(self, *a, **k):  # noqa: ANN002
            return SequentialSampler(self.train_dataset)

    return InOrder


def build(args: argparse.Namespace, data: list[dict]):
    """The trainer for `args.impl`, and what it ran (versions and settings)."""
    impl, method = args.impl, args.method
    if impl == "unsloth":  # first: it patches transformers, peft and trl as it is imported
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel
    import torch
    from transformers import AutoTokenizer

    timer = timer_callback()
    if impl == "baseline":
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        tok = AutoTokenizer.from_pretrained(args.model_dir)
        tok.pad_token = tok.pad_token or tok.eos_token
        tok.padding_side = "right"
        model = hf_model(args.model_dir, method)
        model.config.use_cache = False
        rows = [r | {"attention_mask": [1] * len(r["input_ids"])} for r in data]
        targs = TrainingArguments(
            **common_args(args), remove_unused_columns=False, dataloader_drop_last=False
        )
        trainer = in_order(Trainer)(
            model=model, args=targs, train_dataset=rows, callbacks=[timer],
            data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100),
        )  # fmt: skip
        ran = versions("transformers", "peft", "torch", "bitsandbytes") | {
            "settings": "Trainer, sdpa, padded batches (DataCollatorForSeq2Seq)"
        }
        return trainer, timer, ran

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list(data)
    if impl == "trl":
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        model = hf_model(args.model_dir, method)
        settings = dict(padding_free=True, use_liger_kernel=True)
    else:
        full, qlora = method == "full", method == "qlora"
        model, tok = FastLanguageModel.from_pretrained(
            model_name=args.model_dir, max_seq_length=1024,
            dtype=None if full else torch.bfloat16, load_in_4bit=qlora, full_finetuning=full,
            use_gradient_checkpointing="unsloth" if qlora else False,
        )  # fmt: skip
        if not full:
            model = FastLanguageModel.get_peft_model(
                model, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                bias="none", use_gradient_checkpointing="unsloth" if qlora else False,
                random_state=SEED,
            )  # fmt: skip
        settings = {}  # padding-free and its kernels: unsloth's own choice
    common = common_args(args)
    if impl == "unsloth":  # its own checkpointing (QLoRA) is already wired in the model
        common["gradient_checkpointing"] = False
    sargs = SFTConfig(
        **common, max_length=None, packing=False, dataset_num_proc=None,
        dataloader_drop_last=False, **settings,
    )  # fmt: skip
    trainer = in_order(SFTTrainer)(
        model=model, args=sargs, train_dataset=dataset, processing_class=tok, callbacks=[timer]
    )
    attn = getattr(trainer.model.config, "_attn_implementation", "?")
    ran = versions("trl", "transformers", "peft", "torch", "liger-kernel", "bitsandbytes")
    if impl == "unsloth":
        ran |= versions("unsloth", "unsloth_zoo")
    ran["settings"] = (
        f"SFTTrainer padding_free={getattr(trainer, 'padding_free', sargs.padding_free)}, "
        f"use_liger_kernel={sargs.use_liger_kernel}, attention={attn}, "
        f"gradient_checkpointing={common['gradient_checkpointing'] or (impl == 'unsloth' and method == 'qlora')}"
    )
    return trainer, timer, ran


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["baseline", "trl", "unsloth"], required=True)
    p.add_argument("--method", choices=["lora", "qlora", "full"], required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--result", required=True)
    p.add_argument("--work", default="/tmp/llmft-bench-peer")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    data = step_records(Path(args.tokens), args.steps)
    trainer, timer, ran = build(args, data)
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    per_step = [
        sum(len(r["input_ids"]) for r in data[s * BATCH * ACCUM : (s + 1) * BATCH * ACCUM])
        for s in range(args.steps)
    ]
    w = min(args.warmup, args.steps - 1)
    seconds = timer.ends[-1] - timer.ends[w - 1] if w > 0 else float("nan")
    result = {
        "tokens_per_second": sum(per_step[w:]) / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "losses": timer.losses,
        "ran": ran,
    }
    Path(args.result).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
