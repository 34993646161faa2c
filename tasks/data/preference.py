"""Preference records (a prompt, a chosen and a rejected answer) in the shapes users bring.

    {"prompt": "…", "chosen": "…", "rejected": "…"}                        plain strings
    {"prompt": [messages], "chosen": {…} | [{…}] | "…", "rejected": …}     TRL's explicit prompt
    {"conversations": [ShareGPT turns], "chosen": {"from": "gpt", "value": "…"},
     "rejected": {…}}                                                      LLaMA-Factory's ranking form
    {"messages": [turns], "chosen": …, "rejected": …}                      OpenAI-style turns
    {"chosen": [whole conversation], "rejected": [whole conversation]}     implicit prompt: the
                                                                           turns both share (HH-RLHF,
                                                                           UltraFeedback binarized)

Each becomes the fields of an SFT record (instruction = the last user turn, output = the
chosen answer, system, history of earlier pairs) plus `rejected`, so cleaning, dedupe,
rejects and the prompt-hash split are the SFT ones: a prompt's pairs all land in one split.
"""

from __future__ import annotations

from typing import Any

import orjson

from tasks.data.shapes import ASSISTANT_ROLES, USER_ROLES, Rejected

CONTEXT_KEYS = ("prompt", "conversations", "messages")


def _as_turns(value: Any, field: str) -> list[tuple[str, str]]:
    """[(role, text)] of a list of OpenAI (`role`/`content`) or ShareGPT (`from`/`value`)
    turns; a CSV cell holding such a list as JSON text is parsed first."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise Rejected("wrong_type", f"field {field!r} is text that is not JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise Rejected("wrong_type", f"field {field!r} must be a text or a list of turns")
    turns = []
    for t in value:
        role = t.get("role", t.get("from"))
        text = t.get("content", t.get("value"))
        if type(role) is not str or type(text) is not str:
            raise Rejected(
                "wrong_type",
                f"each turn of {field!r} needs a string role/from and content/value",
            )
        role = "user" if role in USER_ROLES else "assistant" if role in ASSISTANT_ROLES else role
        turns.append((role, text))
    return turns


def _answer(value: Any, field: str) -> str:
    """The text of one assistant answer: a string, a turn, or a list of one turn."""
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return value
    turns = _as_turns(value, field)
    if len(turns) != 1 or turns[0][0] != "assistant":
        roles = ",".join(r for r, _ in turns) or "nothing"
        raise Rejected("bad_conversation", f"{field!r} must be one assistant answer; got {roles}")
    return turns[0][1]


def _implicit(record: dict[str, Any]) -> tuple[list[tuple[str, str]], str, str]:
    """Context and answers of two whole conversations that differ only in the last turn."""
    chosen = _as_turns(record["chosen"], "chosen")
    rejected = _as_turns(record["rejected"], "rejected")
    if not chosen or not rejected or chosen[:-1] != rejected[:-1]:
        raise Rejected(
            "prompt_mismatch",
            "'chosen' and 'rejected' conversations must share every turn but the last "
            "(or give the shared turns as 'prompt')",
        )
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1][0] != "assistant":
            raise Rejected("bad_conversation", f"{field!r} must end with an assistant answer")
    return chosen[:-1], chosen[-1][1], rejected[-1][1]


def canonical_pair(record: dict[str, Any]) -> tuple:
    """(instruction, input, output = chosen, system, history, rejected), or `Rejected`."""
    for side in ("chosen", "rejected"):
        if record.get(side) in (None, "", []):
            raise Rejected(f"empty_{side}", f"field {side!r} is missing or empty")
    key = next((k for k in CONTEXT_KEYS if k in record), None)
    if key is None:
        context, chosen, rejected = _implicit(record)
    else:
        value = record[key]
        plain = isinstance(value, str) and not value.lstrip().startswith("[")
        context = [("user", value)] if plain else _as_turns(value, key)
        chosen, rejected = (
            _answer(record["chosen"], "chosen"),
            _answer(record["rejected"], "rejected"),
        )
    system = None
    if context and context[0][0] == "system":
        system = context[0][1]
        context = context[1:]
    roles = [r for r, _ in context]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        got = ",".join(roles) or "nothing"
        raise Rejected(
            "bad_conversation",
            f"the prompt's turns must alternate user,assistant and end with user; got {got}",
        )
    texts = [t for _, t in context]
    pairs = [texts[i : i + 2] for i in range(0, len(texts) - 1, 2)]
    return texts[-1], "", chosen, system, pairs or None, rejected
