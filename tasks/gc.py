"""`llmft gc`: remove the artifacts that no recent run and no deployed model uses.

Kept: every stage of the newest `keep_runs` run summaries (running ones included: a
summary is written after each stage), the folder of each deployed GGUF and its run's
stages, and whatever a kept artifact's manifest names as an input (e.g. the tokenized
dataset a training used), followed transitively. Partial folders of a crash go too, unless
a process holds their lock (it is computing them right now).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.store import Store


def collect_garbage(
    store_root: str | Path, keep_runs: int = 10, dry_run: bool = False
) -> list[Path]:
    """Remove artifacts that neither the last `keep_runs` runs nor a deployed model use.

    Kept: every stage of the newest run summaries (running ones included, since summaries
    are written after each stage), the folder of each deployed GGUF and its run's stages,
    and whatever a kept artifact's manifest names as an input (e.g. a tokenized dataset).
    """
    store = Store(store_root)
    if not store.root.is_dir():
        return []
    keep: set[tuple[str, str]] = set()
    summaries = sorted(
        (store.root / "runs").glob("*/summary.json"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in summaries[:keep_runs]:
        keep |= _stages_of(path)
    for pointer in sorted((store.root / "deployed").glob("*/current.json")):
        current = json.loads(pointer.read_text())
        gguf = Path(current["gguf"])
        if gguf.is_relative_to(store.root):
            stage, key = gguf.relative_to(store.root).parts[:2]
            keep.add((stage, key))
        keep |= _stages_of(store.root / "runs" / str(current.get("run_id")) / "summary.json")
    keep |= _inputs_of(store, keep)
    return store.gc(keep, dry_run=dry_run)


def _stages_of(summary: Path) -> set[tuple[str, str]]:
    if not summary.is_file():
        return set()
    stages = json.loads(summary.read_text()).get("stages", {})
    return {(info.get("stage", name), info["key"]) for name, info in stages.items()}


def _inputs_of(store: Store, keep: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Artifacts named by kept manifests' inputs, followed transitively."""
    stages_by_key: dict[str, list[str]] = {}
    for stage_dir in (p for p in store.root.iterdir() if p.is_dir()):
        for entry in stage_dir.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                stages_by_key.setdefault(entry.name, []).append(stage_dir.name)
    found, todo = set(keep), list(keep)
    while todo:
        ref = store.lookup(*todo.pop())
        if ref is None:
            continue
        for value in ref.manifest().get("inputs", {}).values():
            for stage in stages_by_key.get(value, []) if isinstance(value, str) else []:
                if (stage, value) not in found:
                    found.add((stage, value))
                    todo.append((stage, value))
    return found
