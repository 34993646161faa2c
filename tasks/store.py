"""The content-addressed artifact store: the cache between pipeline stages.

    artifacts/<stage>/<key>/...            a finished artifact; manifest.json inside, written last
    artifacts/<stage>/.partial-<key>/      work in progress (kept across a crash so training
                                           can resume; any other stage starts it afresh)
    artifacts/<stage>/.locks/<key>.lock    one process computes a key at a time

`key = sha256(stage, version, config section, input keys / file hashes)`, where the version
is derived from the stage's code and the libraries that shape its output (tasks/versions.py),
never typed by hand. Paths never enter a key; file contents do. The finished folder appears by one atomic
rename of a folder that already holds its manifest, so a folder without `manifest.json`
can only be debris and is never served.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

MANIFEST = "manifest.json"
_CHUNK = 1 << 20
_hash_cache: dict[tuple[str, int, int, int], str] = {}


@dataclass(frozen=True)
class Ref:
    """What a stage returns and Prefect passes around: small, JSON-friendly."""

    stage: str
    key: str
    path: str
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.dir / MANIFEST).read_text())


def hash_file(path: str | Path) -> str:
    """Streamed sha256 of a file's bytes (memoised on inode, size and mtime)."""
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if memo in _hash_cache:
        return _hash_cache[memo]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _hash_cache[memo] = digest
    return digest


def hash_tree(path: str | Path, exclude: tuple[str, ...] = (MANIFEST,)) -> str:
    """sha256 over relative names and contents of every file below `path` (or of one file)."""
    p = Path(path)
    if p.is_file():
        return hash_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p).as_posix()
        if rel in exclude or "/." in "/" + rel:
            continue
        h.update(rel.encode() + b"\0" + hash_file(f).encode() + b"\n")
    return h.hexdigest()


def make_key(stage: str, version: str, config: Any, inputs: dict[str, Any]) -> str:
    """Hash everything that changes a stage's output; callers pass hashes, never paths.

    `version` is `tasks.versions.version(...)`: a stage's code and libraries.
    """
    blob = json.dumps(
        {"stage": stage, "version": version, "config": config, "inputs": inputs},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Store:
    def __init__(self, root: str | Path = "artifacts") -> None:
        self.root = Path(root).resolve()

    def final(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial(self, stage: str, key: str) -> Path:
        return self.root / stage / f".partial-{key}"

    def lookup(self, stage: str, key: str) -> Ref | None:
        """A finished artifact, or None. A folder without a manifest is never served."""
        path = self.final(stage, key)
        if (path / MANIFEST).is_file():
            return Ref(stage, key, str(path), cached=True)
        return None

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        locks = self.root / stage / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"{key}.lock")):
            yield

    def build(
        self,
        stage: str,
        key: str,
        work: Callable[[Path], dict[str, Any] | None],
        *,
        inputs: dict[str, Any] | None = None,
        config: Any = None,
        resume: bool = False,
    ) -> Ref:
        """Return the artifact for `key`, running `work(tmp_dir)` only if it is missing.

        `work` writes its outputs into `tmp_dir` and may return extra manifest fields.
        With `resume=True` a partial folder left by a crash is handed back to `work`
        (training resumes from its checkpoints there); otherwise it is cleared first.
        """
        if hit := self.lookup(stage, key):
            return hit
        with self.lock(stage, key):
            if hit := self.lookup(stage, key):  # another process finished it meanwhile
                return hit
            final, tmp = self.final(stage, key), self.partial(stage, key)
            if tmp.exists() and not resume:
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True, exist_ok=True)
            started = time.time()
            result = work(tmp)
            extra = result if isinstance(result, dict) else {}
            manifest = {
                "stage": stage,
                "key": key,
                "inputs": inputs or {},
                "config": config,
                "outputs": {
                    f.relative_to(tmp).as_posix(): hash_file(f)
                    for f in sorted(tmp.rglob("*"))
                    if f.is_file() and "checkpoints" not in f.relative_to(tmp).parts
                },
                "seconds": round(time.time() - started, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **extra,
            }
            _write_json_atomic(tmp / MANIFEST, manifest)
            if final.exists():  # debris of a crash between rename and manifest: never served
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return Ref(stage, key, str(final), cached=False)

    def gc(self, keep: set[tuple[str, str]], dry_run: bool = False) -> list[Path]:
        """Delete finished artifacts not in `keep` and debris no lock protects."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if stage_dir.name in {"runs", "deployed"}:
                continue
            for entry in sorted(stage_dir.iterdir()):
                if entry.name == ".locks" or not entry.is_dir():
                    continue
                key = entry.name.removeprefix(".partial-")
                if (stage_dir.name, key) in keep:
                    continue
                lock = FileLock(str(stage_dir / ".locks" / f"{key}.lock"), timeout=0)
                try:
                    with lock:
                        if not dry_run:
                            shutil.rmtree(entry)
                        removed.append(entry)
                except TimeoutError:  # someone is computing it right now
                    continue
        return removed


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so a reader sees the old file or the new one, never half of one."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(Path(path), data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
