"""Merge stage: a LoRA/QLoRA adapter folded into the full-precision base → one HF folder.

    artifacts/merge/<key>/model/        safetensors, tokenizer + chat template, generation config
    artifacts/merge/<key>/hyperparameters.yaml   copied from the training run

QLoRA trains against 4-bit base weights, but the adapter is merged into the base loaded
in full precision from the base stage: merging into 4-bit weights would round the update
away (and bitsandbytes cannot save it). The folder loads with `AutoModelForCausalLM`
alone, no peft. Full fine-tuning already produced full weights, so the training artifact
is returned as is; P-Tuning v2 has nothing to merge (its prefix lives in the KV cache) and
returns None. A second run finds the key in the store and does nothing.

Run alone: `python -m tasks.merge --spec FILE` (tasks/runner.py); prints the model folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from tasks.base import trusts_remote_code
from tasks.config import Config, UserError
from tasks.store import Ref, Store, make_key

# base + adapter added in fp32 (torch, peft), saved as safetensors with the tokenizer
LIBRARIES = ("torch", "transformers", "peft", "safetensors")
log = logging.getLogger("llmft.merge")
# the config sections run() and key() read: what a stage spec carries (tasks/spec.py)
SECTIONS = ("train",)


class MergeError(UserError):
    """The training artifact has nothing that can be merged."""


def train_method(cfg: Config, train: Ref) -> str:
    """The method the artifact was trained with (its hyperparameters.yaml), else the config's."""
    hp = train.dir / "hyperparameters.yaml"
    if hp.is_file():
        return (yaml.safe_load(hp.read_text()) or {}).get("method", cfg.train.method)
    return cfg.train.method


def key(cfg: Config, base: Ref, train: Ref) -> str:
    from tasks.versions import version

    inputs = {"base": base.key, "train": train.key}
    return make_key("merge", version("tasks.merge", LIBRARIES), {}, inputs)


def merge_adapter(base_dir: Path, adapter_dir: Path, out: Path) -> None:
    """base (fp32) + LoRA → merged weights, saved in the base's own dtype as safetensors."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    trust = trusts_remote_code(base_dir)  # base.trust_remote_code; off unless turned on
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust)
    saved_dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    # fp32 for the arithmetic W + (alpha/r)·B·A; bf16 adds would round small updates away.
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, trust_remote_code=trust
    )
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model = model.to(saved_dtype)
    model.save_pretrained(out, safe_serialization=True)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(
        adapter_dir if has_tokenizer else base_dir, trust_remote_code=trust
    )
    tokenizer.save_pretrained(out)


def run(cfg: Config, store: Store, base: Ref, train: Ref) -> Ref | None:
    method = train_method(cfg, train)
    if method == "ptuning":
        log.info("merge skipped: a P-Tuning v2 prefix cannot be folded into the weights")
        return None
    if (train.dir / "model").is_dir():
        log.info("merge skipped: %s training already wrote full weights in %s", method, train.path)
        return train
    adapter = train.dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(f"{train.path}: neither adapter/adapter_config.json nor model/ found")
    base_dir = base.dir / "model"

    def work(tmp: Path) -> dict:
        merge_adapter(base_dir, adapter, tmp / "model")
        if (train.dir / "hyperparameters.yaml").is_file():
            shutil.copy(train.dir / "hyperparameters.yaml", tmp / "hyperparameters.yaml")
        # Export converts the base beside the adapter for unmerged llama.cpp serving.
        made = {"method": method, "base_model_dir": str(base_dir), "adapter_dir": str(adapter)}
        # what the base stage recorded of the model (its source's name, its consent to run
        # the model's code) travels on: a next training stage starts from this folder
        origin = base.manifest() if (base.dir / "manifest.json").is_file() else {}
        return made | {k: origin[k] for k in ("source", "trust_remote_code") if k in origin}

    inputs = {"base": base.key, "train": train.key}
    return store.build("merge", key(cfg, base, train), work, inputs=inputs, config={})


def model_dir(ref: Ref) -> Path:
    return ref.dir / "model"


def main(argv: list[str] | None = None) -> int:
    from tasks import runner

    args = runner.spec_parser("merge", __doc__).parse_args(argv)
    return runner.stage_main("merge", args.spec, args.out, show=lambda ref: str(model_dir(ref)))
