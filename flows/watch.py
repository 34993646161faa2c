"""The dataset sensor: new or changed files in `datasets_raw/` become `llmft.dataset.arrived`.

A file is announced once it is stable (size and mtime unchanged for `stable_seconds`, so a
copy still in progress is never hashed half-written), and once per content: the event id
is uuid5 of the file's sha256, and emitted hashes are remembered in a state file, so a
restarted sensor, a second sensor, or the same bytes under a new name never train twice.
(The Prefect server also drops an event whose id it has already seen.)

`llmft watch` polls forever; `watch_flow` is the same poll as a flow, deployable on an
interval schedule (deploy/prefect.yaml: `dataset-sensor`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from tasks.config import UserError
from tasks.store import hash_file, write_json_atomic

EVENT = "llmft.dataset.arrived"
SUFFIXES = {".json", ".jsonl", ".csv", ".parquet"}
# Fixed namespace: the same bytes give the same event id on every machine, forever.
NAMESPACE = uuid.UUID("5f0c7a52-4b3e-4c11-9a55-6c6c6d66742e")
DEFAULT_STATE = Path("artifacts") / "watch" / "state.json"

Emitter = Callable[[Path, str], None]


def event_id(sha256: str) -> uuid.UUID:
    """The idempotency key: one dataset version, one event id."""
    return uuid.uuid5(NAMESPACE, sha256)


def emit_arrival(path: Path, sha256: str) -> None:
    """Send the event and wait until the server has it (a sensor must not lose one)."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UserError(
            "llmft watch needs a Prefect server to send events to "
            "(fix: `llmft server` in another shell, then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`)"
        )
    event = Event(
        event=EVENT,
        resource={"prefect.resource.id": f"llmft.dataset.{sha256}", "llmft.file": path.name},
        payload={"path": str(path), "sha256": sha256},
        id=event_id(sha256),
    )

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    asyncio.run(send())


def changed_since_announced(path: str, sha256: str | None) -> str | None:
    """What to warn when a triggered run's file changed since the sensor announced it (the
    run uses it as it is now; the sensor announces the new version on its own)."""
    if not sha256 or not Path(path).is_file() or hash_file(path) == sha256:
        return None
    return (
        f"{path} changed since it was announced (sha256 {sha256[:12]}); this run uses its "
        "current contents, and the sensor announces the new version on its own"
    )


class Sensor:
    """What one poll needs to remember: files seen (size, mtime, since) and hashes emitted."""

    def __init__(self, folder: Path, state_file: Path, stable_seconds: float) -> None:
        self.folder = folder.resolve()
        self.state_file = state_file
        self.stable_seconds = stable_seconds
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        self.emitted: dict[str, Any] = state.get("emitted", {})
        self.seen: dict[str, tuple[int, int, float]] = {}

    def candidates(self) -> list[Path]:
        if not self.folder.is_dir():
            raise UserError(f"{self.folder}: folder to watch not found (fix: --dir PATH)")
        return sorted(
            p
            for p in self.folder.iterdir()
            if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith(".")
        )

    def is_stable(self, path: Path, now: float) -> bool:
        st = path.stat()
        mark = (st.st_size, st.st_mtime_ns)
        old = self.seen.get(str(path))
        if old is None or old[:2] != mark:
            self.seen[str(path)] = (*mark, now)
            old = self.seen[str(path)]
        # Unchanged since we first saw it this way, or untouched for long enough already.
        quiet_since = min(old[2], st.st_mtime_ns / 1e9)
        return now - quiet_since >= self.stable_seconds

    def poll(self, emit: Emitter, now: float | None = None) -> tuple[list[Path], int]:
        """Emit every stable file whose content is new; returns (emitted, still settling)."""
        now = time.time() if now is None else now
        sent, settling = [], 0
        for path in self.candidates():
            try:
                if not self.is_stable(path, now):
                    settling += 1
                    continue
                digest = hash_file(path)
            except FileNotFoundError:  # removed or renamed since the listing
                continue
            if digest in self.emitted:
                continue
            emit(path, digest)
            self.emitted[digest] = {"path": str(path), "emitted_at": now}
            write_json_atomic(self.state_file, {"emitted": self.emitted})  # after each send
            sent.append(path)
        return sent, settling


def watch(
    folder: Path,
    interval: float = 10.0,
    once: bool = False,
    stable_seconds: float = 5.0,
    state_file: Path = DEFAULT_STATE,
    emit: Emitter = emit_arrival,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Poll `folder`; with `once`, poll again only if a file was still being written."""
    sensor = Sensor(Path(folder), Path(state_file), stable_seconds)
    log(f"watching {sensor.folder} (state {state_file}, stable after {stable_seconds:g} s)")
    emitted: list[Path] = []
    for poll in itertools.count(1):
        sent, settling = sensor.poll(emit)
        for path in sent:
            log(f"{EVENT}: {path} sha256={hash_file(path)}")
        emitted += sent
        if once and (not settling or poll == 2):
            return emitted
        time.sleep(stable_seconds if once else interval)
    raise AssertionError("unreachable")


@flow(name="llmft-dataset-sensor")
def watch_flow(
    folder: str = "datasets_raw",
    stable_seconds: float = 5.0,
    state_file: str = str(DEFAULT_STATE),
) -> list[str]:
    """One poll of the sensor, for a scheduled deployment."""
    logger = get_run_logger()
    found = watch(
        Path(folder),
        once=True,
        stable_seconds=stable_seconds,
        state_file=Path(state_file),
        log=logger.info,
    )
    return [str(p) for p in found]
