"""Record shapes: which columns hold the prompt and the response, and the canonical record.

- alpaca: `instruction`, `input`, `output`, optional `system`, `history` ([[q, a], ...]);
- columns: `data.prompt_column` → instruction, `data.response_column` → output;
- messages: `messages` [{role, content}]; sharegpt: `conversations` [{from, value}]: the
  last user turn becomes `instruction`, the last assistant turn `output`, earlier pairs
  `history`, a leading system turn `system`.

A file's shape comes from its column names (`detect_shape`), unless `data.format` names
one. `canonical` turns one record into the canonical fields or raises `Rejected`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from tasks.config import DataConfig, UserError

USER_ROLES = {"user", "human"}
ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot", "chatgpt"}
PROMPT_NAMES = ("instruction", "prompt", "question", "query", "input", "q")
RESPONSE_NAMES = ("output", "response", "answer", "completion", "target", "a")
# a chat shape's list of turns, and the keys of a turn's role and text
CHAT_KEYS = {
    "messages": ("messages", "role", "content"),
    "sharegpt": ("conversations", "from", "value"),
}


class DataError(UserError):
    """A dataset file that cannot be read as it stands (missing, empty, malformed)."""


class Rejected(Exception):
    """One record that cannot be normalised: a reason id and a sentence for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def detect_shape(path: Path, keys: list[str], cfg: DataConfig) -> str:
    """The shape of a file from its column names (the most common keys for JSON)."""
    columns = cfg.prompt_column in keys and cfg.response_column in keys
    if cfg.format != "auto":
        if cfg.format == "columns" and not columns:
            raise DataError(_columns_hint(path, keys, cfg))
        return cfg.format
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if columns and (cfg.prompt_column, cfg.response_column) != ("instruction", "output"):
        return "columns"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    raise DataError(_columns_hint(path, keys, cfg))


def record_shape(record: Any, file_shape: str, cfg: DataConfig) -> str:
    """A record's own shape where it differs from its file's: a file made by concatenating
    two datasets (ShareGPT `conversations` records after `messages` ones, say) holds both,
    and each record is read in its own shape. The file's shape stays the default: a record
    that fits no shape is then rejected with the fields the file's shape asks for."""
    if cfg.format != "auto" or not isinstance(record, dict):
        return file_shape
    defining = {
        "preference": "chosen",
        "messages": "messages",
        "sharegpt": "conversations",
        "alpaca": "instruction",
        "columns": cfg.prompt_column,
    }
    if defining[file_shape] in record:  # almost every record: one dict lookup
        return file_shape
    try:
        return detect_shape(Path(), list(record), cfg)
    except DataError:
        return file_shape


def _columns_hint(path: Path, keys: list[str], cfg: DataConfig) -> str:
    prompt = next((k for k in PROMPT_NAMES if k in keys), keys[0] if keys else "PROMPT")
    rest = [k for k in keys if k != prompt]
    response = next((k for k in RESPONSE_NAMES if k in rest), rest[0] if rest else "RESPONSE")
    return (
        f"{path}: no prompt/response columns: found {keys}; expected instruction and "
        f"output (alpaca), messages, conversations, or data.prompt_column="
        f"{cfg.prompt_column!r} and data.response_column={cfg.response_column!r}; "
        f"fix: --set data.prompt_column={prompt} --set data.response_column={response}"
    )


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if type(value) is not str:
        raise Rejected("wrong_type", f"field {key!r} is {type(value).__name__}, expected string")
    return value


def _optional_text(record: dict[str, Any], key: str | None) -> str | None:
    return _text(record, key) or None if key else None


def _history(value: Any) -> list[list[str]] | None:
    if not value:
        return None
    ok = isinstance(value, list) and all(
        isinstance(p, list | tuple) and len(p) == 2 and all(type(s) is str for s in p)
        for p in value
    )
    if not ok:
        raise Rejected("wrong_type", "field 'history' must be a list of [question, answer]")
    return [list(p) for p in value]


def _turns(record: dict[str, Any], key: str, role_key: str, text_key: str) -> tuple:
    turns = record.get(key)
    if isinstance(turns, str):  # a chat column in CSV holds JSON text
        try:
            turns = orjson.loads(turns)
        except orjson.JSONDecodeError:
            raise Rejected("wrong_type", f"field {key!r} is text that is not JSON") from None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise Rejected("wrong_type", f"field {key!r} must be a list of objects")
    system = None
    roles, texts = [], []
    for t in turns:
        role, text = t.get(role_key), t.get(text_key)
        if type(role) is not str or type(text) is not str:
            raise Rejected("wrong_type", f"each turn needs string {role_key!r}, {text_key!r}")
        if role == "system" and not roles:
            system = text
            continue
        roles.append(
            "user" if role in USER_ROLES else "assistant" if role in ASSISTANT_ROLES else role
        )
        texts.append(text)
    expected = ["user", "assistant"] * (len(roles) // 2)
    if not roles or roles != expected or len(roles) % 2:
        got = ",".join(roles) or "nothing"
        raise Rejected(
            "bad_conversation",
            f"turns must alternate user,assistant and end with assistant; got {got}",
        )
    pairs = [texts[i : i + 2] for i in range(0, len(texts) - 2, 2)]
    return texts[-2], "", texts[-1], system, pairs or None


def canonical(record: Any, shape: str, cfg: DataConfig) -> tuple:
    """(instruction, input, output, system, history, rejected, chat) of one JSON record, or
    `Rejected`. `rejected` is a preference pair's rejected answer (tasks/data/preference.py),
    `chat` a tool conversation's messages and tools (tasks/data/tools.py); None otherwise."""
    if isinstance(record, dict):
        # both modules import this one
        from tasks.data.preference import canonical_pair
        from tasks.data.tools import canonical_tools, is_tool_record

        if shape == "preference":
            return (*canonical_pair(record), None)
        if shape in CHAT_KEYS and is_tool_record(record, *CHAT_KEYS[shape][:2]):
            return canonical_tools(record, *CHAT_KEYS[shape])
    return (*_sft_fields(record, shape, cfg), None, None)


def _sft_fields(record: Any, shape: str, cfg: DataConfig) -> tuple:
    if not isinstance(record, dict):
        raise Rejected("not_object", f"a record must be a JSON object, got {type(record).__name__}")
    if shape == "alpaca":
        get = record.get
        instruction, input_, output = get("instruction"), get("input", ""), get("output")
        plain = "system" not in record and "history" not in record
        if plain and type(instruction) is type(input_) is type(output) is str:  # most records
            return instruction, input_, output, None, None
        return (
            _text(record, "instruction"),
            _text(record, "input"),
            _text(record, "output"),
            _optional_text(record, "system"),
            _history(record.get("history")),
        )
    if shape == "columns":
        return (
            _text(record, cfg.prompt_column),
            "",
            _text(record, cfg.response_column),
            _optional_text(record, cfg.system_column),
            None,
        )
    return _turns(record, *CHAT_KEYS[shape])
