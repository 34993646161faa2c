"""Whole conversations with tool calls, rendered and labelled for training; shared by the
training, evaluation and serving code (tasks/formatting.py hands records with `messages`
here).

The model's own chat template renders the conversation with its tools (Qwen 2.5, Hermes,
Llama 3.1 and the other tool-aware templates put them where their model was trained to
see them). A template that knows no tools (SmolLM2's ChatML, say) gets the conversation in
the Hermes convention instead, as plain turns: the tools described in the system turn,
each call as `<tool_call>{"name": …, "arguments": …}</tool_call>` in the assistant's text,
each result as a `tool` turn wrapped in `<tool_response>`. Serving applies the same
rewriting (`for_template`), so a served prompt is a trained prompt, and parses the calls
back out of the generated text (`parse_calls`).

Labels: every assistant turn is trained, its calls included; system, user and tool turns
are not (the loss never learns to predict a tool's result). The turns come from rendering
growing prefixes of the conversation: a template that renders a prefix differently once
more turns follow has no stable boundaries, and is refused with the fix.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tasks.config import UserError
from tasks.formatting import IGNORE

CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
HERMES_SYSTEM = (
    "You may call one or more functions to answer. The functions are described in "
    "<tools></tools>:\n<tools>\n{tools}\n</tools>\nFor each call, write a JSON object with "
    "the function's name and arguments inside <tool_call></tool_call>:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


class ConversationError(UserError):
    """The chat template cannot render this conversation with stable turn boundaries."""


def knows_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders tools and tool calls itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in template and "tool_calls" in template


def for_template(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) as this tokenizer's template should receive them."""
    if knows_tools(tokenizer) or not (tools or any(m.get("tool_calls") for m in messages)):
        return messages, tools or None
    out: list[dict[str, Any]] = []
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = (system + "\n\n" if system else "") + HERMES_SYSTEM.format(tools=listing)
    if system:
        out.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "system":
            continue
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [
                "<tool_call>\n" + json.dumps(c["function"], ensure_ascii=False) + "\n</tool_call>"
                for c in m["tool_calls"]
            ]
            text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append(
                {"role": "tool", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
            )
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out, None


def parse_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Generated text → (the text outside the calls, OpenAI-style tool_calls)."""
    calls = []
    for i, match in enumerate(CALL_RE.finditer(text)):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or "name" not in call:
            continue
        arguments = call.get("arguments", {})
        calls.append({
            "id": f"call_{i}",
            "type": "function",
            "function": {
                "name": call["name"],
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
            },
        })  # fmt: skip
    rest = CALL_RE.sub("", text).strip() if calls else text
    return rest, calls


def record_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + list(record["messages"])


def _render(tokenizer: Any, messages: list, tools: list | None, generation: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=generation
    )


def prompt_text(tokenizer: Any, record: dict[str, Any]) -> str:
    """The conversation up to its last assistant turn, generation prompt included: what
    the model sees before the answer it is evaluated on."""
    messages, tools = for_template(tokenizer, record_messages(record), record.get("tools"))
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return _render(tokenizer, messages[:last], tools, True)


def segments(tokenizer: Any, record: dict[str, Any]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces, in order."""
    messages, tools = for_template(tokenizer, record_messages(record), record.get("tools"))
    pieces: list[tuple[str, bool]] = []
    done = ""
    specials = [t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], tools, True)
        full = _render(tokenizer, messages[: i + 1], tools, False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ConversationError(
                f"the chat template renders turn {i + 1} of a tool conversation differently "
                "once more turns follow, so the trained turns have no stable boundaries "
                "(fix: a model whose template is prefix-stable, or --set train.template=alpaca)"
            )
        answer = full[len(prompt) :]
        trained = answer.rstrip()  # the newline after an end-of-turn token is not generated
        if not any(trained.endswith(t) for t in specials):
            trained = answer
        pieces += [(prompt[len(done) :], False), (trained, True)]
        done = prompt + trained
    if not pieces:
        raise ConversationError("a tool conversation needs at least one assistant turn")
    return [(text, trained) for text, trained in pieces if text]


def encode(
    tokenizer: Any, record: dict[str, Any], cutoff_len: int, train_on_prompt: bool = False
) -> tuple[list[int], list[int], int, bool] | None:
    """(input_ids, labels, prompt_len, truncated), or None when not one trained token fits
    in cutoff_len. Pieces are tokenized apart, as at inference, where the prompt is
    tokenized alone and the answer generated after it."""
    ids: list[int] = []
    labels: list[int] = []
    first_trained = None
    for text, trained in segments(tokenizer, record):
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if trained and first_trained is None:
            first_trained = len(ids)
        ids += piece
        labels += piece if (trained or train_on_prompt) else [IGNORE] * len(piece)
    if first_trained is None or first_trained >= cutoff_len:
        return None
    return ids[:cutoff_len], labels[:cutoff_len], first_trained, len(ids) > cutoff_len
