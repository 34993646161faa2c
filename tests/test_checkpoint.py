"""Checkpoints on a job of one process: the last save_total_limit are kept, an interrupted
write is never taken for a checkpoint, and resume loads the newest one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tasks.config import TrainConfig
from tasks.train import checkpoint


class OneProcess:
    """What checkpoint.save and resume ask of accelerate's Accelerator, for one process."""

    is_main_process = True
    process_index = 0
    scaler = None

    def wait_for_everyone(self) -> None:
        """One process: nobody to wait for."""

    def unwrap_model(self, model):
        return model


def fake_job(out: Path, keep: int) -> SimpleNamespace:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return SimpleNamespace(
        accelerator=OneProcess(),
        spec=SimpleNamespace(output_dir=out),
        cfg=TrainConfig(save_total_limit=keep),
        info={"deepspeed": False},
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        state=checkpoint.fresh_state(),
    )


def steps(out: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in checkpoint.complete(out)]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_only_the_newest_k_checkpoints_remain(tmp_path, keep):
    job = fake_job(tmp_path, keep)
    for step in (5, 10, 15, 20, 100):  # step 100 sorts by number, not by name
        job.state["step"] = step
        checkpoint.save(job)
        assert steps(tmp_path)[-1] == step
    assert steps(tmp_path) == [5, 10, 15, 20, 100][-keep:]
    folders = sorted(p.name for p in (tmp_path / checkpoint.FOLDER).iterdir())
    assert folders == [f"step-{s:06d}" for s in [5, 10, 15, 20, 100][-keep:]]  # gone from disk


def test_a_half_written_checkpoint_is_ignored_and_resume_takes_the_newest(tmp_path):
    job = fake_job(tmp_path, keep=2)
    for step in (10, 20):
        job.state["step"] = step
        with torch.no_grad():
            job.model.weight.fill_(step)  # each checkpoint holds weights of its own step
        checkpoint.save(job)
    debris = tmp_path / checkpoint.FOLDER / ".tmp-step-000030"  # a job killed mid-write
    debris.mkdir()
    (tmp_path / checkpoint.FOLDER / "step-000040").mkdir()  # no state.json: not complete
    assert steps(tmp_path) == [10, 20]

    fresh = fake_job(tmp_path, keep=2)
    fresh.state = checkpoint.resume(fresh)
    assert fresh.state["step"] == fresh.state["resumed_from_step"] == 20
    assert torch.all(fresh.model.weight == 20)
