"""What a finished training job writes beside its weights, so the folder explains itself.

hyperparameters.yaml   the method, every train setting, the inputs' keys, what was resolved
                       at run time (device, precision, processes, steps)
metrics.json           {method, dev_loss {before, after}, train_loss, steps,
                        trained_tokens, tokens_per_second (over step_seconds),
                        step_seconds, eval_seconds, save_seconds, train_wall_seconds, ...}
loss.png               train loss per logging step and dev loss, against the step
log_history.jsonl      (written while training, by tasks/train/steps.py)
"""

from __future__ import annotations

from typing import Any

import yaml

from tasks.store import write_json_atomic


def write_outputs(spec: Any, metrics: dict, history: list[dict], info: dict) -> None:
    out = spec.output_dir
    hyper = {
        "method": spec.train.method,
        "train": spec.train.model_dump(mode="json"),
        "base_model": str(spec.model_dir),
        "keys": spec.keys,
        "resolved": info,
    }
    (out / "hyperparameters.yaml").write_text(
        yaml.safe_dump(hyper, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
    title = f"{spec.train.method}: {info['train_rows']} records, {info['total_steps']} steps"
    plot_loss(history, out / "loss.png", title=title)
    write_json_atomic(out / "metrics.json", metrics)


def plot_loss(history: list[dict], path: Any, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a training worker
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    dev = [(h["step"], h["dev_loss"]) for h in history if h.get("dev_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if dev:
        ax.plot(*zip(*dev, strict=True), "o--", label="dev loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token cross-entropy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
