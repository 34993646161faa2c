"""Read raw datasets into batches of canonical fields; the first half of the data stage.

Formats (by file suffix): JSON array `.json`, JSON Lines `.jsonl` (a `.json` file whose
first character is `{` is read as JSON Lines too), CSV `.csv` with a header row, Parquet
`.parquet`. Other files in a dataset folder (README.md, hidden files) are ignored.

Each file's record shape (alpaca, columns, messages, sharegpt) is detected by
tasks/data/shapes.py, which also turns each record into the canonical fields.

JSON Lines are parsed line by line with orjson: on this machine it parses a 470-byte
record in 0.75 µs where pyarrow's JSON reader needs 2.7 µs, and a bad line then costs only
itself. CSV and Parquet are read by pyarrow in streaming batches. A bad record becomes a
rejection (reason, file, line or row, raw text); a file that cannot be read at all is a
`DataError` (exit status 2).
"""

from __future__ import annotations

import codecs
import fnmatch
import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq

from tasks.config import DataConfig
from tasks.data.json_array import READ_BUFFER, bad_json, stream_json_array, whole_json_array
from tasks.data.shapes import DataError, Rejected, canonical, detect_shape, record_shape

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
BATCH_RECORDS = 32_768  # records held at once: ~15 MB of text for alpaca-sized records
RAW_HEAD = 1000  # characters of an unparsable or oversized record kept in rejected.jsonl
SHAPE_SAMPLE = 1000  # records looked at to detect a file's shape
JSON_WHOLE_BYTES = 64 << 20  # JSON arrays up to this size are parsed in one go


@dataclass
class Batch:
    """Up to BATCH_RECORDS records of one file, as canonical fields (one entry per record)."""

    file: str  # name relative to the input root, as rejected.jsonl reports it
    shape: str  # alpaca, columns, messages or sharegpt
    unit: str  # "line" for JSON Lines, "row" (1-based record number) otherwise
    positions: list[int]
    fields: dict[str, pa.Array | list[str]]  # instruction, input, output, system[, rejected]
    history: list[Any] | None  # [[q, a], ...] or None per record; None: no record has any
    original: Callable[[int], Any]  # the record as read, for rejected.jsonl
    rejected: list[dict[str, Any]] = field(default_factory=list)  # rejected while reading
    blank: int = 0  # blank lines skipped (JSON Lines); they are not records
    offsets: list[int] | None = None  # JSON Lines: byte offset of each record's line
    lines: int = 0  # JSON Lines: lines read up to the end of this batch
    chats: list[Any] | None = None  # tool conversations: {messages, tools} or None per record


def dataset_files(root: Path, exclude: Sequence[str] = ()) -> tuple[list[Path], list[Path]]:
    """(dataset files, ignored files) below `root`, sorted so the order is reproducible."""
    if not root.exists():
        raise DataError(f"{root}: no such file or folder (fix: --input PATH or data.input)")
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise DataError(f"{root}: unknown format; use one of {', '.join(SUFFIXES)}")
        return [root], []
    found, ignored = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        hidden = any(part.startswith(".") for part in rel.parts)
        excluded = any(fnmatch.fnmatch(rel.as_posix(), pattern) for pattern in exclude)
        is_data = path.suffix.lower() in SUFFIXES and not hidden and not excluded
        (found if is_data else ignored).append(path)
    if not found:
        raise DataError(f"{root}: no dataset files ({', '.join(SUFFIXES)}) in this folder")
    return found, ignored


def unreadable(path: Path, exc: OSError) -> DataError:
    return DataError(
        f"{path}: cannot read: {exc.strerror or exc} (fix: make the file readable, or move "
        "it out of the input folder)"
    )


def first_byte(path: Path) -> bytes:
    """The file's first byte after a UTF-8 byte-order mark and whitespace (b'' if none in
    its first 4 KiB): b'[' starts a JSON array."""
    try:
        with open(path, "rb") as f:
            return f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()[:1]
    except OSError as exc:
        raise unreadable(path, exc) from exc


def read_file(path: Path, name: str, cfg: DataConfig) -> Iterator[Batch]:
    """Batches of one dataset file; `name` is how rejected.jsonl refers to it."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise unreadable(path, exc) from exc
    first = first_byte(path)
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
    """Read as JSON Lines: a .jsonl file, or a .json file that is not one array (as read_file
    decides, so a big array with a byte-order mark is not split into lines)."""
    suffix = path.suffix.lower()
    return suffix == ".jsonl" or (suffix == ".json" and first_byte(path) != b"[")


# --- JSON ---------------------------------------------------------------------------------


def _read_lines(f: BinaryIO, limit: int) -> Iterator[tuple[bytes, int]]:
    """Each line with its size in bytes. A line over `limit` bytes comes back cut to its
    head; the rest is skipped without ever being held in memory. A UTF-8 byte-order mark
    at the file's start is dropped from the first line (its size still counts it)."""
    first = f.tell() == 0
    while raw := f.readline(limit + 1):
        line = raw.removeprefix(codecs.BOM_UTF8) if first else raw
        first = False
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield line, len(raw)
            continue
        size, head = len(raw), line[: RAW_HEAD * 4]
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
    if not keys:
        raise DataError(
            f"{path}: no JSON object in its first {SHAPE_SAMPLE} lines (not JSON Lines?)"
        )
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
        return orjson.loads(self._file.readline().removeprefix(codecs.BOM_UTF8))


def _read_json_array(path: Path, name: str, cfg: DataConfig) -> Iterator[Batch]:
    """A JSON array: parsed whole by orjson up to JSON_WHOLE_BYTES (fastest), streamed
    record by record above it, so a big array (the usual alpaca `train.json`) needs memory
    for one batch, not for the file."""
    if path.stat().st_size <= JSON_WHOLE_BYTES:
        try:
            records: Iterator[Any] = iter(whole_json_array(path))
        except orjson.JSONDecodeError as exc:
            raise bad_json(path, exc.lineno, exc.colno, exc.msg) from None
    else:
        records = stream_json_array(path, cfg.max_line_bytes)
    head = list(itertools.islice(records, SHAPE_SAMPLE))
    if not head:
        raise DataError(f"{path}: the array holds no records")
    keys: Counter[str] = Counter()
    for r in head:
        if isinstance(r, dict):
            keys.update(r.keys())
    shape = detect_shape(path, [k for k, _ in keys.most_common()], cfg)
    rows = enumerate(itertools.chain(head, records), start=1)
    while chunk := list(itertools.islice(rows, BATCH_RECORDS)):
        batch = _Collector(name, shape, "row")
        for i, record in chunk:
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
            values = canonical(record, record_shape(record, self.shape, cfg), cfg)
        except Rejected as r:
            self.reject(r.reason, r.detail, pos, record=record)
            return
        self.rows.append((pos, offset, record, *values))

    def finish(self, lines: int = 0) -> Batch:
        columns = list(zip(*self.rows, strict=True)) or [()] * 10
        positions, offsets, records, instruction, input_, output, system, history = columns[:8]
        rejected, chats = columns[8:]
        fields = {
            "instruction": list(instruction),
            "input": list(input_),
            "output": list(output),
            "system": list(system) if any(system) else pa.nulls(len(system), pa.string()),
        }
        if any(r is not None for r in rejected):  # preference pairs
            fields["rejected"] = list(rejected)
        return Batch(
            file=self.name,
            shape=self.shape,
            unit=self.unit,
            positions=list(positions),
            fields=fields,
            history=list(history) if any(history) else None,
            chats=list(chats) if any(chats) else None,
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
