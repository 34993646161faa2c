"""A top-level JSON array, read whole or streamed one record at a time (tasks/data/ingest.py
turns the records into batches). Errors name the file, line and column and the fix."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from tasks.data.shapes import DataError

READ_BUFFER = 1 << 20  # not the default 8 KiB: a read costs ~20 µs of system time here


def whole_json_array(path: Path) -> list[Any]:
    records = orjson.loads(path.read_bytes().removeprefix(codecs.BOM_UTF8))
    if not isinstance(records, list):
        raise DataError(f"{path}: the top level must be an array of records")
    return records


def bad_json(path: Path, line: int, column: int, msg: str) -> DataError:
    return DataError(
        f"{path}: not valid JSON at line {line} column {column}: {msg} "
        "(fix the file; or write one record per line as .jsonl, where a bad line "
        "is rejected and the rest is kept)"
    )


SPACE = re.compile(r"[ \t\n\r]*")


def stream_json_array(path: Path, max_record_bytes: int) -> Iterator[Any]:
    """The elements of a top-level JSON array, one at a time: the standard library's
    `raw_decode` over a window of the text that slides as records are consumed. A record
    cut by the window's end is decoded again once more text is read; one larger than
    `max_record_bytes` (data.max_line_bytes) is an error, so memory stays bounded."""
    decoder = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8-sig")()  # a BOM is skipped
    with open(path, "rb") as f:
        buf, pos, eof = "", 0, False
        dropped, lines_before, last_newline = 0, 0, -1  # text slid out of the window

        def more() -> None:
            nonlocal buf, pos, eof, dropped, lines_before, last_newline
            chunk = f.read(max(READ_BUFFER, len(buf) - pos))  # doubles for a long record
            eof = not chunk
            if (k := buf.rfind("\n", 0, pos)) >= 0:
                last_newline = dropped + k
            lines_before += buf.count("\n", 0, pos)
            dropped += pos
            buf, pos = buf[pos:] + text.decode(chunk, final=eof), 0

        def fail(at: int, msg: str) -> DataError:
            k = buf.rfind("\n", 0, at)
            line_start = dropped + k if k >= 0 else last_newline
            line = lines_before + buf.count("\n", 0, at) + 1
            return bad_json(path, line, dropped + at - line_start, msg)

        def skip_space() -> None:
            nonlocal pos
            while True:
                pos = SPACE.match(buf, pos).end()
                if pos < len(buf) or eof:
                    return
                more()

        skip_space()
        if buf[pos : pos + 1] != "[":
            raise DataError(f"{path}: the top level must be an array of records")
        pos += 1
        first = True
        while True:
            skip_space()
            if pos >= len(buf):
                raise fail(pos, "the array ends before its closing ]")
            if buf[pos] == "]":
                pos += 1
                break
            if not first:
                if buf[pos] != ",":
                    raise fail(pos, "Expecting ',' delimiter")
                pos += 1
                skip_space()
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a number at the window's end may go on
                        break
                except json.JSONDecodeError as exc:
                    if eof:
                        raise fail(exc.pos, exc.msg) from None
                    if len(buf) - pos > max_record_bytes:
                        raise fail(
                            pos, f"a record longer than data.max_line_bytes={max_record_bytes}"
                        ) from None
                more()
            pos, first = end, False
            yield value
        skip_space()
        if pos < len(buf):
            raise fail(pos, "Extra data after the array")
