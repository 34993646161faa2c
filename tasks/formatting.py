"""Prompt formatting shared by training, evaluation and export verification.

A canonical record (`instruction`, `input`, `output`, optional `system`, `history`) becomes
chat messages; the model's own chat template renders them, or the alpaca template for
models without one. Training and evaluation must render prompts identically, so both
call `prompt_text` here.
"""

from __future__ import annotations

from typing import Any

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def user_text(record: dict[str, Any]) -> str:
    """The instruction, with the optional `input` field appended on its own paragraph."""
    instruction = record.get("instruction") or ""
    extra = record.get("input") or ""
    return f"{instruction}\n\n{extra}" if extra else instruction


def to_messages(record: dict[str, Any], with_answer: bool = False) -> list[dict[str, str]]:
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": record["system"]})
    for question, answer in record.get("history") or []:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": user_text(record)})
    if with_answer:
        messages.append({"role": "assistant", "content": record.get("output") or ""})
    return messages


def resolve_template(tokenizer: Any, template: str) -> str:
    """'auto' → 'chat' when the tokenizer has a chat template, else 'alpaca'."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    if template == "chat" and not has_chat:
        raise ValueError(
            "train.template=chat but the model has no chat template "
            "(fix: --set train.template=alpaca or auto)"
        )
    if template not in {"chat", "alpaca"}:
        raise ValueError(f"train.template={template!r}: choose auto, chat or alpaca")
    return template


def _alpaca(messages: list[dict[str, str]]) -> str:
    system = ALPACA_SYSTEM
    parts = []
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            parts.append(f"### Instruction:\n{m['content']}\n\n### Response:\n")
        else:
            parts.append(f"{m['content']}\n\n")
    return system + "\n\n" + "".join(parts)


def prompt_text(tokenizer: Any, record: dict[str, Any], template: str = "auto") -> str:
    """Everything the model sees before its answer, generation prompt included."""
    messages = to_messages(record)
    if resolve_template(tokenizer, template) == "chat":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _alpaca(messages)


def answer_suffix(tokenizer: Any, template: str = "auto") -> str:
    """What closes an answer: the end-of-turn text the template puts after the assistant."""
    if resolve_template(tokenizer, template) == "chat":
        return (tokenizer.eos_token or "") if not _uses_im_end(tokenizer) else "<|im_end|>\n"
    return tokenizer.eos_token or ""


def _uses_im_end(tokenizer: Any) -> bool:
    return "<|im_end|>" in (getattr(tokenizer, "chat_template", "") or "")
