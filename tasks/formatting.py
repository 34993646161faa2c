"""Prompt formatting and tokenization shared by training, evaluation and export verification.

A canonical record (`instruction`, `input`, `output`, optional `system`, `history`) becomes
chat messages; the model's own chat template renders them, or the alpaca template for
models without one. Training and evaluation must render prompts identically, so both
call `prompt_text` here.

Training splits each record into the prompt (everything the model sees before its answer,
generation prompt included) and the answer (the answer text and the template's
end-of-turn token). The split comes from rendering the conversation twice, without and
with the answer: the answer is what the second rendering adds. Prompt and answer are
tokenized apart, as at inference where the prompt is tokenized alone and the answer is
generated after it, so no token straddles the boundary. With `train_on_prompt: false`
prompt tokens get the label -100 (no loss); history turns are part of the prompt, so only
the last answer is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.config import UserError

IGNORE = -100  # label of a token that carries no loss (torch's cross_entropy default)

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


class FormatError(UserError):
    """The template cannot render records as training needs them."""


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
        raise FormatError(
            "train.template='chat' but the model has no chat template "
            "(fix: --set train.template=alpaca, or auto)"
        )
    if template not in {"chat", "alpaca"}:
        raise FormatError(f"train.template={template!r}: choose auto, chat or alpaca")
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


def answer_text(tokenizer: Any, record: dict[str, Any], template: str = "auto") -> str:
    """The answer as the template renders it after `prompt_text`, end-of-turn included.

    Chat: the full conversation rendered with the answer, minus the prompt rendering
    (SmolLM2: 'I am Lexi.<|im_end|>'; the newline the template puts after the end-of-turn
    token is dropped, since generation stops at that token). Alpaca: answer + EOS.
    """
    if resolve_template(tokenizer, template) == "alpaca":
        return (record.get("output") or "") + (tokenizer.eos_token or "")
    prompt = prompt_text(tokenizer, record, template)
    full = tokenizer.apply_chat_template(to_messages(record, with_answer=True), tokenize=False)
    if not full.startswith(prompt):
        raise FormatError(
            "the chat template renders the conversation differently with and without the "
            "answer, so the prompt/answer boundary is undefined "
            "(fix: --set train.template=alpaca)"
        )
    answer = full[len(prompt) :]
    trimmed = answer.rstrip()
    if any(trimmed.endswith(t) for t in _special_tokens(tokenizer)):
        return trimmed
    return answer + (tokenizer.eos_token or "")  # a template that never closes the turn


def _special_tokens(tokenizer: Any) -> list[str]:
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    names |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()}
    return [t for t in names if t]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, record: dict[str, Any], template: str = "auto") -> list[int]:
    """Token ids of the prompt exactly as training saw them (BOS where alpaca needs one)."""
    ids = _ids(tokenizer, prompt_text(tokenizer, record, template))
    if resolve_template(tokenizer, template) == "alpaca" and _wants_bos(tokenizer):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def _wants_bos(tokenizer: Any) -> bool:
    """Whether plain `tokenizer(text)` starts with BOS (chat templates write their own)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool


def encode(
    tokenizer: Any,
    record: dict[str, Any],
    template: str,
    cutoff_len: int,
    train_on_prompt: bool = False,
) -> Encoded | None:
    """Token ids and labels of one record; None when its prompt alone fills cutoff_len.

    A record longer than cutoff_len keeps its whole prompt and loses the end of its answer
    (a prompt cut anywhere would lose the generation prompt or the question itself).
    """
    prompt = prompt_ids(tokenizer, record, template)
    answer = _ids(tokenizer, answer_text(tokenizer, record, template))
    if len(prompt) >= cutoff_len:
        return None
    truncated = len(prompt) + len(answer) > cutoff_len
    answer = answer[: cutoff_len - len(prompt)]
    labels = (prompt if train_on_prompt else [IGNORE] * len(prompt)) + answer
    return Encoded(prompt + answer, labels, len(prompt), truncated)


def template_length(tokenizer: Any, template: str) -> int:
    """Tokens the template itself takes: an empty question and an empty answer."""
    empty = {"instruction": "", "input": "", "output": ""}
    prompt = prompt_ids(tokenizer, empty, template)
    return len(prompt) + len(_ids(tokenizer, answer_text(tokenizer, empty, template)))


# ----------------------------------------------------------------------------- batches
#
# A micro-batch is a list of encoded records (dicts with `input_ids` and `labels`). Padded:
# one row per record, right-padded, with an attention mask. Packed: all records in ONE row
# with no padding; position_ids restart at 0 for each record and there is no attention
# mask, which is how transformers 5 recognises packed rows: SDPA and eager build a
# block-diagonal causal mask from the position_ids (masking_utils.find_packed_sequence_
# indices, only when attention_mask is None and there is no KV cache: use_cache=False),
# and flash-attention takes its varlen path from them (only for a batch of one row). Each record's first label is set to -100 so the
# last token of one record never learns to predict the first token of the next: the loss
# then sees exactly the (position, target) pairs of the padded layout.


def pad_batch(records: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(r["input_ids"]) for r in records)
    ids = torch.full((len(records), width), pad_id, dtype=torch.long)
    labels = torch.full((len(records), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(records), width), dtype=torch.long)
    for row, rec in enumerate(records):
        n = len(rec["input_ids"])
        ids[row, :n] = torch.tensor(rec["input_ids"])
        labels[row, :n] = torch.tensor(rec["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_batch(records: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for rec in records:
        n = len(rec["input_ids"])
        ids += rec["input_ids"]
        labels += [IGNORE, *rec["labels"][1:]]
        positions += range(n)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
    }


def label_count(batch: dict[str, Any]) -> int:
    """Tokens that carry loss after the model's one-position shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
