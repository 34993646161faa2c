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

# label of a token that carries no loss (torch's cross_entropy default); the training
# batches (tasks/train/batches.py) and evaluation read it from here
IGNORE = -100

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
    if record.get("messages") and resolve_template(tokenizer, template) == "chat":
        from tasks import conversation  # a tool conversation, up to its last answer

        return conversation.prompt_text(tokenizer, record)
    messages = to_messages(record)
    if resolve_template(tokenizer, template) == "chat":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _alpaca(messages)


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


def stop_token_ids(tokenizer: Any, template: str = "auto") -> list[int]:
    """Token ids that end a trained answer: the special tokens the template writes after
    the answer text (Llama 3 <|eot_id|>, ChatML <|im_end|>, Phi-3 <|end|> then
    <|endoftext|>), then EOS. Generation stops on any of them."""
    special = set(_special_token_ids(tokenizer))
    probe = {"instruction": "?", "input": "", "output": "x"}
    stops = [i for i in _ids(tokenizer, answer_text(tokenizer, probe, template)) if i in special]
    if getattr(tokenizer, "eos_token_id", None) is not None:
        stops.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(stops))


def _special_token_ids(tokenizer: Any) -> list[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted(ids | {i for i, t in decoder.items() if getattr(t, "special", False)})


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


# ------------------------------------------------------------------- template travel
#
# The template training rendered with is the one the exported model must serve with: the
# GGUF stores it (tokenizer.chat_template) and llama.cpp renders every chat through it. For
# `chat` that is the tokenizer's own template; for `alpaca` (chosen, or the fallback of a
# model without a template) it is `alpaca_jinja` below, which renders exactly `_alpaca` and
# the BOS that `prompt_ids` puts in front, so a served prompt is a trained prompt.

# After the system text: each question, and each answer (the last one closed by EOS).
ALPACA_TURNS = (
    "{{- ns.system + '\\n\\n' -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- m['content'] + (eos_token if loop.last else '\\n\\n') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def alpaca_jinja(tokenizer: Any) -> str:
    """`_alpaca` as a Jinja chat template, with the BOS `prompt_ids` adds where it adds one."""
    system = ALPACA_SYSTEM.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return (
        ("{{- bos_token -}}" if _wants_bos(tokenizer) else "")
        + f"{{%- set ns = namespace(system='{system}') -%}}"
        + "{%- for m in messages if m['role'] == 'system' -%}"
        + "{%- set ns.system = m['content'] -%}{%- endfor -%}"
        + ALPACA_TURNS
    )


def training_chat_template(tokenizer: Any, template: str = "auto") -> str:
    """The Jinja chat template that renders prompts exactly as training did."""
    if resolve_template(tokenizer, template) == "chat":
        return tokenizer.chat_template
    return alpaca_jinja(tokenizer)


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
    if record.get("messages"):  # a tool conversation: every assistant turn is trained
        from tasks import conversation

        if resolve_template(tokenizer, template) != "chat":
            raise FormatError(
                "tool conversations (records with messages and tools) are rendered by the "
                "model's chat template (fix: --set train.template=auto with a chat model)"
            )

        encoded = conversation.encode(tokenizer, record, cutoff_len, train_on_prompt)
        return Encoded(*encoded) if encoded else None
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
