"""The training progress artifact follows log_history.jsonl while training runs (no server)."""

import json
import time

from flows import pipeline
from tasks.config import load_config


def test_progress_is_published_while_training_runs(tmp_path, monkeypatch):
    published: list[tuple[str, float, str | None]] = []

    def create(progress, key=None, description=None):
        published.append(("created", progress, description))
        return "artifact-1"

    def update(artifact_id, progress, description=None):
        published.append((artifact_id, progress, description))

    monkeypatch.setattr(pipeline, "create_progress_artifact", create)
    monkeypatch.setattr(pipeline, "update_progress_artifact", update)

    def wait_for(progress: float) -> None:
        deadline = time.time() + 10
        while not any(p == progress for _, p, _ in published):
            assert time.time() < deadline, published
            time.sleep(0.02)

    log = tmp_path / "log_history.jsonl"
    cfg = load_config(None, ["train.max_steps=8"])
    with pipeline.TrainingProgress(tmp_path, cfg, every=0.05):
        time.sleep(0.2)  # a few polls find no log yet: nothing to publish
        for step, loss in ((2, 2.5), (6, 1.25)):  # as the training loop appends them
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "epoch": step / 4, "max_steps": 8}) + "\n")
                f.write(json.dumps({"step": step, "loss": loss, "max_steps": 8}) + "\n")
            wait_for(100.0 * step / 8)

    assert published[0] == ("created", 0.0, "training: starting")
    during = [(p, d) for who, p, d in published[1:-1]]
    assert all(who == "artifact-1" for who, _, _ in published[1:])
    assert (25.0, "training: step 2, loss 2.5000") in during
    assert (75.0, "training: step 6, loss 1.2500") in during
    assert all(0.0 < p < 100.0 for p, _ in during)
    assert published[-1] == ("artifact-1", 100.0, "training: done")
