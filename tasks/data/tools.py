"""Tool-calling conversations: the two shapes users bring, read into one OpenAI-style form.

    ShareGPT (LLaMA-Factory):  {"conversations": [{"from": "human", …},
                                 {"from": "function_call", "value": "{\"name\": …, \"arguments\": {…}}"},
                                 {"from": "observation", "value": "…"}, {"from": "gpt", …}],
                                "tools": "[{…}]", "system": "…"}
    OpenAI:                    {"messages": [{"role": "user", …},
                                 {"role": "assistant", "tool_calls": [{"type": "function",
                                   "function": {"name": …, "arguments": "{…}"}}]},
                                 {"role": "tool", "tool_call_id": …, "content": "…"},
                                 {"role": "assistant", "content": "…"}], "tools": [{…}]}

Both become `messages` (user, assistant with optional `tool_calls` whose `arguments` are
a JSON object, as chat templates expect, and `tool` results) and `tools` (a list of
`{"type": "function", "function": {name, description, parameters}}`), beside the usual
fields: `instruction` is the last user turn and `output` the last assistant turn (its
text, or its calls as JSON), so the split, dedupe and evaluation work as for any record.
Training renders `messages` with the model's own template and the tools, and puts the
loss on every assistant turn, calls included, never on tool results (tasks/formatting.py).
"""

from __future__ import annotations

from typing import Any

import orjson

from tasks.data.shapes import ASSISTANT_ROLES, USER_ROLES, Rejected

CALL_ROLES = {"function_call", "tool_call"}
RESULT_ROLES = {"observation", "tool", "function", "ipython"}


def is_tool_record(record: dict[str, Any], key: str, role_key: str) -> bool:
    """Whether a messages/conversations record holds tool calls, results or a tool list."""
    if record.get("tools"):
        return True
    turns = record.get(key)
    if not isinstance(turns, list):
        return False
    return any(
        isinstance(t, dict)
        and (t.get(role_key) in CALL_ROLES | RESULT_ROLES or bool(t.get("tool_calls")))
        for t in turns
    )


def _json(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            raise Rejected("bad_tool_call", f"{what} is text that is not JSON") from None
    return value


def _tools(value: Any) -> list[dict[str, Any]]:
    tools = _json(value, "field 'tools'") if value else []
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise Rejected("bad_tool_call", "field 'tools' must be a list of function descriptions")
    out = []
    for t in tools:
        spec = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(spec, dict) or type(spec.get("name")) is not str:
            raise Rejected("bad_tool_call", "each tool needs a 'name' (and usually 'parameters')")
        out.append({"type": "function", "function": spec})
    return out


def _call(value: Any) -> dict[str, Any]:
    """One call as {"type": "function", "function": {"name", "arguments": {…}}}."""
    call = value.get("function", value) if isinstance(value, dict) else None
    if not isinstance(call, dict) or type(call.get("name")) is not str:
        raise Rejected("bad_tool_call", "a tool call needs a 'name' and 'arguments'")
    arguments = _json(call.get("arguments") or {}, f"the arguments of {call['name']!r}")
    if not isinstance(arguments, dict):
        raise Rejected("bad_tool_call", f"the arguments of {call['name']!r} must be an object")
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments}}


def _calls(value: Any) -> list[dict[str, Any]]:
    value = _json(value, "a function_call turn")
    return [_call(c) for c in (value if isinstance(value, list) else [value])]


def canonical_tools(record: dict[str, Any], key: str, role_key: str, text_key: str) -> tuple:
    """(instruction, input, output, system, history, rejected, chat) of a tool record."""
    turns = _json(record.get(key), f"field {key!r}")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise Rejected("wrong_type", f"field {key!r} must be a list of objects")
    system = record.get("system") if type(record.get("system")) is str else None
    messages: list[dict[str, Any]] = []
    for t in turns:
        role, text = t.get(role_key), t.get(text_key)
        if text is not None and type(text) is not str:
            raise Rejected("wrong_type", f"each turn's {text_key!r} must be a string")
        if role == "system" and not messages:
            system = text
        elif role in USER_ROLES:
            messages.append({"role": "user", "content": text or ""})
        elif role in CALL_ROLES:
            messages.append({"role": "assistant", "content": "", "tool_calls": _calls(text)})
        elif role in ASSISTANT_ROLES:
            message: dict[str, Any] = {"role": "assistant", "content": text or ""}
            if t.get("tool_calls"):
                message["tool_calls"] = [_call(c) for c in t["tool_calls"]]
            messages.append(message)
        elif role in RESULT_ROLES:
            result = {"role": "tool", "content": text or ""}
            if type(t.get("name")) is str:
                result["name"] = t["name"]
            messages.append(result)
        else:
            raise Rejected("bad_conversation", f"unknown role {role!r} in a tool conversation")
    _check_order(messages)
    last = messages[-1]
    output = last["content"] or orjson.dumps([c["function"] for c in last["tool_calls"]]).decode()
    question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    chat = {"messages": messages, "tools": _tools(record.get("tools"))}
    return question, "", output, system, None, None, chat


def _check_order(messages: list[dict[str, Any]]) -> None:
    """user first; an assistant turn after a user turn or after tool results; results only
    after a call; the last turn the assistant's (an answer or a call to train on)."""
    previous = None
    for m in messages:
        role = m["role"]
        ok = (
            (role == "user" and previous in (None, "assistant"))
            or (role == "assistant" and previous in ("user", "tool"))
            or (role == "tool" and (previous == "tool" or _is_call(previous, messages, m)))
        )
        if not ok:
            raise Rejected(
                "bad_conversation",
                f"a {role} turn cannot follow {previous or 'the start'} "
                "(user → assistant, calls → tool results → assistant)",
            )
        previous = role
    if previous != "assistant":
        raise Rejected("bad_conversation", "the conversation must end with an assistant turn")


def _is_call(previous: str | None, messages: list[dict[str, Any]], m: dict[str, Any]) -> bool:
    i = next(i for i, x in enumerate(messages) if x is m)
    return previous == "assistant" and bool(messages[i - 1].get("tool_calls"))
