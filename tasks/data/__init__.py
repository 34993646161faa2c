"""The data stage: raw dataset → cleaned, deduplicated train/dev/test splits.

    read (tasks/data/ingest.py) → clean, filter, serialise, split (tasks/data/clean.py)
    → dedupe → write train.json dev.json test.json rejected.jsonl report.json

Big JSON Lines files are cut into 16 MiB chunks that worker processes read and clean in
parallel; the `Splitter` here keeps what needs the whole run (the dedupe fingerprints, the
output files) and takes the batches in file order, so the output is byte-identical for
any number of workers. Memory holds a few batches plus a 16-byte fingerprint per kept
record, whatever the file size. Always `input_records == kept + rejected` and
`kept == train + dev + test`: every dropped record has a line in rejected.jsonl.

Run alone: `python -m tasks.data [--config FILE] [--set data.input=PATH] [--output-dir DIR]`.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import sys
import tempfile
import threading
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from tasks.config import Config, DataConfig, UserError, load_config
from tasks.data.clean import Prepared, prepare
from tasks.data.ingest import (
    DataError,
    LineAt,
    dataset_files,
    is_jsonl,
    jsonl_chunks,
    jsonl_shape,
    read_file,
    read_jsonl,
    unreadable,
)
from tasks.store import Ref, Store, hash_file, make_key, write_json_atomic

# read and write the records (pyarrow, orjson), assign splits by prompt hash (xxhash)
LIBRARIES = ("pyarrow", "orjson", "xxhash")
SPLITS = ("train", "dev", "test")
CHUNK_BYTES = 16 << 20  # one worker task: ~25k records of 650 bytes
MAX_REJECT_BYTES = 64 << 10  # a bigger rejected record is cut to its head in rejected.jsonl


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
        blob = p.blob
        if isinstance(blob, Path):  # spooled by a worker process
            spooled, blob = blob, blob.read_bytes()
            spooled.unlink()
        view, start = memoryview(blob), 0
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
    path: Path,
    name: str,
    cfg: DataConfig,
    shape: str,
    span: tuple[int, int],
    tok: Path | None,
    spool: Path,
) -> list[Prepared]:
    """Worker process: read and prepare the lines in one byte range of a JSON Lines file.
    The JSON goes back through a file in `spool`: one copy, where a pipe makes four."""
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
        blob_file = spool / f"{span[0]}-{len(prepared)}.json"
        blob_file.write_bytes(p.blob)
        p.blob = blob_file
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
    context = multiprocessing.get_context(method)
    with (
        tempfile.TemporaryDirectory(prefix="llmft-data-") as spool_dir,
        ProcessPoolExecutor(workers, mp_context=context) as pool,
    ):
        spool = Path(spool_dir)
        pending: deque = deque()
        spans_left = deque(spans)
        while spans_left or pending:
            while spans_left and len(pending) < 2 * workers:  # bounded: memory stays flat
                span = spans_left.popleft()
                task = (path, name, cfg, shape, span, tok, spool)
                pending.append(pool.submit(_prepare_chunk, *task))
            chunk = pending.popleft().result()
            for p in chunk:
                yield p, base
            base += chunk[-1].lines


def _prepared(
    path: Path, name: str, cfg: DataConfig, tokenizer: Any, tok: Path | None
) -> Iterator[tuple[Prepared, int]]:
    """(prepared batch, line number base) of one file: in worker processes when it is big."""
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
    files, ignored = dataset_files(input, cfg.exclude)
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


def _hash(path: Path) -> str:
    try:
        return hash_file(path)
    except OSError as exc:  # listed but unreadable (permissions, I/O error, removed since)
        raise unreadable(path, exc) from exc


def _inputs(cfg: Config, tokenizer_dir: Path | None) -> dict[str, str]:
    root = Path(cfg.data.input)
    files, _ = dataset_files(root, cfg.data.exclude)
    if root.is_file():
        # one file: its bytes and its format (the suffix), not its name, so a renamed copy
        # of a dataset version (an upload, a trigger's new path) is the same artifact
        inputs = {f"dataset{root.suffix.lower()}": _hash(root)}
    else:
        # a folder: the names inside it are part of the dataset (the files' order, their
        # formats, how the report and the rejects refer to them)
        inputs = {name: _hash(p) for p, name in zip(files, _names(root, files), strict=True)}
    tok = tokenizer_dir or (Path(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    if cfg.data.max_tokens and tok and (tok / "tokenizer.json").is_file():
        inputs["tokenizer.json"] = _hash(tok / "tokenizer.json")
    return inputs


def _section(cfg: Config) -> dict[str, Any]:
    section = cfg.data.model_dump(mode="json")
    for name in ("input", "tokenizer", "workers"):  # paths and speed never enter a key
        section.pop(name)
    return section


def key(cfg: Config, tokenizer_dir: Path | None = None) -> str:
    """Hash of the dataset's contents (and the file names within a folder) + data config.

    No path enters it: a dataset file counts by its bytes and format, a tokenizer by its
    tokenizer.json, so the same data copied elsewhere is the same artifact.
    """
    from tasks.versions import version

    libraries = LIBRARIES + (("tokenizers",) if cfg.data.max_tokens else ())  # counts tokens
    inputs = _inputs(cfg, tokenizer_dir)
    return make_key("data", version("tasks.data", libraries), _section(cfg), inputs)


def run(cfg: Config, store: Store, tokenizer_dir: Path | None = None) -> Ref:
    inputs = _inputs(cfg, tokenizer_dir)
    stage_key = key(cfg, tokenizer_dir)

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
