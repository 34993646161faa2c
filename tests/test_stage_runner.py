"""One stage contract: `python -m tasks.<stage> --spec FILE`, the same exit statuses for
every heavy stage, a deadline, and errors that come back as kinds the retry policy judges."""

import ast
import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import train_fixtures
from prefect.states import Completed, Failed

from flows.policy import is_transient
from tasks import runner, spec
from tasks.config import REPO_ROOT, ConfigError, UserError, load_config
from tasks.runner import FaultInjected, OutOfMemory, StageFailed, run_stage
from tasks.store import Ref, Store

HEAVY = ("train", "evaluate", "merge", "export")
NOT_THE_STAGE = {"tasks/train/plan.py"}  # `llmft plan`: in the package, not run by the stage

# The real training child (`python -m tasks.train --spec …`) with a job that fails at once.
FAILING_JOB = """
import runpy, sys, torch
import tasks.train.loop
def train_job(spec):
    raise {error}
tasks.train.loop.train_job = train_job
sys.argv = ["tasks.train", *sys.argv[1:]]
runpy.run_module("tasks.train", run_name="__main__")
"""

# Loaded by every Python process started with this folder on its path (the stage child
# included): the merge stage's run() raises `error`.
MERGE_RAISES = """
import tasks.merge
from tasks.config import UserError
class OutOfMemoryError(RuntimeError):  # as torch.cuda names it
    pass
def run(*args, **kwargs):
    raise {error}
tasks.merge.run = run
"""


def refs(tmp_path):
    base, train = tmp_path / "base", tmp_path / "train"
    base.mkdir()
    train.mkdir()  # neither adapter/ nor model/: merge refuses with a user error
    return Ref("base", "b" * 24, str(base)), Ref("train", "t" * 24, str(train))


def store_config(tmp_path, *overrides):
    return load_config(None, [f"pipeline.store={tmp_path / 'store'}", *overrides])


def test_user_error_in_the_child_comes_back_as_user_error(tmp_path):
    base, train = refs(tmp_path)
    lines = []
    with pytest.raises(UserError, match="neither adapter/adapter_config.json nor model/"):
        run_stage("merge", store_config(tmp_path), lines.append, base=base, train=train)
    assert any(line.startswith("[merge] error: ") for line in lines)  # the child's output


@pytest.mark.parametrize(
    ("error", "kind", "status", "message"),
    [
        ('UserError("no data (fix: --set data.input=PATH)")', UserError, 2, "no data (fix: "),
        ("MemoryError()", OutOfMemory, 4, "MemoryError"),
        ('OutOfMemoryError("CUDA out of memory.")', OutOfMemory, 4, "CUDA out of memory."),
        ('RuntimeError("NCCL watchdog timeout")', StageFailed, 1, "NCCL watchdog timeout"),
    ],
    ids=["user", "cpu-oom", "cuda-oom", "crash"],
)
def test_every_exit_status_comes_back_as_its_kind(
    tmp_path, monkeypatch, error, kind, status, message
):
    base, train = refs(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(MERGE_RAISES.format(error=error))
    monkeypatch.setenv("PYTHONPATH", str(site))
    with pytest.raises(kind) as failed:
        run_stage("merge", store_config(tmp_path), base=base, train=train)
    assert message in str(failed.value)  # the child's own message (a crash: its traceback)
    assert is_transient(None, None, Failed(data=failed.value)) is (kind is StageFailed)

    # By hand, the same spec gives the same exit status, the message on stderr.
    spec_file = tmp_path / "merge.json"
    made = spec.make_spec("merge", store_config(tmp_path), base=base, train=train)
    spec_file.write_text(json.dumps(made))
    done = subprocess.run(
        [sys.executable, "-m", "tasks.merge", "--spec", str(spec_file)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{site}"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == status, done.stderr
    assert message in done.stderr


def test_fault_switch_fails_the_stage_on_purpose(tmp_path, monkeypatch):
    base, train = refs(tmp_path)
    monkeypatch.setenv("LLMFT_FAIL_STAGE", "merge")
    with pytest.raises(FaultInjected, match="merge: failed on purpose"):
        run_stage("merge", store_config(tmp_path), base=base, train=train)


def test_a_stage_past_its_deadline_is_killed(tmp_path, monkeypatch):
    base, train = refs(tmp_path)
    # A child that hangs: a sitecustomize on its path sleeps before the stage even starts.
    hang = tmp_path / "hang"
    hang.mkdir()
    (hang / "sitecustomize.py").write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", str(hang))
    cfg = store_config(tmp_path, "pipeline.stage_timeout_minutes=0.02")  # 1.2 s
    started = time.monotonic()
    with pytest.raises(StageFailed, match="merge: killed at its deadline") as failed:
        run_stage("merge", cfg, base=base, train=train)
    assert time.monotonic() - started < 60  # killed at the deadline, not after the sleep
    assert is_transient(None, None, Failed(data=failed.value)) is True


def test_the_deadline_kills_what_the_child_started_too(tmp_path):
    """A hung job under a launcher: the launcher and its processes all go at the deadline."""
    pid_file = tmp_path / "grandchild.pid"
    launcher = (
        "import subprocess, sys, time\n"
        "job = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(job.pid))\n"
        "print('started', flush=True)\n"
        "job.wait()\n"
    )
    lines = []
    with pytest.raises(StageFailed, match="training: killed at its deadline"):
        runner.launch(
            [sys.executable, "-c", launcher], name="training", log=lines.append, deadline_seconds=3
        )
    assert lines == ["started"]  # streamed while it ran
    pid, deadline = int(pid_file.read_text()), time.time() + 10
    while not gone(pid):
        assert time.time() < deadline, f"the launcher's process {pid} outlived the deadline"
        time.sleep(0.1)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped
    except psutil.NoSuchProcess:
        return True


def test_out_of_memory_under_a_launcher_is_still_out_of_memory(tmp_path):
    """torchrun and accelerate exit 1 whatever their processes did: the marker tells."""
    marker = runner.oom_marker(tmp_path / "spec.json")
    marker.write_text("from an earlier attempt\n")  # removed before the start
    job = f"open({str(marker)!r}, 'w').write('CUDA out of memory\\n'); exit(4)"
    launcher = "import subprocess, sys; subprocess.run(sys.argv[1:]); exit(1)"
    cmd = [sys.executable, "-c", launcher, sys.executable, "-c", job]
    exited = runner.launch(cmd, name="training", oom_marker=marker)
    assert (exited.status, exited.out_of_memory) == (1, True)
    assert marker.read_text() == "CUDA out of memory\n"

    crash = [sys.executable, "-c", launcher, sys.executable, "-c", "exit(1)"]
    exited = runner.launch(crash, name="training", oom_marker=marker)
    assert (exited.status, exited.out_of_memory) == (1, False)  # the old marker is gone


def test_a_finished_artifact_starts_no_child(tmp_path, monkeypatch):
    from tasks import merge

    base, train = refs(tmp_path)
    cfg = store_config(tmp_path)
    Store(cfg.pipeline.store).build("merge", merge.key(cfg, base, train), lambda tmp: None)
    monkeypatch.setenv("LLMFT_FAIL_STAGE", "merge")  # would fail if a child started
    specs = tmp_path / "specs"
    ref = run_stage("merge", cfg, spec_dir=specs, base=base, train=train)
    assert ref.cached and ref.stage == "merge"
    kept = json.loads((specs / "merge.json").read_text())  # kept for a run by hand
    assert kept["stage"] == "merge" and list(kept["config"]) == ["train"]
    assert kept["inputs"]["train"]["path"] == train.path


def test_a_spec_carries_only_the_sections_its_stage_reads(tmp_path):
    cfg = load_config(None, ["train.cutoff_len=64", "evaluate.batch_size=3"])
    sections = spec.sections("evaluate", cfg)
    assert sections.train.cutoff_len == 64 and sections.evaluate.batch_size == 3
    with pytest.raises(AttributeError, match="add 'pipeline' to SECTIONS in tasks/evaluate"):
        sections.pipeline  # noqa: B018
    dumped = spec.make_spec("evaluate", cfg)["config"]
    assert set(dumped) == {"evaluate", "train", "base", "data"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**spec.make_spec("merge", cfg), "config": {"train": {"r": 1}}}))
    with pytest.raises(ConfigError, match="train.r: unknown key"):
        spec.read_spec(bad, "merge")
    with pytest.raises(UserError, match="not a spec of the evaluate stage"):
        spec.read_spec(bad, "evaluate")


def test_keys_read_only_the_declared_sections(tmp_path):
    """The parent looks an artifact up with the whole config, the child builds it with its
    sections: both must give one key."""
    cfg = load_config(None, ["train.max_steps=3"])
    data, base = train_fixtures.refs(tmp_path)
    trained, merged = Ref("train", "t" * 24, str(tmp_path)), Ref("merge", "m" * 24, "/m")
    inputs = {
        "train": {"data": data, "base": base},
        "evaluate": {"data": data, "base": base, "train": trained},
        "merge": {"base": base, "train": trained},
        "export": {"merged": merged, "train": trained, "data": data},
    }
    for stage in HEAVY:
        whole = spec.stage_key(stage, cfg, **inputs[stage])
        assert spec.stage_key(stage, spec.sections(stage, cfg), **inputs[stage]) == whole, stage


@pytest.mark.parametrize("stage", HEAVY)
def test_a_stage_reads_no_section_it_does_not_declare(stage):
    """Every `cfg.<section>` in the stage's package is in its SECTIONS (the spec's)."""
    from tasks.config import Config

    declared = set(spec.stage_module(stage).SECTIONS)
    read = set()
    for path in (REPO_ROOT / "tasks" / stage).rglob("*.py"):
        if path.relative_to(REPO_ROOT).as_posix() in NOT_THE_STAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "cfg"
                and node.attr in Config.model_fields
            ):
                read.add(node.attr)
    assert read <= declared, f"tasks/{stage} reads {read - declared} beyond SECTIONS"


def test_a_stage_without_a_spec_says_how_to_get_one(capsys):
    from tasks import evaluate

    assert evaluate.main([]) == 2
    err = capsys.readouterr().err
    assert "python -m tasks.evaluate --spec FILE" in err
    assert "runs/<run id>/specs/evaluate.json" in err and "llmft run" in err


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (StageFailed("child process exited with status -9"), True),
        (ConnectionError("server went away"), True),
        (ConfigError("train.lora.r: got 0"), False),
        (UserError("dataset not found"), False),
        (FaultInjected("export: failed on purpose"), False),
        (OutOfMemory("train: out of memory"), False),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    ],
)
def test_retry_condition(error, retry):
    assert is_transient(None, None, Failed(data=error)) is retry


def test_retry_condition_on_success():
    assert is_transient(None, None, Completed(data=1)) is True


def test_training_runs_as_a_stage_child(base_model_dir, tmp_path):
    """The train stage through the runner: its child validates, tokenizes and launches the
    job, all from the spec's train section and refs; the result is a finished artifact."""
    train_fixtures.make_tiny_model(base_model_dir, tmp_path / "base")
    store = tmp_path / "store"
    cfg = train_fixtures.tiny_config("train.max_steps=2", f"pipeline.store={store}")
    data, base = train_fixtures.refs(tmp_path / "base")
    lines = []
    ref = run_stage("train", cfg, lines.append, spec_dir=tmp_path, data=data, base=base)
    assert not ref.cached and (ref.dir / "adapter" / "adapter_model.safetensors").is_file()
    assert ref.key == spec.stage_key(
        "train", cfg, data=data, base=base
    )  # the key the parent looked up
    assert json.loads((ref.dir / "metrics.json").read_text())["steps"] == 2
    assert any(line.startswith("[train] ") for line in lines)  # the child's log, streamed
    again = run_stage("train", cfg, data=data, base=base)
    assert again.cached and again.key == ref.key
    manifest = Store(store).lookup("train", ref.key).manifest()
    assert manifest["inputs"]["data"] == data.key
    by_hand = subprocess.run(
        [sys.executable, "-m", "tasks.train", "--spec", str(tmp_path / "train.json")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert by_hand.returncode == 0, by_hand.stderr
    assert by_hand.stdout.strip().splitlines()[-1] == ref.path  # found in the store


def train_with_failing_job(base_model_dir, tmp_path, monkeypatch, error, launcher=()):
    """train.run on the tiny model, its child replaced by FAILING_JOB raising `error`."""
    from tasks import train

    train_fixtures.make_tiny_model(base_model_dir, tmp_path / "base")
    job = [sys.executable, "-c", FAILING_JOB.format(error=error)]
    monkeypatch.setattr(
        train, "launch_command", lambda cfg, spec: [*launcher, *job, "--spec", str(spec)]
    )
    cfg = train_fixtures.tiny_config("train.batch_size=4", "train.cutoff_len=128")
    train.run(cfg, Store(tmp_path / "store"), *train_fixtures.refs(tmp_path / "base"))


@pytest.mark.parametrize(
    "error",
    [
        'torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")',
        "MemoryError()",  # CPU training
    ],
)
def test_training_out_of_memory_is_not_retried(base_model_dir, tmp_path, monkeypatch, error):
    with pytest.raises(OutOfMemory) as failed:
        train_with_failing_job(base_model_dir, tmp_path, monkeypatch, error)
    message = str(failed.value)
    assert "out of memory at train.batch_size=4, train.cutoff_len=128" in message
    for fix in ("train.batch_size=2", "train.cutoff_len=64", "train.gradient_checkpointing=true"):
        assert fix in message
    if "cuda" in error:
        assert "Tried to allocate 2.00 GiB" in message  # the job's own error travels along
    assert is_transient(None, None, Failed(data=failed.value)) is False


def test_training_out_of_memory_under_a_launcher_is_still_out_of_memory(
    base_model_dir, tmp_path, monkeypatch
):
    # torchrun and accelerate exit 1 when a process exits 4; this stand-in does the same.
    launcher = [
        sys.executable,
        "-c",
        "import subprocess, sys; subprocess.run(sys.argv[1:]); exit(1)",
    ]
    with pytest.raises(OutOfMemory, match="train.gradient_checkpointing=true"):
        train_with_failing_job(base_model_dir, tmp_path, monkeypatch, "MemoryError()", launcher)


def test_a_training_crash_is_retried(base_model_dir, tmp_path, monkeypatch):
    with pytest.raises(StageFailed, match="exited with status 1") as failed:
        train_with_failing_job(
            base_model_dir, tmp_path, monkeypatch, 'RuntimeError("NCCL watchdog timeout")'
        )
    assert "NCCL watchdog timeout" in str(failed.value)  # the job's traceback, for the log
    assert "a new run resumes from them" in str(failed.value)
    assert is_transient(None, None, Failed(data=failed.value)) is True
