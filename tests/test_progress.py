"""The training progress follows log_history.jsonl while training runs (no server)."""

import json
import time

import pytest

from tasks.config import load_config
from tasks.progress import TrainingProgress
from tasks.publish import training_progress


def test_progress_is_published_while_training_runs(tmp_path):
    shown: list[tuple[float, str]] = []

    def wait_for(progress: float) -> None:
        deadline = time.time() + 10
        while not any(p == progress for p, _ in shown):
            assert time.time() < deadline, shown
            time.sleep(0.02)

    log = tmp_path / "log_history.jsonl"
    train = load_config(None, ["train.max_steps=8"]).train
    with TrainingProgress(tmp_path, train, lambda p, text: shown.append((p, text)), every=0.05):
        time.sleep(0.2)  # a few polls find no log yet: nothing to show
        assert shown == [(0.0, "training: starting")]
        for step, loss in ((2, 2.5), (6, 1.25)):  # as the training loop appends them
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "epoch": step / 4, "max_steps": 8}) + "\n")
                f.write(json.dumps({"step": step, "loss": loss, "max_steps": 8}) + "\n")
            wait_for(100.0 * step / 8)

    during = shown[1:-1]
    assert (25.0, "training: step 2, loss 2.5000") in during
    assert (75.0, "training: step 6, loss 1.2500") in during
    assert all(0.0 < p < 100.0 for p, _ in during)
    assert len(during) == len(set(during))  # an unchanged log is not shown again
    assert shown[-1] == (100.0, "training: done")


def test_a_failed_training_is_not_shown_as_done(tmp_path):
    shown: list[tuple[float, str]] = []
    train = load_config(None, ["train.max_steps=8"]).train
    with (
        pytest.raises(RuntimeError),
        TrainingProgress(tmp_path, train, lambda p, text: shown.append((p, text)), every=1),
    ):
        raise RuntimeError("the job crashed")
    assert shown == [(0.0, "training: starting")]


def test_auto_epochs_take_the_steps_the_job_logs():
    """With num_epochs='auto' only the job knows the total: its log lines carry max_steps."""
    assert training_progress({"step": 3, "max_steps": 12}, None, "auto")[0] == 25.0
    assert training_progress({"step": 3, "epoch": 0.5}, None, "auto")[0] == 0.0
    assert training_progress({"step": 3, "epoch": 0.5}, None, 2.0)[0] == 25.0
