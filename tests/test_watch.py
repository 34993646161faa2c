"""The dataset sensor: stable files only, one event per content, across restarts."""

import json
import os
import time
from pathlib import Path

from flows import watch


def write(path: Path, text: str, age: float = 0.0) -> Path:
    path.write_text(text)
    if age:
        past = time.time() - age
        os.utime(path, (past, past))
    return path


def collector():
    events = []

    def emit(path: Path, sha256: str) -> None:
        events.append((path.name, sha256))

    emit.events = events
    return emit


def test_a_file_being_written_waits_until_stable(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    state = tmp_path / "state.json"
    emit = collector()
    sensor = watch.Sensor(folder, state, stable_seconds=5)
    path = write(folder / "new.jsonl", '{"instruction": "a", "output": "b"}\n')
    now = time.time()
    os.utime(path, (now, now))
    assert sensor.poll(emit, now=now) == ([], 1)  # just written: still settling
    with open(path, "a") as f:  # the copy goes on, 4 s later
        f.write('{"instruction": "c", "output": "d"}\n')
    os.utime(path, (now + 4, now + 4))
    assert sensor.poll(emit, now=now + 4) == ([], 1)
    assert sensor.poll(emit, now=now + 8) == ([], 1)  # changed at +4: quiet only 4 s
    sent, settling = sensor.poll(emit, now=now + 10)
    assert [p.name for p in sent] == ["new.jsonl"] and settling == 0
    assert emit.events == [("new.jsonl", watch.hash_file(path))]


def test_one_event_per_content_across_names_and_restarts(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    state = tmp_path / "state.json"
    write(folder / "a.jsonl", '{"instruction": "a", "output": "b"}\n', age=60)
    write(folder / "notes.txt", "not a dataset", age=60)
    write(folder / ".hidden.json", "[]", age=60)
    emit = collector()
    assert [p.name for p in watch.watch(folder, once=True, state_file=state, emit=emit)] == [
        "a.jsonl"
    ]
    # A restarted sensor (new process, same state file) sends nothing again, and the same
    # bytes under another name are the same dataset version.
    write(folder / "a-copy.jsonl", (folder / "a.jsonl").read_text(), age=60)
    assert watch.watch(folder, once=True, state_file=state, emit=emit) == []
    # Changed content is a new version: announced once.
    write(folder / "a.jsonl", '{"instruction": "a", "output": "changed"}\n', age=60)
    assert len(watch.watch(folder, once=True, state_file=state, emit=emit)) == 1
    assert len(emit.events) == 2 and emit.events[0][1] != emit.events[1][1]
    assert set(json.loads(state.read_text())["emitted"]) == {sha for _, sha in emit.events}


def test_once_waits_for_a_settling_file(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    write(folder / "fresh.json", "[]")
    emit = collector()
    started = time.time()
    sent = watch.watch(
        folder, once=True, stable_seconds=0.3, state_file=tmp_path / "s.json", emit=emit
    )
    assert [p.name for p in sent] == ["fresh.json"]
    assert time.time() - started >= 0.3


def test_event_id_is_the_content_hash():
    sha = "ab" * 32
    assert watch.event_id(sha) == watch.event_id(sha)
    assert watch.event_id(sha) != watch.event_id("cd" * 32)
