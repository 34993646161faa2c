"""Training progress while the job runs: follow its log_history.jsonl, report each change.

The training job (another process, maybe on another GPU host's shared store) appends one
JSON line per logged step to `log_history.jsonl` in the train stage's partial folder. A
thread here reads the newest line every few seconds and calls `show(percent, text)`; the
pipeline's `show` updates a Prefect progress artifact (flows/pipeline.py), the wording is
tasks/publish.py's.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

from tasks import publish
from tasks.config import TrainConfig

Show = Callable[[float, str], None]


class TrainingProgress:
    """`with TrainingProgress(partial_dir, cfg.train, show): <train>`: starting, each new
    logged step while it runs, done when the block ends without an error."""

    def __init__(self, workdir: Path, train: TrainConfig, show: Show, every: float = 5.0) -> None:
        self.log = workdir / "log_history.jsonl"
        self.max_steps = train.max_steps
        self.epochs = train.num_epochs
        self.show = show
        self.every = every
        self.stop = threading.Event()

    def __enter__(self) -> TrainingProgress:
        self.show(*publish.STARTING)
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if exc[0] is None:
            self.show(*publish.DONE)

    def _poll(self) -> None:
        shown = None
        while not self.stop.wait(self.every):
            if not self.log.is_file():
                continue
            lines = [x for x in self.log.read_text().splitlines() if x.strip()]
            if not lines:
                continue
            try:
                last = json.loads(lines[-1])
            except json.JSONDecodeError:  # a line being written right now: next time
                continue
            now = publish.training_progress(last, self.max_steps, self.epochs)
            if now != shown:
                self.show(*now)
                shown = now
