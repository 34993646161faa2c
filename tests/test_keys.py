"""Stage keys are derived, not typed: from the stage's code (and the project code it
imports), the libraries that shape its output, its settings and the contents of what it
reads. An edit to a stage's code gives it, and every stage after it, a new key; the stages
before it keep theirs. The code is hashed from an edited copy of the tree (tasks.versions.ROOT
points at it), so nothing in the working tree changes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import base, data, evaluate, export, merge, train, versions
from tasks.config import load_config
from tasks.store import Ref
from tasks.train import tokens

REPO = Path(__file__).resolve().parent.parent
DATASET = REPO / "tests" / "assets" / "tiny_pipeline.jsonl"
STAGES = ["base", "data", "tokens", "train", "evaluate", "merge", "export"]


def chain_keys(cfg, model_dir: Path) -> dict[str, str]:
    """Every stage's key, each computed from the keys of its inputs as the pipeline does."""
    keys = {"base": base.key(cfg), "data": data.key(cfg, model_dir)}
    b = Ref("base", keys["base"], str(model_dir.parent))  # tokens hashes b.dir/model's files
    d = Ref("data", keys["data"], str(model_dir.parent.parent / "data"))  # its report.json
    keys["tokens"] = tokens.key(cfg, d, b)
    keys["train"] = train.key(cfg, d, b)
    t = Ref("train", keys["train"], "-")
    keys["evaluate"] = evaluate.key(cfg, d, b, t)
    keys["merge"] = merge.key(cfg, b, t)
    keys["export"] = export.key(cfg, Ref("merge", keys["merge"], "-"), t, d)
    return keys


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [s for s in STAGES if before[s] != after[s]]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A base folder's tokenizer files (what tokens and data hash; no weights needed), and
    beside it a data folder's report (train reads its record count)."""
    folder = tmp_path / "stages" / "base" / "model"
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text('{"model": "stand-in"}')
    (folder / "tokenizer_config.json").write_text("{}")
    (tmp_path / "stages" / "data").mkdir()
    (tmp_path / "stages" / "data" / "report.json").write_text('{"train": 25}')
    return folder


@pytest.fixture
def tree(tmp_path, monkeypatch) -> Path:
    """A copy of the project's packages whose sources the stage versions are hashed from."""
    root = tmp_path / "tree"
    for package in ("tasks", "flows"):
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(REPO / package, root / package, ignore=ignore)
    monkeypatch.setattr(versions, "ROOT", root)
    return root


def cfg(*overrides: str):
    return load_config(None, [f"data.input={DATASET}", *overrides])


# (file edited, stages whose key must change, stages whose key must not)
EDITS = [
    ("tasks/base/__init__.py", {"base", "train", "evaluate", "merge", "export"}, {"data"}),
    (
        "tasks/data/clean.py",
        {"data", "tokens", "train", "evaluate", "merge", "export"},
        {"base"},
    ),
    (
        "tasks/train/tokens.py",
        {"tokens", "train", "evaluate", "merge", "export"},
        {"base", "data"},
    ),
    ("tasks/train/loop.py", {"train", "evaluate", "merge", "export"}, {"base", "data"}),
    ("tasks/evaluate/__init__.py", {"evaluate"}, set(STAGES) - {"evaluate"}),
    ("tasks/merge/__init__.py", {"merge", "export"}, set(STAGES) - {"merge", "export"}),
    ("tasks/export/__init__.py", {"export"}, set(STAGES) - {"export"}),
    ("tasks/store.py", set(STAGES), set()),  # shared by every stage
]


@pytest.mark.parametrize(("edited", "must_change", "must_stay"), EDITS, ids=[e[0] for e in EDITS])
def test_editing_a_stages_code_changes_its_key_and_those_after_it(
    tree, model_dir, edited, must_change, must_stay
):
    before = chain_keys(cfg(), model_dir)
    with open(tree / edited, "a") as f:
        f.write("\n# an edit: one more line of code\n")
    after = chain_keys(cfg(), model_dir)
    moved = changed(before, after)
    print(f"\n{edited:28} → new keys: {', '.join(moved)}")
    for stage in STAGES:
        print(f"  {stage:9} {before[stage]} → {after[stage]}")
    assert must_change <= set(moved), f"{edited}: {sorted(must_change - set(moved))} kept a key"
    assert not must_stay & set(moved), f"{edited}: {sorted(must_stay & set(moved))} moved"


def test_code_outside_what_a_stage_imports_does_not_enter_its_key(tree, model_dir):
    before = chain_keys(cfg(), model_dir)
    (tree / "tasks" / "serve" / "__init__.py").write_text("# rewritten\n")  # no stage imports it
    (tree / "tasks" / "notes.txt").write_text("outside every package a stage imports\n")
    assert chain_keys(cfg(), model_dir) == before


def test_a_function_local_and_a_relative_import_are_followed(tmp_path):
    pkg = tmp_path / "tasks" / "demo"
    pkg.mkdir(parents=True)
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "unused.py").write_text("X = 1\n")
    (pkg / "__init__.py").write_text("def run():\n    from tasks.demo import helper\n")
    (pkg / "helper.py").write_text("from ..shared import VALUE\nimport json\n")
    (tmp_path / "tasks" / "shared.py").write_text("VALUE = 1\n")
    files = versions.code_hashes("tasks.demo.helper", tmp_path)
    assert sorted(files) == [
        "tasks/__init__.py",
        "tasks/demo/__init__.py",  # its package runs on import, and imports nothing here
        "tasks/demo/helper.py",
        "tasks/shared.py",  # from ..shared
    ]
    everything = versions.code_hashes("tasks.demo", tmp_path)  # a package: all its files
    assert "tasks/demo/helper.py" in everything and "tasks/unused.py" not in everything


def test_launch_file_contents_enter_the_train_key_not_their_names(tmp_path, model_dir):
    """accelerate's YAML and the DeepSpeed JSON it names: contents count, names never."""
    ds = tmp_path / "ds.json"
    ds.write_text((REPO / "deploy" / "deepspeed" / "zero2.json").read_text())
    launch = tmp_path / "zero2.yaml"
    shipped = (REPO / "deploy" / "accelerate" / "zero2.yaml").read_text()
    launch.write_text(shipped.replace("deploy/deepspeed/zero2.json", str(ds)))
    accelerate = ["train.launcher=accelerate", "train.num_processes=2"]

    def keys(path: Path) -> dict[str, str]:
        return chain_keys(cfg(*accelerate, f"train.accelerate_config={path}"), model_dir)

    first = keys(launch)
    elsewhere = tmp_path / "copy" / "renamed.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(launch.read_text())
    assert keys(elsewhere) == first  # the same bytes under another name and folder

    launch.write_text(launch.read_text().replace("zero3_init_flag: false", "zero3_init_flag: true"))
    edited_yaml = keys(launch)
    assert changed(first, edited_yaml) == ["train", "evaluate", "merge", "export"]

    settings = json.loads(ds.read_text())
    settings["zero_optimization"]["overlap_comm"] = not settings["zero_optimization"].get(
        "overlap_comm", False
    )
    ds.write_text(json.dumps(settings))
    assert changed(edited_yaml, keys(launch)) == ["train", "evaluate", "merge", "export"]


def test_a_shipped_launch_file_by_name_or_by_path_is_one_key(model_dir):
    accelerate = ["train.launcher=accelerate", "train.num_processes=2"]
    path = REPO / "deploy" / "accelerate" / "zero3_offload.yaml"
    by_name = chain_keys(cfg(*accelerate, "train.accelerate_config=zero3_offload"), model_dir)
    by_path = chain_keys(cfg(*accelerate, f"train.accelerate_config={path}"), model_dir)
    assert by_name == by_path
    other = chain_keys(cfg(*accelerate, "train.accelerate_config=zero2_offload"), model_dir)
    assert changed(by_name, other) == ["train", "evaluate", "merge", "export"]


def test_settings_that_cannot_change_the_weights_stay_out_of_the_train_key(model_dir):
    plain = chain_keys(cfg("train.launcher=torchrun"), model_dir)
    quiet = ["train.logging_steps=50", "train.save_steps=7", "train.save_total_limit=9"]
    assert chain_keys(cfg("train.launcher=torchrun", *quiet), model_dir) == plain
    # and what does change them: the step, the number of processes averaged, the device
    for setting in ("train.learning_rate=0.00033", "train.num_processes=2", "train.device=cpu"):
        moved = changed(plain, chain_keys(cfg("train.launcher=torchrun", setting), model_dir))
        assert moved == ["train", "evaluate", "merge", "export"], setting


def test_a_library_version_enters_the_keys_of_the_stages_it_shapes(model_dir, monkeypatch):
    before = chain_keys(cfg(), model_dir)
    real = versions._library_version
    monkeypatch.setattr(
        versions, "_library_version", lambda name: "9.9" if name == "peft" else real(name)
    )
    # peft shapes the adapter (train), its scores (evaluate) and the merged weights (merge)
    assert changed(before, chain_keys(cfg(), model_dir)) == ["train", "evaluate", "merge", "export"]


def test_keys_are_the_same_in_another_process_and_another_copy_of_the_tree(
    tmp_path, model_dir, monkeypatch
):
    here = chain_keys(cfg(), model_dir)
    script = (
        "import json, sys; from pathlib import Path; from tasks.config import load_config; "
        "from tests.test_keys import chain_keys; "
        "cfg = load_config(None, [f'data.input={sys.argv[1]}']); "
        "print(json.dumps(chain_keys(cfg, Path(sys.argv[2]))))"
    )
    copy = tmp_path / "dataset-copy.jsonl"
    shutil.copy(DATASET, copy)  # data's key follows the bytes, not the path
    done = subprocess.run(
        [sys.executable, "-c", script, str(copy), str(model_dir)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == here
    for where in ("a", "b/deeper"):  # relative paths only: the tree's location is not hashed
        root = tmp_path / where
        shutil.copytree(
            REPO / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__")
        )
        monkeypatch.setattr(versions, "ROOT", root)
        assert chain_keys(cfg(), model_dir) == here
