"""The models evaluate scores, each loaded once, in full precision (bf16 on a CUDA GPU).

    tuned     the final training's model: its full weights (model/), or its adapter (LoRA,
              QLoRA, P-Tuning v2) applied with peft on the model that training started from
    starting  the model that training started from: the base, or with `train.then` the SFT
              model (the merge-sft stage's folder); for an adapter it is the same weights
              with the adapter switched off (peft's `disable_adapter`), never a second copy
    base      with `train.then`, the base as its own model (the starting model is the SFT one)

QLoRA adapters are applied on the full-precision model, as the merge stage merges them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from tasks.config import Config
from tasks.store import Ref


class Models:
    def __init__(self, cfg: Config, base: Ref, train: Ref, start: Ref | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = cfg.evaluate.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else None
        trust = cfg.base.trust_remote_code
        self.base_ref, self.start_ref = base, start
        self.load: Callable[[Path], Any] = lambda path: (
            AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype or torch.float32, trust_remote_code=trust
            )
            .to(device)
            .eval()
        )
        self.full = (train.dir / "model").is_dir()  # full fine-tuning: whole weights
        starting_dir = (start or base).dir / "model"
        if self.full:
            self.tuned = self.load(train.dir / "model")
            tokenizer_dir = train.dir / "model"
        else:
            from peft import PeftModel

            adapter = train.dir / "adapter"
            self.tuned = PeftModel.from_pretrained(self.load(starting_dir), adapter).eval()
            has_tokenizer = (adapter / "tokenizer_config.json").is_file()
            tokenizer_dir = adapter if has_tokenizer else starting_dir
        self.starting_dir = starting_dir
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def starting_name(self) -> str:
        """What the starting model is called in metrics.json: "sft" in a chain, else "base"."""
        return "sft" if self.start_ref is not None else "base"

    def starting(self) -> AbstractContextManager[Any]:
        """The model the final training started from, for the `with` block."""
        if self.full:
            return _Loaded(lambda: self.load(self.starting_dir))
        return _Disabled(self.tuned)

    def base(self) -> AbstractContextManager[Any]:
        """The base model, for the `with` block: its own load in a chain, else `starting`."""
        if self.start_ref is None:
            return self.starting()
        return _Loaded(lambda: self.load(self.base_ref.dir / "model"))


class _Disabled:
    """The adapter's model with the adapter switched off: the weights it started from."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> Any:
        self.off = self.model.disable_adapter()
        self.off.__enter__()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.off.__exit__(*exc)


class _Loaded:
    """A model loaded for the `with` block and let go after it (one more copy at a time)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make

    def __enter__(self) -> Any:
        self.model = self.make()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        del self.model
