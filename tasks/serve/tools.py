"""Tool calling on /v1/chat/completions: `tools`, `tool_choice` and `tool_calls` as OpenAI
sends and reads them, rendered and parsed as training did (tasks/conversation.py).

A request's messages and tools go through `conversation.for_template`, so the served prompt
is the trained one: the model's own template with `tools=` when it knows tools, else the
Hermes convention as plain turns. The server reads calls written as

    <tool_call>
    {"name": …, "arguments": {…}}
    </tool_call>

which is what the fallback writes and what Qwen 2.5's and Hermes' templates write; a
template that writes calls any other way is found out by rendering a probe call through it,
and a request that offers it tools is refused rather than answered with unparsed calls.
`tool_choice` "required" or a named function turns into a llama.cpp grammar for exactly
that text, the arguments following each function's `parameters` schema.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from tasks.conversation import for_template, parse_calls
from tasks.serve.protocol import Options, bad

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# OpenAI's own limit on functions per request.
MAX_TOOLS = 128
# A tool listing this long is about 16k tokens, ten times the default serve.max_prompt_tokens:
# it could never fit an accepted prompt, so it is refused before admission, sparing the
# tokenizer and the grammar converter the work.
MAX_TOOLS_CHARS = 65_536
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
PROBE = {"name": "probe", "arguments": {"x": 1}}
_hermes: dict[str | None, bool] = {}  # chat template → whether it writes Hermes calls


@dataclass
class Tools:
    """A request's `tools`, `tool_choice` and `parallel_tool_calls`, checked."""

    tools: list[dict[str, Any]]
    choice: str = "auto"  # none | auto | required | function
    name: str | None = None  # the function tool_choice names
    parallel: bool = True

    @property
    def offered(self) -> list[dict[str, Any]] | None:
        """The tools the model sees: none with tool_choice "none", as OpenAI hides them."""
        return self.tools if self.tools and self.choice != "none" else None

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")


# --- the request ----------------------------------------------------------------------------


def parse_tools(body: dict, opts: Options) -> Tools | None:
    """`tools`, `tool_choice`, `parallel_tool_calls`; None when the request has none."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is None and choice is None:
        return None
    if raw is not None and not isinstance(raw, list):
        raise bad(f"tools must be a list of functions, got {_short(raw)}", "bad_tools")
    raw = raw or []
    if len(raw) > MAX_TOOLS:
        raise bad(f"tools has {len(raw)} functions; the limit is {MAX_TOOLS}", "bad_tools")
    if len(json.dumps(raw)) > MAX_TOOLS_CHARS:
        msg = f"tools is over {MAX_TOOLS_CHARS} characters of JSON; describe fewer functions"
        raise bad(msg, "bad_tools")
    tools = Tools([_tool(t, f"tools[{i}]") for i, t in enumerate(raw)])
    names = [t["function"]["name"] for t in tools.tools]
    if dup := next((n for n in names if names.count(n) > 1), None):
        raise bad(f"tools: the function name {dup!r} is given twice", "bad_tools")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad(f"parallel_tool_calls must be true or false, got {_short(parallel)}")
    tools.parallel = parallel is not False
    if choice is None or choice in ("none", "auto", "required"):
        tools.choice = choice or ("auto" if names else "none")
    elif isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        tools.name = fn.get("name") if isinstance(fn, dict) else None
        if tools.name not in names:
            msg = f"tool_choice.function.name {tools.name!r} is not among tools ({names})"
            raise bad(msg, "bad_tool_choice")
        tools.choice = "function"
    else:
        msg = (
            'tool_choice must be "none", "auto", "required" or '
            f'{{"type": "function", "function": {{"name": …}}}}, got {_short(choice)}'
        )
        raise bad(msg, "bad_tool_choice")
    if tools.choice == "required" and not names:
        raise bad('tool_choice "required" needs tools', "bad_tool_choice")
    if tools.forced and (opts.schema is not None or opts.sampling.grammar is not None):
        msg = "a forced tool_choice is a grammar itself: give it or response_format/grammar"
        raise bad(msg, "bad_tool_choice")
    return tools


def _tool(t: Any, where: str) -> dict[str, Any]:
    if not isinstance(t, dict) or t.get("type") != "function":
        raise bad(f'{where}.type must be "function"', "bad_tools")
    fn = t.get("function")
    if not isinstance(fn, dict):
        raise bad(f"{where}.function must be an object with a name", "bad_tools")
    name = fn.get("name")
    if not (isinstance(name, str) and NAME_RE.fullmatch(name)):
        msg = f"{where}.function.name must be 1 to 64 letters, digits, _ or -, got {_short(name)}"
        raise bad(msg, "bad_tools")
    if not isinstance(fn.get("description", ""), str):
        raise bad(f"{where}.function.description must be text", "bad_tools")
    if not isinstance(fn.get("parameters", {}), dict):
        raise bad(f"{where}.function.parameters must be a JSON schema object", "bad_tools")
    return {"type": "function", "function": fn}  # as written: training renders tools as given


def chat_messages(value: Any) -> list[dict[str, Any]]:
    """Request messages as the templates (and training) take them: text content, calls
    with `arguments` as objects, tool results; each problem names its message."""
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list", "invalid_messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"{where} needs a role", "invalid_messages")
        role, content = m["role"], _text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise bad(f"{where}.tool_calls must be a list", "invalid_messages")
            calls = [_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
            out.append({"role": "assistant", "content": content or "", "tool_calls": calls})
            continue
        if content is None:
            raise bad(f"{where}.content must be text", "invalid_messages")
        if role == "tool" and not (out and (out[-1].get("tool_calls") or out[-1]["role"] == role)):
            msg = f"{where}: a tool result must follow an assistant message with tool_calls"
            raise bad(msg, "invalid_messages")
        out.append({"role": role, "content": content})
        if role == "tool" and isinstance(m.get("name"), str):
            out[-1]["name"] = m["name"]
    return out


def _text(content: Any) -> str | None:
    """OpenAI content may be a list of parts; llama.cpp templates want text."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else None


def _call(c: Any, where: str) -> dict[str, Any]:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad(f"{where}.function.name must be text", "invalid_messages")
    arguments = fn.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            arguments = None
    if not isinstance(arguments, dict):
        given = _short(fn.get("arguments"))
        msg = f"{where}.function.arguments must be a JSON object (as text), got {given}"
        raise bad(msg, "invalid_messages")
    # Without the call's id, as training saw it: the templates render name and arguments.
    return {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the prompt and the grammar -----------------------------------------------------------


def render(engine: Any, messages: list[dict], tools: Tools | None) -> tuple[list[int], list[str]]:
    """Token ids and stop strings of the conversation, tools included, as training rendered
    it."""
    import jinja2

    template = engine.tokenizer.metadata.get("tokenizer.chat_template")
    offered = tools.offered if tools else None
    if offered and not hermes_calls(engine.formatter, template):
        raise bad(
            "this model's chat template writes tool calls in a form the server does not "
            'read (it reads <tool_call>{"name": …, "arguments": …}</tool_call>, as Qwen 2.5, '
            'Hermes and templates without tools write): send tool_choice "none" or no tools',
            "unsupported_tools",
        )
    messages, offered = for_template(SimpleNamespace(chat_template=template), messages, offered)
    try:
        return engine.chat_prompt(messages, offered)
    except (ValueError, TypeError, jinja2.TemplateError) as exc:
        raise bad(f"the model's chat template refuses these messages: {exc}") from None


def hermes_calls(formatter: Any, template: str | None) -> bool:
    """Whether `template` (through `formatter`) writes a call exactly as the grammar does."""
    import jinja2

    if template not in _hermes:
        tool = {"type": "function", "function": {"name": "probe", "parameters": {}}}
        messages = [
            {"role": "user", "content": "?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": PROBE}]},
        ]
        messages, tools = for_template(SimpleNamespace(chat_template=template), messages, [tool])
        try:
            text = formatter(messages=messages, tools=tools).prompt
        except (ValueError, TypeError, jinja2.TemplateError):
            text = ""
        _hermes[template] = f"{OPEN}\n{json.dumps(PROBE)}\n{CLOSE}" in text
    return _hermes[template]


def call_grammar(tools: Tools) -> str:
    """GBNF for what a forced tool_choice allows: one call of the named function, or one
    or more calls (one when parallel_tool_calls is false) of any tool, in the trained form."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    calls = []
    for i, tool in enumerate(tools.tools):
        fn = tool["function"]
        if tools.name not in (None, fn["name"]):
            continue
        try:  # a `$ref` is relative to its own parameters: resolved before they are nested
            params = converter.resolve_refs(copy.deepcopy(fn.get("parameters") or {}), f"t{i}")
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise bad(f"tools[{i}].function.parameters: {exc}", "bad_schema") from None
        params = params or {"type": "object", "properties": {}}  # no parameters: {}
        calls.append({
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"],
        })  # fmt: skip
    try:
        converter.visit(calls[0] if len(calls) == 1 else {"oneOf": calls}, "call")
    except Exception as exc:  # the converter asserts on what it does not know
        raise bad(f"tools: a parameters schema has no grammar ({exc})", "bad_schema") from None
    one = r'"<tool_call>\n" call "\n</tool_call>"'
    root = rf'{one} ("\n" {one})*' if tools.name is None and tools.parallel else one
    return converter.format_grammar() + f"\nroot ::= {root}\n"


# --- the answer ---------------------------------------------------------------------------


def split_calls(text: str, tools: Tools | None) -> tuple[str, list[dict[str, Any]]]:
    """A whole answer → (its text outside the calls, the calls); no calls: (text, [])."""
    if tools is None or tools.offered is None:
        return text, []
    rest, calls = parse_calls(text)
    if not calls:
        return text, []
    start = rest.rfind(OPEN)
    if start >= 0 and CLOSE not in rest[start:]:  # a further call cut off by max_tokens
        rest = rest[:start].rstrip()
    return rest, _ids(calls, tools)


def _ids(calls: list[dict[str, Any]], tools: Tools) -> list[dict[str, Any]]:
    """Calls with ids unique across requests (a client matches results to calls by id)."""
    calls = calls if tools.parallel else calls[:1]
    return [c | {"id": f"call_{uuid.uuid4().hex[:24]}"} for c in calls]


class CallStream:
    """Streamed text → content that is safe to send now; the calls once the answer ends.

    Text that may be the start of a call (a tail that begins `<tool_call>`) and whitespace
    that may precede one are held back; from the first `<tool_call>` on, everything is held.
    Sent text plus `finish()`'s text is the whole answer's text, but for leading whitespace.
    """

    def __init__(self, tools: Tools) -> None:
        self.tools, self.sent, self.held, self.calling = tools, "", "", False

    def feed(self, text: str) -> str:
        self.held += text
        if self.calling:
            return ""
        at = self.held.find(OPEN)
        self.calling = at >= 0
        end = at if self.calling else len(self.held) - _open_prefix(self.held)
        end = len(self.held[:end].rstrip())
        out, self.held = self.held[:end], self.held[end:]
        self.sent += out
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(the text still to send, the calls)."""
        held, self.held = self.held, ""
        if not self.calling:
            return held, []
        rest, calls = split_calls(self.sent + held, self.tools)
        if not calls:  # a broken call is text, as in a whole answer
            return held, []
        return rest[len(self.sent.lstrip()) :], calls


def _open_prefix(text: str) -> int:
    """Length of the longest end of `text` that is the beginning of `<tool_call>`."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0
