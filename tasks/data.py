"""The data stage: raw dataset → cleaned, deduplicated train/dev/test splits.

    read (tasks/ingest.py) → fill placeholders → NFC → control chars → whitespace
    → reject empty / too long / too many tokens → dedupe → split by prompt hash → write

`prepare` does everything that needs only one batch (32k records): cleaning runs on
pyarrow string arrays, where one regex pass finds the few records that need a fix and
only those are rewritten. Big JSON Lines files are cut into 16 MiB chunks that worker
processes prepare in parallel; the `Splitter` in the main process keeps what needs the
whole run (the dedupe fingerprints, the split files) and takes the batches in file order,
so the output is the same for any number of workers. Memory holds a few batches plus a
16-byte fingerprint per kept record, whatever the file size.

A record's split comes from `xxh3_64(instruction + input, seed)`: adding records never
moves an existing one, and records with the same prompt always land in the same split.

Outputs: train.json dev.json test.json (JSON arrays of canonical records), rejected.jsonl
(one line per dropped record, with its reason), report.json. Always
`input_records == kept + rejected` and `kept == train + dev + test`.

Run alone: `python -m tasks.data [--config FILE] [--set data.input=PATH] [--output-dir DIR]`.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import sys
import threading
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from tasks.config import Config, DataConfig, UserError, load_config
from tasks.ingest import (
    Batch,
    DataError,
    LineAt,
    dataset_files,
    is_jsonl,
    jsonl_chunks,
    jsonl_shape,
    read_file,
    read_jsonl,
)
from tasks.store import Ref, Store, hash_file, make_key, write_json_atomic

VERSION = "1"
SPLITS = ("train", "dev", "test")
CHUNK_BYTES = 16 << 20  # one worker task: ~25k records of 650 bytes
MAX_REJECT_BYTES = 64 << 10  # a bigger rejected record is cut to its head in rejected.jsonl
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


def _array(values: pa.Array | list[str | None]) -> pa.Array:
    return values if isinstance(values, pa.Array) else pa.array(values, pa.string())


def _chars(fields: dict[str, pa.Array], history: list[Any] | None) -> pa.Array:
    lengths = [pc.fill_null(pc.utf8_length(v), 0) for v in fields.values()]
    chars = pc.add(pc.add(lengths[0], lengths[1]), pc.add(lengths[2], lengths[3]))
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
    blob: pa.Buffer | bytearray  # the surviving records' canonical JSON, back to back
    ends: array  # where each one ends in `blob`
    splits: bytes  # 0 train, 1 dev, 2 test
    fingerprints: bytes  # 16 bytes of xxh3-128 of each JSON: a false match has odds 2**-128


def prepare(batch: Batch, cfg: DataConfig, tokenizer: Any = None) -> Prepared:
    """Clean one batch, reject what is empty or too long, assign splits."""
    fields = {k: clean_text(_array(v), cfg) for k, v in batch.fields.items()}
    history = _clean_history(batch.history, cfg) if batch.history else None
    chars = _chars(fields, history)
    checks = [  # (reason, mask, why); the first that applies is the reason given
        ("empty_prompt", pc.equal(pc.utf8_length(fields["instruction"]), 0), "instruction is empty"),
        ("empty_response", pc.equal(pc.utf8_length(fields["output"]), 0), "output is empty"),
        ("too_long", pc.greater(chars, cfg.max_chars), f"characters > data.max_chars={cfg.max_chars:,}"),
    ]  # fmt: skip
    counts = {"too_long": chars}  # shown in the detail of a rejection
    if cfg.max_tokens:
        counts["too_many_tokens"] = tokens = _tokens(tokenizer, fields, history)
        why = f"tokens > data.max_tokens={cfg.max_tokens:,}"
        checks.append(("too_many_tokens", pc.greater(tokens, cfg.max_tokens), why))
    rejected = list(batch.rejected)
    bad = pa.array([False] * len(batch.positions))
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
    if turns or not cfg.strip_control:  # lists, or control characters only orjson escapes
        blob, ends = _json_by_record(kept, turns)
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


def _json_by_record(kept: dict[str, pa.Array], turns: list[Any] | None) -> tuple[bytearray, array]:
    """The canonical JSON of every record, written by orjson (records with history)."""
    blob, ends = bytearray(), array("q")
    columns = [v.to_pylist() for v in kept.values()]
    for i, (instruction, input_, output, system) in enumerate(zip(*columns, strict=True)):
        record = {"instruction": instruction, "input": input_, "output": output}
        if system:
            record["system"] = system
        if turns and turns[i]:
            record["history"] = turns[i]
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


class Splitter:
    """Dedupes across the whole run and writes the three JSON arrays and rejected.jsonl."""

    def __init__(self, output_dir: Path, cfg: DataConfig) -> None:
        self.cfg = cfg
        output_dir.mkdir(parents=True, exist_ok=True)
        # open for the whole run, closed by close(); 1 MiB buffers: a write is ~650 bytes
        self.files = {s: open(output_dir / f"{s}.json", "wb", buffering=1 << 20) for s in SPLITS}  # noqa: SIM115
        self.rejects = open(output_dir / "rejected.jsonl", "wb", buffering=1 << 20)  # noqa: SIM115
        self.counts: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.seen: set[bytes] = set()
        for f in self.files.values():
            f.write(b"[")

    def close(self) -> None:
        for s, f in self.files.items():
            f.write(b"\n]\n" if self.counts[s] else b"]\n")
            f.close()
        self.rejects.close()

    def reject(self, rejection: dict[str, Any]) -> None:
        self.reasons[rejection["reason"]] += 1
        line = orjson.dumps(rejection, default=str)
        if len(line) > MAX_REJECT_BYTES and "record" in rejection:
            record = orjson.dumps(rejection.pop("record"), default=str)
            rejection["raw"] = record[:1000].decode("utf-8", "ignore")
            rejection["raw_bytes"] = len(record)
            line = orjson.dumps(rejection)
        self.rejects.write(line + b"\n")

    def add(self, p: Prepared, line_base: int = 0) -> None:
        """Write one prepared batch; `line_base` turns chunk line numbers into file ones."""
        rejected, fingerprints = p.rejected, p.fingerprints
        cap = self.cfg.max_samples
        parts: tuple[list, list, list] = ([], [], [])  # texts for train, dev, test
        view, start = memoryview(p.blob), 0
        for i, (end, split) in enumerate(zip(p.ends, p.splits, strict=True)):
            text, start = view[start:end], end
            fingerprint = fingerprints[16 * i : 16 * i + 16]
            reason = None
            if self.cfg.dedupe and fingerprint in self.seen:
                reason, detail = "duplicate", "same record as an earlier one after cleaning"
            elif split == 0 and cap and self.counts["train"] + len(parts[0]) >= cap:
                reason, detail = "over_max_samples", f"train already holds data.max_samples={cap}"
            if reason:
                where = {"file": p.file, p.unit: p.positions[p.index[i]]}
                record = p.original(p.index[i])
                rejected.append({"reason": reason, "detail": detail, **where, "record": record})
                continue
            self.seen.add(fingerprint)
            parts[split].append(text)
        for name, texts in zip(SPLITS, parts, strict=True):
            if texts:
                self.files[name].write(b",\n" if self.counts[name] else b"\n")
                self.files[name].write(b",\n".join(texts))
                self.counts[name] += len(texts)
        for rejection in sorted(rejected, key=lambda r: r[p.unit]):  # same order for any workers
            rejection[p.unit] += line_base
            self.reject(rejection)


# --- parallel JSON Lines ------------------------------------------------------------------

_worker_tokenizers: dict[str, Any] = {}


def _prepare_chunk(
    path: Path, name: str, cfg: DataConfig, shape: str, span: tuple[int, int], tok: Path | None
) -> list[Prepared]:
    """Worker process: read and prepare the lines in one byte range of a JSON Lines file."""
    gc.disable()  # this process only ever runs this (see _without_cycle_collector)
    tokenizer = None
    if tok is not None:
        if str(tok) not in _worker_tokenizers:
            _worker_tokenizers[str(tok)] = load_tokenizer(tok)
        tokenizer = _worker_tokenizers[str(tok)]
    prepared = []
    for batch in read_jsonl(path, name, cfg, shape, *span):
        p = prepare(batch, cfg, tokenizer)
        p.original = LineAt(path, array("q", batch.offsets or []))  # offsets travel, not records
        prepared.append(p)
    return prepared


def _parallel_jsonl(
    path: Path, name: str, cfg: DataConfig, workers: int, tok: Path | None
) -> Iterator[tuple[Prepared, int]]:
    """(prepared batch, line number base) in file order, from `workers` processes."""
    shape = jsonl_shape(path, cfg)
    spans = jsonl_chunks(path, CHUNK_BYTES, cfg.max_line_bytes)
    # fork starts a worker in milliseconds with everything imported, but is only safe while
    # this process has one thread (a Prefect flow has more): forkserver then, or spawn
    methods = multiprocessing.get_all_start_methods()
    safe = "forkserver" if "forkserver" in methods else "spawn"
    method = "fork" if "fork" in methods and threading.active_count() == 1 else safe
    base = 0
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        pending: deque = deque()
        spans_left = deque(spans)
        while spans_left or pending:
            while spans_left and len(pending) < 2 * workers:  # bounded: memory stays flat
                span = spans_left.popleft()
                pending.append(pool.submit(_prepare_chunk, path, name, cfg, shape, span, tok))
            chunk = pending.popleft().result()
            for p in chunk:
                yield p, base
            base += chunk[-1].lines


def _prepared(path: Path, name: str, cfg: DataConfig, tokenizer: Any, tok: Path | None):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = cfg.workers or cores or 1
    big = is_jsonl(path) and path.stat().st_size >= 2 * CHUNK_BYTES
    if workers > 1 and big:
        yield from _parallel_jsonl(path, name, cfg, workers, tok)
        return
    for batch in read_file(path, name, cfg):
        yield prepare(batch, cfg, tokenizer), 0


@contextmanager
def _without_cycle_collector() -> Iterator[None]:
    """A batch holds ~100k dicts, tuples and lists, none in a reference cycle, which the
    cyclic collector would rescan again and again: 28 % of the CPU time, measured."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"data.tokenizer={str(folder)!r}: no tokenizer.json in that folder")
    return Tokenizer.from_file(str(path))


def _names(root: Path, files: list[Path]) -> list[str]:
    """How reports refer to files: relative to the input folder, or the file's own name."""
    return [p.name if root.is_file() else p.relative_to(root).as_posix() for p in files]


def _clean_file(
    path: Path, name: str, cfg: DataConfig, splitter: Splitter, tokenizer: Any, tok: Path | None
) -> dict[str, Any]:
    rejected_before = sum(splitter.reasons.values())
    counts = {"file": name, "shape": None, "records": 0, "rejected": 0, "blank_lines": 0}
    for p, line_base in _prepared(path, name, cfg, tokenizer, tok):
        splitter.add(p, line_base)
        counts["shape"] = p.shape
        counts["records"] += p.records
        counts["blank_lines"] += p.blank
    counts["rejected"] = sum(splitter.reasons.values()) - rejected_before
    return counts


def clean_dataset(
    input: Path, output_dir: Path, cfg: DataConfig, tokenizer_dir: Path | None = None
) -> dict[str, Any]:
    """Clean and split `input` (file or folder) into `output_dir`; returns the report."""
    files, ignored = dataset_files(input)
    tok = tokenizer_dir or (Path(cfg.tokenizer) if cfg.tokenizer else None)
    tokenizer = None
    if cfg.max_tokens:
        if tok is None:
            raise DataError(
                f"data.max_tokens={cfg.max_tokens} needs a tokenizer "
                "(fix: --set data.tokenizer=FOLDER_WITH_TOKENIZER_JSON)"
            )
        tokenizer = load_tokenizer(tok)
    splitter = Splitter(output_dir, cfg)
    names = _names(input, files)
    try:
        with _without_cycle_collector():
            per_file = [
                _clean_file(path, name, cfg, splitter, tokenizer, tok if cfg.max_tokens else None)
                for path, name in zip(files, names, strict=True)
            ]
    except BaseException:  # no half-written output
        splitter.close()
        for s in ("train.json", "dev.json", "test.json", "rejected.jsonl"):
            (output_dir / s).unlink(missing_ok=True)
        raise
    splitter.close()
    rejected = sum(splitter.reasons.values())
    input_records = sum(f["records"] for f in per_file)
    blank = sum(f.pop("blank_lines") for f in per_file)
    report = {
        "input_records": input_records,
        "kept": input_records - rejected,
        "rejected": rejected,
        "rejected_by_reason": dict(sorted(splitter.reasons.items())),
        **{s: splitter.counts[s] for s in SPLITS},
        "blank_lines": blank,
        "files": per_file,
        "ignored_files": _names(input, ignored),
        "split": list(cfg.split),
        "seed": cfg.seed,
    }
    if report["kept"] != sum(splitter.counts[s] for s in SPLITS):  # a bug, not a user error
        raise RuntimeError(f"data stage lost records: {report}")
    write_json_atomic(output_dir / "report.json", report)
    return report


def _inputs(cfg: Config, tokenizer_dir: Path | None) -> dict[str, str]:
    root = Path(cfg.data.input)
    files, _ = dataset_files(root)
    inputs = {name: hash_file(p) for p, name in zip(files, _names(root, files), strict=True)}
    tok = tokenizer_dir or (Path(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    if cfg.data.max_tokens and tok and (tok / "tokenizer.json").is_file():
        inputs["tokenizer.json"] = hash_file(tok / "tokenizer.json")
    return inputs


def _section(cfg: Config) -> dict[str, Any]:
    section = cfg.data.model_dump(mode="json")
    for name in ("input", "tokenizer", "workers"):  # paths and speed never enter a key
        section.pop(name)
    return section


def key(cfg: Config, tokenizer_dir: Path | None = None) -> str:
    """Hash of the dataset files' contents (and names within the folder) + data config."""
    return make_key("data", VERSION, _section(cfg), _inputs(cfg, tokenizer_dir))


def run(cfg: Config, store: Store, tokenizer_dir: Path | None = None) -> Ref:
    inputs = _inputs(cfg, tokenizer_dir)
    stage_key = make_key("data", VERSION, _section(cfg), inputs)

    def work(tmp: Path) -> dict[str, Any]:
        return {"report": clean_dataset(Path(cfg.data.input), tmp, cfg.data, tokenizer_dir)}

    ref = store.build("data", stage_key, work, inputs=inputs, config=_section(cfg))
    report = ref.manifest()["report"]
    if report["train"] == 0:
        raise DataError(
            f"{cfg.data.input}: no training records left after cleaning "
            f"(rejected: {report['rejected_by_reason']}; see {ref.dir / 'rejected.jsonl'})"
        )
    return ref


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tasks.data", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML recipe (default: configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--output-dir", help="write here instead of the artifact store")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.output_dir:
            report = clean_dataset(Path(cfg.data.input), Path(args.output_dir), cfg.data)
            print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        else:
            print(run(cfg, Store(cfg.pipeline.store)).path)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
