"""The OpenAI wire format: request options checked up front, responses and stream chunks.

Everything here is plain data in, plain data out, so the checks are cheap enough to run
before a request is admitted, and each refusal names the field, the value and the limit.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.config import ServeConfig
from tasks.serve.job import Sampling

if TYPE_CHECKING:
    from tasks.serve.tools import Tools


class Refusal(Exception):
    """An HTTP error answered as OpenAI does: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code}}


def bad(message: str, code: str = "invalid_request") -> Refusal:
    return Refusal(400, message, code)


@dataclass
class Options:
    """What one request asks for, checked; `max_tokens` None: fill from the server's caps."""

    chat: bool
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    schema: str | None = None  # a JSON schema (as JSON) to turn into a grammar
    tools: Tools | None = None  # chat only: tools, tool_choice (tasks/serve/tools.py)


def parse_options(body: dict, chat: bool, cfg: ServeConfig) -> Options:
    """Every option of a chat or completion request; the first problem is a 400."""
    opts = Options(chat=chat, stream=_bool(body, "stream"))
    so = body.get("stream_options")
    opts.include_usage = isinstance(so, dict) and so.get("include_usage") is True
    if body.get("n") not in (None, 1):
        raise bad(f"n={body['n']!r}: this server returns one choice per request", "bad_n")
    if body.get("echo"):
        raise bad("echo is not supported", "bad_echo")
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    if asked is not None and (type(asked) is not int or asked < 1):
        raise bad(f"max_tokens must be a positive integer, got {asked!r}", "bad_max")
    if asked is not None and asked > cfg.max_tokens:
        msg = f"max_tokens={asked} exceeds this server's limit of {cfg.max_tokens}"
        raise bad(msg, "max_tokens_too_large")
    opts.max_tokens = asked
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (
        isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)
    ):
        raise bad("stop must be a string or a list of at most 4 strings", "bad_stop")
    opts.stop = stop or []
    opts.top_logprobs = _logprobs(body, chat)
    opts.sampling = _sampling(body, chat)
    opts.schema, grammar = _format(body)
    if grammar is not None:
        opts.sampling.grammar = grammar
    return opts


def _bool(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise bad(f"{key} must be true or false, got {value!r}")


def _number(body: dict, key: str, low: float, high: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad(f"{key} must be a number from {low} to {high}, got {value!r}", f"bad_{key}")
    return float(value)


def _sampling(body: dict, chat: bool) -> Sampling:
    # llama-cpp-python's defaults (0.2 for chat, 0.8 for completions), which a small model
    # needs: at OpenAI's 1.0 a 135M model rambles.
    s = Sampling(
        temperature=_number(body, "temperature", 0, 2, 0.2 if chat else 0.8),
        top_p=_number(body, "top_p", 0, 1, 0.95),
        presence_penalty=_number(body, "presence_penalty", -2, 2, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2, 2, 0.0),
    )
    seed = body.get("seed")
    if seed is not None and (type(seed) is not int or seed < 0):
        raise bad(f"seed must be a non-negative integer, got {seed!r}", "bad_seed")
    s.seed = seed
    bias = body.get("logit_bias")
    if bias is not None:
        try:  # JSON keys are strings; llama.cpp wants token ids
            s.logit_bias = {int(t): float(b) for t, b in bias.items()}
        except (AttributeError, TypeError, ValueError):
            raise bad("logit_bias must map token ids to numbers", "invalid_logit_bias") from None
    return s


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives to report per token; None when logprobs are not asked for."""
    if chat:
        if not _bool(body, "logprobs"):
            return None
        top = body.get("top_logprobs") or 0
        limit, key = 20, "top_logprobs"
    else:
        top = body.get("logprobs")
        if top is None:
            return None
        limit, key = 5, "logprobs"
    if type(top) is not int or not 0 <= top <= limit:
        raise bad(f"{key} must be an integer from 0 to {limit}, got {top!r}", "bad_logprobs")
    return top


def _format(body: dict) -> tuple[str | None, str | None]:
    """(JSON schema, GBNF grammar) from `response_format` or a raw `grammar`."""
    from llama_cpp.llama_grammar import JSON_GBNF

    grammar, fmt = body.get("grammar"), body.get("response_format")
    if grammar is not None and not (isinstance(grammar, str) and grammar.strip()):
        raise bad("grammar must be a GBNF text with a `root` rule", "bad_grammar")
    if fmt is None or fmt == {"type": "text"}:
        return None, grammar
    if grammar is not None:
        raise bad("give either response_format or grammar, not both", "bad_grammar")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        schema = fmt.get("schema")  # llama-cpp-python's extension; plain JSON without it
        return (json.dumps(schema), None) if isinstance(schema, dict) else (None, JSON_GBNF)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return json.dumps(schema), None
        raise bad("response_format.json_schema.schema must be a JSON schema object", "bad_schema")
    raise bad(
        f"response_format.type must be text, json_object or json_schema, got {kind!r}",
        "bad_response_format",
    )


def schema_grammar(schema: str) -> str:
    """GBNF for a JSON schema (llama-cpp-python's converter); a 400 when it cannot."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(schema)
    except Exception as exc:  # the converter asserts on what it does not know
        raise bad(f"response_format: unsupported JSON schema ({exc})", "bad_schema") from None


# --- responses ------------------------------------------------------------------------------


class Reply:
    """One request's answer in the shape of its endpoint, whole or as stream chunks."""

    def __init__(self, chat: bool, model: str, piece: Any) -> None:
        self.chat, self.model, self.piece = chat, model, piece
        prefix = "chatcmpl" if chat else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4()}", int(time.time())
        self.offset = 0  # characters of text so far (completions' text_offset)

    def _head(self) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def logprobs(self, entries: list, text_start: int = 0) -> dict | None:
        """OpenAI's logprobs object for `entries` [(token, logprob, [(token, logprob)])]."""
        if not entries:
            return None
        text = lambda t: self.piece(t).decode("utf-8", errors="replace")  # noqa: E731
        if self.chat:
            content = [
                {
                    "token": text(t),
                    "logprob": lp,
                    "bytes": list(self.piece(t)),
                    "top_logprobs": [
                        {"token": text(a), "logprob": alp, "bytes": list(self.piece(a))}
                        for a, alp in top
                    ],
                }
                for t, lp, top in entries
            ]
            return {"content": content}
        offsets, at = [], text_start
        for t, _, _ in entries:
            offsets.append(at)
            at += len(text(t))
        return {
            "tokens": [text(t) for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{text(a): alp for a, alp in top} for _, _, top in entries],
            "text_offset": offsets,
        }

    def whole(
        self, text: str, entries: list, reason: str, usage: dict, calls: list | None = None
    ) -> dict:
        lp = self.logprobs(entries)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message = {"role": "assistant", "content": text or None, "tool_calls": calls}
                reason = "tool_calls" if reason == "stop" else reason
            choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}
        return self._head() | {"choices": [choice], "usage": usage}

    def chunk(self, text: str | None, entries: list, reason: str | None = None) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        lp = self.logprobs(entries, self.offset)
        self.offset += len(text or "")
        if self.chat:
            delta = {"role": "assistant"} if text is None else {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": reason}
        return self._head() | {"object": kind, "choices": [choice]}

    def call_chunk(self, index: int, call: dict) -> dict:
        """One whole call as a stream delta; its arguments come in one piece, since a call is
        held back until it has ended (a partial call could still turn out to be text)."""
        delta = {"tool_calls": [{"index": index} | call]}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._head() | {"object": "chat.completion.chunk", "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head() | {"object": kind, "choices": [], "usage": usage}


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
