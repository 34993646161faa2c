"""Read raw datasets into batches of canonical fields; the first half of the data stage.

Formats (by file suffix): JSON array `.json`, JSON Lines `.jsonl` (a `.json` file whose
first character is `{` is read as JSON Lines too), CSV `.csv` with a header row, Parquet
`.parquet`. Other files in a dataset folder (README.md, hidden files) are ignored.

Shapes, detected per file unless `data.format` names one:
- alpaca: `instruction`, `input`, `output`, optional `system`, `history` ([[q, a], ...]);
- columns: `data.prompt_column` → instruction, `data.response_column` → output;
- messages: `messages` [{role, content}]; sharegpt: `conversations` [{from, value}].
  The last user turn becomes `instruction`, the last assistant turn `output`, earlier
  pairs `history`, a leading system turn `system`.

JSON Lines are parsed line by line with orjson: on this machine it parses a 470-byte
record in 0.75 µs where pyarrow's JSON reader needs 2.7 µs, and a bad line then costs only
itself. CSV and Parquet are read by pyarrow in streaming batches. A bad record becomes a
rejection (reason, file, line or row, raw text); a file that cannot be read at all is a
`DataError` (exit status 2).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq

from tasks.config import DataConfig, UserError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
BATCH_RECORDS = 32_768  # records held at once: ~15 MB of text for alpaca-sized records
RAW_HEAD = 1000  # characters of an unparsable or oversized record kept in rejected.jsonl
SHAPE_SAMPLE = 1000  # records looked at to detect a file's shape
READ_BUFFER = 1 << 20  # not the default 8 KiB: a read costs ~20 µs of system time here
USER_ROLES = {"user", "human"}
ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot", "chatgpt"}
PROMPT_NAMES = ("instruction", "prompt", "question", "query", "input", "q")
RESPONSE_NAMES = ("output", "response", "answer", "completion", "target", "a")


class DataError(UserError):
    """A dataset file that cannot be read as it stands (missing, empty, malformed)."""


class Rejected(Exception):
    """One record that cannot be normalised: a reason id and a sentence for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Batch:
    """Up to BATCH_RECORDS records of one file, as canonical fields (one entry per record)."""

    file: str  # name relative to the input root, as rejected.jsonl reports it
    shape: str  # alpaca, columns, messages or sharegpt
    unit: str  # "line" for JSON Lines, "row" (1-based record number) otherwise
    positions: list[int]
    fields: dict[str, pa.Array | list[str]]  # instruction, input, output, system
    history: list[Any] | None  # [[q, a], ...] or None per record; None: no record has any
    original: Callable[[int], Any]  # the record as read, for rejected.jsonl
    rejected: list[dict[str, Any]] = field(default_factory=list)  # rejected while reading
    blank: int = 0  # blank lines skipped (JSON Lines); they are not records
    offsets: list[int] | None = None  # JSON Lines: byte offset of each record's line
    lines: int = 0  # JSON Lines: lines read up to the end of this batch


def dataset_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(dataset files, ignored files) below `root`, sorted so the order is reproducible."""
    if not root.exists():
        raise DataError(f"{root}: no such file or folder (fix: --input PATH or data.input)")
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise DataError(f"{root}: unknown format; use one of {', '.join(SUFFIXES)}")
        return [root], []
    found, ignored = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        is_data = path.suffix.lower() in SUFFIXES and not hidden
        (found if is_data else ignored).append(path)
    if not found:
        raise DataError(f"{root}: no dataset files ({', '.join(SUFFIXES)}) in this folder")
    return found, ignored


def read_file(path: Path, name: str, cfg: DataConfig) -> Iterator[Batch]:
    """Batches of one dataset file; `name` is how rejected.jsonl refers to it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            first = f.read(4096).lstrip()[:1]
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from exc
    if size == 0 or not first:
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_table(path, name, cfg, _csv_batches(path))
    if suffix == ".parquet":
        return _read_table(path, name, cfg, _parquet_batches(path))
    if suffix == ".json" and first == b"[":
        return _read_json_array(path, name, cfg)
    return read_jsonl(path, name, cfg, jsonl_shape(path, cfg))


def is_jsonl(path: Path) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    with open(path, "rb") as f:
        return path.suffix.lower() == ".json" and f.read(4096).lstrip()[:1] != b"["


# --- shapes -----------------------------------------------------------------------------


def detect_shape(path: Path, keys: list[str], cfg: DataConfig) -> str:
    """The shape of a file from its column names (the most common keys for JSON)."""
    columns = cfg.prompt_column in keys and cfg.response_column in keys
    if cfg.format != "auto":
        if cfg.format == "columns" and not columns:
            raise DataError(_columns_hint(path, keys, cfg))
        return cfg.format
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if columns and (cfg.prompt_column, cfg.response_column) != ("instruction", "output"):
        return "columns"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    raise DataError(_columns_hint(path, keys, cfg))


def _columns_hint(path: Path, keys: list[str], cfg: DataConfig) -> str:
    prompt = next((k for k in PROMPT_NAMES if k in keys), keys[0] if keys else "PROMPT")
    rest = [k for k in keys if k != prompt]
    response = next((k for k in RESPONSE_NAMES if k in rest), rest[0] if rest else "RESPONSE")
    return (
        f"{path}: no prompt/response columns: found {keys}; expected instruction and "
        f"output (alpaca), messages, conversations, or data.prompt_column="
        f"{cfg.prompt_column!r} and data.response_column={cfg.response_column!r}; "
        f"fix: --set data.prompt_column={prompt} data.response_column={response}"
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
    """(instruction, input, output, system, history) of one JSON record, or `Rejected`."""
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
    if shape == "messages":
        return _turns(record, "messages", "role", "content")
    return _turns(record, "conversations", "from", "value")


# --- JSON ---------------------------------------------------------------------------------


def _read_lines(f: BinaryIO, limit: int) -> Iterator[tuple[bytes, int]]:
    """Each line with its size in bytes. A line over `limit` bytes comes back cut to its
    head; the rest is skipped without ever being held in memory."""
    while line := f.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line, len(line)
            continue
        size, head = len(line), line[: RAW_HEAD * 4]
        while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
            size += len(rest)
        yield head, size + len(rest)


def _reject(reason: str, detail: str, name: str, unit: str, pos: int, **what: Any) -> dict:
    return {"reason": reason, "detail": detail, "file": name, unit: pos, **what}


def _why_not_json(line: bytes, exc: orjson.JSONDecodeError) -> tuple[str, str]:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return "invalid_utf8", f"not valid UTF-8: byte {line[bad.start]:#x} at offset {bad.start}"
    return "invalid_json", f"not valid JSON: {exc}"


def _raw(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r\n")[:RAW_HEAD]


def jsonl_shape(path: Path, cfg: DataConfig) -> str:
    keys: Counter[str] = Counter()
    with open(path, "rb") as f:
        for (line, size), _ in zip(
            _read_lines(f, cfg.max_line_bytes), range(SHAPE_SAMPLE), strict=False
        ):
            if size <= cfg.max_line_bytes:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    keys.update(record.keys())
    return detect_shape(path, [k for k, _ in keys.most_common()], cfg)


def jsonl_chunks(path: Path, chunk_bytes: int, limit: int) -> list[tuple[int, int]]:
    """Byte ranges of about `chunk_bytes` that start and end at line boundaries."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        while bounds[-1] + chunk_bytes < size:
            f.seek(bounds[-1] + chunk_bytes - 1)
            next(_read_lines(f, limit), None)  # to the end of the line we landed in
            bounds.append(f.tell())
    if bounds[-1] < size:
        bounds.append(size)
    return list(zip(bounds, bounds[1:], strict=False))


def read_jsonl(
    path: Path, name: str, cfg: DataConfig, shape: str, start: int = 0, end: int | None = None
) -> Iterator[Batch]:
    """Batches of the lines in bytes [start, end); line numbers count from 1 at `start`."""
    limit = cfg.max_line_bytes
    end = path.stat().st_size if end is None else end
    offset, number = start, 0
    with open(path, "rb", buffering=READ_BUFFER) as f:
        f.seek(start)
        batch = _Collector(name, shape, "line")
        for line, size in _read_lines(f, limit):
            if offset >= end:
                break
            offset, number = offset + size, number + 1
            if size > limit:
                detail = f"line of {size:,} bytes not parsed (limit data.max_line_bytes={limit:,})"
                batch.reject("too_long", detail, number, raw=_raw(line))
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                if not line.strip():
                    batch.blank += 1
                    continue
                batch.reject(*_why_not_json(line, exc), number, raw=_raw(line))
                continue
            batch.add(number, record, cfg, offset - size)
            if len(batch.rows) >= BATCH_RECORDS:
                yield batch.finish(lines=number)
                batch = _Collector(name, shape, "line")
        yield batch.finish(lines=number)


class LineAt:
    """The records of a JSON Lines file, read back by byte offset: how a batch cleaned in
    another process names the original of a record found to be a duplicate later."""

    def __init__(self, path: Path, offsets: list[int]) -> None:
        self.path, self.offsets, self._file = path, offsets, None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}

    def __call__(self, i: int) -> Any:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the next call
        self._file.seek(self.offsets[i])
        return orjson.loads(self._file.readline())


def _read_json_array(path: Path, name: str, cfg: DataConfig) -> Iterator[Batch]:
    """A JSON array is parsed whole (fine for the sizes people write by hand; big data
    belongs in JSON Lines, which streams)."""
    try:
        records = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg} "
            "(fix the file; or write one record per line as .jsonl, where a bad line "
            "is rejected and the rest is kept)"
        ) from None
    if not isinstance(records, list):
        raise DataError(f"{path}: the top level must be an array of records")
    if not records:
        raise DataError(f"{path}: the array holds no records")
    keys: Counter[str] = Counter()
    for r in records[:SHAPE_SAMPLE]:
        if isinstance(r, dict):
            keys.update(r.keys())
    shape = detect_shape(path, [k for k, _ in keys.most_common()], cfg)
    for start in range(0, len(records), BATCH_RECORDS):
        batch = _Collector(name, shape, "row")
        for i, record in enumerate(records[start : start + BATCH_RECORDS], start=start + 1):
            batch.add(i, record, cfg)
        yield batch.finish()


class _Collector:
    """Gathers one batch of JSON records as canonical columns."""

    def __init__(self, name: str, shape: str, unit: str) -> None:
        self.name, self.shape, self.unit, self.blank = name, shape, unit, 0
        self.rows: list[tuple] = []  # (position, offset, record, *canonical fields)
        self.rejected: list[dict[str, Any]] = []

    def reject(self, reason: str, detail: str, pos: int, **what: Any) -> None:
        self.rejected.append(_reject(reason, detail, self.name, self.unit, pos, **what))

    def add(self, pos: int, record: Any, cfg: DataConfig, offset: int = -1) -> None:
        try:
            values = canonical(record, self.shape, cfg)
        except Rejected as r:
            self.reject(r.reason, r.detail, pos, record=record)
            return
        self.rows.append((pos, offset, record, *values))

    def finish(self, lines: int = 0) -> Batch:
        columns = list(zip(*self.rows, strict=True)) or [()] * 8
        positions, offsets, records, instruction, input_, output, system, history = columns
        return Batch(
            file=self.name,
            shape=self.shape,
            unit=self.unit,
            positions=list(positions),
            fields={
                "instruction": list(instruction),
                "input": list(input_),
                "output": list(output),
                "system": list(system) if any(system) else pa.nulls(len(system), pa.string()),
            },
            history=list(history) if any(history) else None,
            original=records.__getitem__,
            rejected=self.rejected,
            blank=self.blank,
            offsets=list(offsets),
            lines=lines,
        )


# --- CSV and Parquet ----------------------------------------------------------------------


def _csv_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """Every column as text, so a column of numbers stays what the file says."""
    try:
        names = pv.open_csv(path).schema.names
        reader = pv.open_csv(
            path,
            read_options=pv.ReadOptions(block_size=8 << 20),
            parse_options=pv.ParseOptions(newlines_in_values=True),  # quoted multi-line answers
            convert_options=pv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
        yield from reader
    except pa.ArrowInvalid as exc:
        hint = " (fix: save the file as UTF-8)" if "UTF8" in str(exc) else ""
        raise DataError(f"{path}: not a readable CSV file: {exc}{hint}") from None


def _parquet_batches(path: Path) -> Iterator[pa.RecordBatch]:
    try:
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_RECORDS)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None


def _read_table(
    path: Path, name: str, cfg: DataConfig, batches: Iterator[pa.RecordBatch]
) -> Iterator[Batch]:
    shape = None
    row = 0
    for rb in batches:
        if shape is None:
            shape = detect_shape(path, rb.schema.names, cfg)
        for start in range(0, rb.num_rows, BATCH_RECORDS):
            part = rb.slice(start, BATCH_RECORDS)
            yield _table_batch(part, shape, name, row + 1, cfg)
            row += part.num_rows
    if shape is None:
        raise DataError(f"{path}: the file holds no records")


def _table_batch(rb: pa.RecordBatch, shape: str, name: str, first: int, cfg: DataConfig) -> Batch:
    """Tables of text columns stay columnar; chat, history or numbers go record by record
    (where a number in a text column is rejected as wrong_type)."""
    names = {"instruction": "instruction", "input": "input", "output": "output", "system": "system"}
    if shape == "columns":
        names = {
            "instruction": cfg.prompt_column,
            "input": None,
            "output": cfg.response_column,
            "system": cfg.system_column,
        }
    present = [rb.schema.field(c).type for c in names.values() if c in rb.schema.names]
    text = all(
        pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) for t in present
    )
    if shape not in ("alpaca", "columns") or "history" in rb.schema.names or not text:
        batch = _Collector(name, shape, "row")
        for i, record in enumerate(rb.to_pylist(), start=first):
            batch.add(i, record, cfg)
        return batch.finish()
    fields = {}
    for key, column in names.items():
        values = pa.nulls(rb.num_rows, pa.string())
        if column in rb.schema.names:
            values = rb.column(column).cast(pa.string())
        fields[key] = values if key == "system" else pc.fill_null(values, "")
    positions = list(range(first, first + rb.num_rows))
    return Batch(
        name, shape, "row", positions, fields, None, lambda i: rb.slice(i, 1).to_pylist()[0]
    )
