import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tasks.store import MANIFEST, Store, hash_file, make_key


def _key_for(path: Path) -> str:
    return make_key("demo", "1", {"upper": True}, {"file": hash_file(path)})


def _upper(src: Path):
    def work(tmp: Path):
        (tmp / "out.txt").write_text(src.read_text().upper())
        return {"lines": 1}

    return work


def test_second_call_with_same_inputs_does_no_work(tmp_path):
    store, src = Store(tmp_path / "artifacts"), tmp_path / "in.txt"
    src.write_text("hello")
    calls = []

    def work(tmp: Path):
        calls.append(1)
        (tmp / "out.txt").write_text("HELLO")

    first = store.build("demo", _key_for(src), work)
    second = store.build("demo", _key_for(src), work)
    assert calls == [1]
    assert not first.cached and second.cached
    assert first.path == second.path
    manifest = json.loads((Path(first.path) / MANIFEST).read_text())
    assert manifest["outputs"]["out.txt"] == hash_file(Path(first.path) / "out.txt")


def test_changed_contents_at_same_path_give_a_new_key(tmp_path):
    store, src = Store(tmp_path / "artifacts"), tmp_path / "in.txt"
    src.write_text("hello")
    a = store.build("demo", _key_for(src), _upper(src))
    time.sleep(0.01)
    src.write_text("world")
    b = store.build("demo", _key_for(src), _upper(src))
    assert a.key != b.key
    assert (Path(b.path) / "out.txt").read_text() == "WORLD"


def test_same_contents_at_another_path_give_the_same_key(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same")
    b.write_text("same")
    assert _key_for(a) == _key_for(b)


def test_folder_without_manifest_is_never_served(tmp_path):
    store = Store(tmp_path / "artifacts")
    debris = store.final("demo", "k1")
    debris.mkdir(parents=True)
    (debris / "out.txt").write_text("half")
    assert store.lookup("demo", "k1") is None
    ref = store.build("demo", "k1", lambda tmp: (tmp / "out.txt").write_text("whole"))
    assert (Path(ref.path) / "out.txt").read_text() == "whole"


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tasks.store import Store

    def work(tmp: Path):
        (tmp / "part1.bin").write_bytes(b"x" * 1000)
        Path(sys.argv[2]).write_text("started")
        time.sleep(60)  # SIGKILLed here, mid-write
        (tmp / "part2.bin").write_bytes(b"y")

    Store(sys.argv[1]).build("demo", "killme", work)
    """
)


def test_sigkill_mid_write_leaves_nothing_served_and_next_call_completes(tmp_path):
    root, flag = tmp_path / "artifacts", tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(root), str(flag)],
        cwd=Path(__file__).resolve().parent.parent,
    )
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), "writer never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    store = Store(root)
    assert store.lookup("demo", "killme") is None
    assert store.partial("demo", "killme").exists()  # debris, not served

    ref = store.build("demo", "killme", lambda tmp: (tmp / "done.txt").write_text("ok"))
    files = sorted(p.name for p in Path(ref.path).iterdir())
    assert files == ["done.txt", MANIFEST]  # the killed run's partial files are gone
    assert not store.partial("demo", "killme").exists()


def test_gc_removes_unreferenced_and_debris(tmp_path):
    store = Store(tmp_path / "artifacts")
    keep = store.build("demo", "keep", lambda t: (t / "a").write_text("1"))
    drop = store.build("demo", "drop", lambda t: (t / "a").write_text("2"))
    store.partial("demo", "crashed").mkdir(parents=True)
    removed = store.gc({("demo", "keep")})
    assert Path(keep.path).exists()
    assert not Path(drop.path).exists()
    assert not store.partial("demo", "crashed").exists()
    assert len(removed) == 2
