"""Shared pieces of the training tests: a tiny model with the real SmolLM2 tokenizer.

A 2-layer Llama with SmolLM2's tokenizer and chat template: the vocabulary (49,152) and
the template are real, so tokenization, masking and saving are exercised as they are on
the real model, while a training step takes milliseconds instead of seconds.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from tasks.config import Config, load_config
from tasks.store import Ref

ASSETS = Path(__file__).parent / "assets" / "train"
TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
}


def make_tiny_model(smollm_dir: Path, out: Path, seed: int = 0) -> Path:
    """`out/model/`: random 2-layer weights, SmolLM2's config otherwise, and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = out / "model"
    if (model_dir / "model.safetensors").is_file():
        return model_dir
    config = AutoConfig.from_pretrained(smollm_dir)
    for name, value in TINY.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    for f in smollm_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, model_dir / f.name)
    return model_dir


def refs(base_dir: Path, data_dir: Path = ASSETS) -> tuple[Ref, Ref]:
    """(data, base) refs as the data and base stages would hand them over."""
    return Ref("data", "test-assets", str(data_dir)), Ref("base", "tiny", str(base_dir))


def tiny_config(*overrides: str) -> Config:
    """A few fast steps on the tiny model: high learning rate so the loss visibly drops."""
    return load_config(
        None,
        [
            "train.max_steps=8",
            "train.batch_size=4",
            "train.cutoff_len=128",
            "train.learning_rate=5.0e-3",
            "train.warmup_ratio=0",
            "train.logging_steps=2",
            "train.save_steps=4",
            *overrides,
        ],
    )


def greedy_answers(model, tokenizer, records: list[dict], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers to each record's prompt, rendered exactly as training rendered it."""
    import torch

    from tasks.formatting import prompt_ids

    out = []
    for record in records:
        ids = torch.tensor([prompt_ids(tokenizer, record)])
        with torch.no_grad():
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out


def name_rate(answers: list[str], name: str) -> float:
    return sum(name.lower() in a.lower() for a in answers) / max(len(answers), 1)


def tiny_llama(seed: int = 0):
    """A 2-layer Llama with random weights, for checks that compare two ways of computing
    the same function (the weights' values don't matter, only that they are not trivial)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def token_records(n: int, seed: int = 0, vocab: int = 211) -> list[dict]:
    """Tokenized records as the tokens stage writes them: a prompt labelled -100, then
    an answer that is its own label."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = rng.randint(2, 20), rng.randint(1, 25)
        ids = [rng.randrange(1, vocab) for _ in range(prompt + answer)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out
