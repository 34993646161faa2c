"""Cleaning one batch of records: the part of the data stage that needs no other batch.

    fill {{placeholders}} → control characters → whitespace → NFC      (pyarrow, per column)
    → reject empty / too long / too many tokens                         (pyarrow masks)
    → canonical JSON of each record, its fingerprint and its split      (pyarrow, xxh3)

Everything runs on pyarrow string arrays, a batch (up to 32,768 records) at a time: one
RE2 pass finds the few records that need a fix and only those are rewritten; NFC runs on
non-ASCII text only; the canonical JSON is built a column at a time, byte for byte what
orjson writes (records with history go through orjson). The result, `Prepared`, is small
enough to cross a process boundary: flat arrays and one buffer of JSON.

A record's split comes from `xxh3_64(instruction + "\0" + input, seed)`: adding records
never moves an existing one, and records with the same prompt land in the same split.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from tasks.config import DataConfig
from tasks.data.ingest import Batch

CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\x{200b}\x{feff}]"
# (pattern, replacement) in order; RE2 syntax, applied only to records that match one.
CONTROL_FIXES = [(r"\r\n?", "\n"), (CONTROL, "")]
WHITESPACE_FIXES = [
    (r"[ \t]+\n", "\n"),  # spaces at line ends
    (r"\n{3,}", "\n\n"),  # at most one blank line
    (r"(\S)[ \t]{2,}", r"\1 "),  # runs inside a line; leading indentation is kept
]


def clean_text(values: pa.Array, cfg: DataConfig) -> pa.Array:
    """Placeholders, NFC, control characters and whitespace for one string array."""
    fixes = [
        (_literal("{{" + k + "}}"), v.replace("\\", "\\\\")) for k, v in cfg.placeholders.items()
    ]
    fixes += CONTROL_FIXES if cfg.strip_control else []
    fixes += WHITESPACE_FIXES if cfg.collapse_whitespace else []
    if fixes:
        needs = pc.fill_null(pc.match_substring_regex(values, "|".join(p for p, _ in fixes)), False)
        if pc.any(needs).as_py():
            subset = values.filter(needs)
            for pattern, replacement in fixes:
                subset = pc.replace_substring_regex(subset, pattern, replacement)
            values = pc.replace_with_mask(values, needs, subset)
    if cfg.normalize_unicode:  # only non-ASCII text can change; that skips most of English
        needs = pc.fill_null(pc.invert(pc.string_is_ascii(values)), False)
        if pc.any(needs).as_py():
            normal = pc.utf8_normalize(values.filter(needs), "NFC")
            values = pc.replace_with_mask(values, needs, normal)
    if cfg.collapse_whitespace:
        values = pc.utf8_trim_whitespace(values)
    return values


def _literal(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}" else c for c in text)


def _clean_history(history: list[Any], cfg: DataConfig) -> list[Any]:
    flat = [text for turns in history if turns for pair in turns for text in pair]
    if not flat:
        return history
    cleaned = iter(clean_text(_array(flat), cfg).to_pylist())
    return [[[next(cleaned), next(cleaned)] for _ in turns] if turns else None for turns in history]


def _clean_chats(chats: list[Any], cfg: DataConfig) -> list[Any]:
    """Tool conversations: every turn's text cleaned as the other fields are (placeholders
    filled, whitespace normalised); calls' arguments and the tools stay as written."""
    flat = [m["content"] for chat in chats if chat for m in chat["messages"]]
    if not flat:
        return chats
    cleaned = iter(clean_text(_array(flat), cfg).to_pylist())
    return [
        {**chat, "messages": [{**m, "content": next(cleaned)} for m in chat["messages"]]}
        if chat
        else None
        for chat in chats
    ]


def _chat_chars(chats: list[Any]) -> pa.Array:
    return pa.array(
        [len(orjson.dumps(chat["messages"])) if chat else 0 for chat in chats], pa.int32()
    )


def _array(values: pa.Array | list[str | None]) -> pa.Array:
    return values if isinstance(values, pa.Array) else pa.array(values, pa.string())


def _chars(fields: dict[str, pa.Array], history: list[Any] | None) -> pa.Array:
    lengths = [pc.fill_null(pc.utf8_length(v), 0) for v in fields.values()]
    chars = pc.add(pc.add(lengths[0], lengths[1]), pc.add(lengths[2], lengths[3]))
    if len(lengths) > 4:  # a preference pair's rejected answer
        chars = pc.add(chars, lengths[4])
    if history:
        turns = [sum(len(a) + len(b) for a, b in h or ()) for h in history]
        chars = pc.add(chars, pa.array(turns, pa.int32()))
    return chars


def _tokens(tokenizer: Any, fields: dict[str, pa.Array], history: list[Any] | None) -> pa.Array:
    texts = []
    for i, parts in enumerate(zip(*(v.to_pylist() for v in fields.values()), strict=True)):
        turns = [t for pair in history[i] or () for t in pair] if history else []
        texts.append("\n".join([p for p in parts if p] + turns))
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    return pa.array([len(e.ids) for e in encoded], pa.int64())


@dataclass
class Prepared:
    """One batch cleaned and filtered: all that is left is dedupe and writing."""

    file: str
    shape: str
    unit: str
    records: int  # records read, kept or not
    blank: int
    lines: int  # JSON Lines: lines read up to the end of this batch
    rejected: list[dict[str, Any]]
    # Flat arrays, not lists of ints: a worker's result crosses a pipe, and pickling 25k
    # Python ints per field cost more than the cleaning.
    positions: array  # line or row of each record in the batch
    index: array  # batch index of each surviving record
    original: Callable[[int], Any]  # batch index → the record as read
    blob: pa.Buffer | bytearray | Path  # the kept records' canonical JSON, back to back
    ends: array  # where each one ends in `blob`
    splits: bytes  # 0 train, 1 dev, 2 test
    fingerprints: bytes  # 16 bytes of xxh3-128 of each JSON: a false match has odds 2**-128


def prepare(batch: Batch, cfg: DataConfig, tokenizer: Any = None) -> Prepared:
    """Clean one batch, reject what is empty or too long, assign splits."""
    fields = {k: clean_text(_array(v), cfg) for k, v in batch.fields.items()}
    history = _clean_history(batch.history, cfg) if batch.history else None
    chats = _clean_chats(batch.chats, cfg) if batch.chats else None
    chars = _chars(fields, history)
    if chats:  # a tool conversation's length is its turns' (JSON, calls included)
        chars = pc.max_element_wise(chars, _chat_chars(chats))
    checks = [  # (reason, mask, why); the first that applies is the reason given
        ("empty_prompt", pc.equal(pc.utf8_length(fields["instruction"]), 0), "instruction is empty"),
        ("empty_response", pc.equal(pc.utf8_length(fields["output"]), 0), "output is empty"),
        ("too_long", pc.greater(chars, cfg.max_chars), f"characters > data.max_chars={cfg.max_chars:,}"),
    ]  # fmt: skip
    if "rejected" in fields:  # preference pairs; null where a mixed file has SFT records
        rejected_len = pc.utf8_length(fields["rejected"])
        same = pc.fill_null(pc.equal(fields["output"], fields["rejected"]), False)
        checks[2:2] = [
            ("empty_rejected", pc.fill_null(pc.equal(rejected_len, 0), False), "rejected answer is empty"),
            ("same_answers", same, "chosen and rejected answers are identical"),
        ]  # fmt: skip
    counts = {"too_long": chars}  # shown in the detail of a rejection
    if cfg.max_tokens:
        counts["too_many_tokens"] = tokens = _tokens(tokenizer, fields, history)
        why = f"tokens > data.max_tokens={cfg.max_tokens:,}"
        checks.append(("too_many_tokens", pc.greater(tokens, cfg.max_tokens), why))
    rejected = list(batch.rejected)
    bad = pa.array([False] * len(batch.positions), pa.bool_())
    for reason, mask, why in checks:
        for i in pc.indices_nonzero(pc.and_not(mask, bad)).to_pylist():
            count = counts.get(reason)
            detail = f"{count[i].as_py():,} {why}" if count else f"{why} after cleaning"
            where = {"file": batch.file, batch.unit: batch.positions[i]}
            rejected.append(
                {"reason": reason, "detail": detail, **where, "record": batch.original(i)}
            )
        bad = pc.or_(bad, mask)
    keep = pc.indices_nonzero(pc.invert(bad))
    kept = {k: v.take(keep) for k, v in fields.items()}
    turns = [history[i] for i in keep.to_pylist()] if history else None
    kept_chats = [chats[i] for i in keep.to_pylist()] if chats else None
    if turns or kept_chats or "rejected" in kept or not cfg.strip_control:  # orjson's work
        blob, ends = _json_by_record(kept, turns, kept_chats)
    else:
        blob, ends = _buffer_and_ends(_json_by_column(kept))
    fingerprints, splits = _fingerprints_and_splits(blob, ends, kept, cfg)
    return Prepared(
        batch.file, batch.shape, batch.unit, len(batch.positions) + len(batch.rejected),
        batch.blank, batch.lines, rejected, array("q", batch.positions),
        array("q", keep.to_pylist()), batch.original, blob, ends, splits, fingerprints,
    )  # fmt: skip


# What orjson writes for the characters that JSON escapes and that can remain once control
# characters are stripped; `_json_by_column` must give byte for byte what `_json_by_record` does.
JSON_ESCAPES = [("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\t", "\\t")]


def _json_string_body(values: pa.Array) -> pa.Array:
    needs = pc.fill_null(pc.match_substring_regex(values, r'[\\"\n\t]'), False)
    if pc.any(needs).as_py():
        subset = values.filter(needs)
        for old, new in JSON_ESCAPES:
            subset = pc.replace_substring(subset, old, new)
        values = pc.replace_with_mask(values, needs, subset)
    return values


def _json_by_column(kept: dict[str, pa.Array]) -> pa.Array:
    """The canonical JSON of every record, built a column at a time."""
    body = {k: _json_string_body(v) for k, v in kept.items()}
    has_system = pc.fill_null(pc.greater(pc.utf8_length(kept["system"]), 0), False)
    system = pc.binary_join_element_wise(',"system":"', body["system"], '"', "")
    return pc.binary_join_element_wise(
        '{"instruction":"', body["instruction"], '","input":"', body["input"],
        '","output":"', body["output"], '"', pc.if_else(has_system, system, ""), "}", "",
    )  # fmt: skip


def _json_by_record(
    kept: dict[str, pa.Array], turns: list[Any] | None, chats: list[Any] | None = None
) -> tuple[bytearray, array]:
    """The canonical JSON of every record, written by orjson (records with history, pairs,
    tool conversations)."""
    blob, ends = bytearray(), array("q")
    columns = [v.to_pylist() for v in kept.values()]
    pairs = kept.get("rejected")
    for i, (instruction, input_, output, system, *rest) in enumerate(zip(*columns, strict=True)):
        record = {"instruction": instruction, "input": input_, "output": output}
        if system:
            record["system"] = system
        if turns and turns[i]:
            record["history"] = turns[i]
        if pairs is not None and rest[0] is not None:
            record["rejected"] = rest[0]
        if chats and chats[i]:
            record["messages"], record["tools"] = chats[i]["messages"], chats[i]["tools"]
        blob += orjson.dumps(record)  # joined at once: holding the results costs 4 KiB each
        ends.append(len(blob))
    return blob, ends


def _buffer_and_ends(strings: pa.Array) -> tuple[pa.Buffer | bytes, array]:
    """The bytes of a freshly computed string array, back to back, and where each ends."""
    if len(strings) == 0:
        return b"", array("q")
    ends = pc.cumulative_sum(pc.cast(pc.binary_length(strings), pa.int64()))
    return strings.buffers()[2], array("q", ends.to_pylist())


def _fingerprints_and_splits(
    blob: Any, ends: array, kept: dict[str, pa.Array], cfg: DataConfig
) -> tuple[bytes, bytes]:
    """xxh3-128 of each record's JSON (for dedupe) and its split from its prompt's hash."""
    keys = pc.binary_join_element_wise(kept["instruction"], kept["input"], "\0")
    key_blob, key_ends = _buffer_and_ends(keys)
    bounds = (int(cfg.split[0] * 2**64), int((cfg.split[0] + cfg.split[1]) * 2**64))
    text, key = memoryview(blob), memoryview(key_blob)
    fingerprints, splits = bytearray(), bytearray()
    start = key_start = 0
    for end, key_end in zip(ends, key_ends, strict=True):
        fingerprints += xxhash.xxh3_128_digest(text[start:end])
        h = xxhash.xxh3_64_intdigest(key[key_start:key_end], cfg.seed)
        splits.append(0 if h < bounds[0] else 1 if h < bounds[1] else 2)
        start, key_start = end, key_end
    return bytes(fingerprints), bytes(splits)
