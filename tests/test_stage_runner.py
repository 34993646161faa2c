"""Heavy stages in a child process: errors come back as kinds the retry policy can judge."""

import sys
import time

import pytest
import train_fixtures
from prefect.states import Completed, Failed

from flows.pipeline import is_transient
from flows.stage import FaultInjected, OutOfMemory, StageFailed, run_in_subprocess
from tasks.config import ConfigError, UserError, load_config
from tasks.store import Ref, Store

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


def refs(tmp_path):
    base, train = tmp_path / "base", tmp_path / "train"
    base.mkdir()
    train.mkdir()  # neither adapter/ nor model/: merge refuses with a user error
    return Ref("base", "b" * 24, str(base)), Ref("train", "t" * 24, str(train))


def test_user_error_in_the_child_comes_back_as_user_error(tmp_path):
    base, train = refs(tmp_path)
    cfg = load_config(None, [f"pipeline.store={tmp_path / 'store'}"])
    lines = []
    with pytest.raises(UserError, match="neither adapter/adapter_config.json nor model/"):
        run_in_subprocess("merge", cfg, lines.append, base=base, train=train)
    assert any(line.startswith("[merge] ") for line in lines)  # the child's output is logged


def test_fault_switch_fails_the_stage_on_purpose(tmp_path, monkeypatch):
    base, train = refs(tmp_path)
    cfg = load_config(None, [f"pipeline.store={tmp_path / 'store'}"])
    monkeypatch.setenv("LLMFT_FAIL_STAGE", "merge")
    with pytest.raises(FaultInjected):
        run_in_subprocess("merge", cfg, base=base, train=train)


def test_a_stage_past_its_deadline_is_killed(tmp_path, monkeypatch):
    base, train = refs(tmp_path)
    # A child that hangs: a sitecustomize on its path sleeps before the stage even starts.
    hang = tmp_path / "hang"
    hang.mkdir()
    (hang / "sitecustomize.py").write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setenv("PYTHONPATH", str(hang))
    cfg = load_config(  # 0.02 min = 1.2 s
        None, [f"pipeline.store={tmp_path / 'store'}", "pipeline.stage_timeout_minutes=0.02"]
    )
    started = time.monotonic()
    with pytest.raises(StageFailed, match="killed after"):
        run_in_subprocess("merge", cfg, base=base, train=train)
    assert time.monotonic() - started < 60  # killed at the deadline, not after the sleep


def test_a_finished_artifact_starts_no_child(tmp_path, monkeypatch):
    from tasks import merge
    from tasks.store import Store

    base, train = refs(tmp_path)
    cfg = load_config(None, [f"pipeline.store={tmp_path / 'store'}"])
    Store(cfg.pipeline.store).build("merge", merge.key(cfg, base, train), lambda tmp: None)
    monkeypatch.setenv("LLMFT_FAIL_STAGE", "merge")  # would fail if a child started
    ref = run_in_subprocess("merge", cfg, base=base, train=train)
    assert ref.cached and ref.stage == "merge"


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
    from tasks.train import TrainingFailed

    with pytest.raises(TrainingFailed, match="exited with status 1") as failed:
        train_with_failing_job(
            base_model_dir, tmp_path, monkeypatch, 'RuntimeError("NCCL watchdog timeout")'
        )
    assert is_transient(None, None, Failed(data=failed.value)) is True
