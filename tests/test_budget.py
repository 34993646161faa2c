"""Training budget: 'auto' epochs sized from the data, explicit settings winning, the resolved
number entering the train key; early stopping that ends on the best dev loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks import train
from tasks.config import CONFIG_DIR, ConfigError, load_config
from tasks.store import Ref
from tasks.train import budget, early_stop


def train_section(*overrides: str):
    return load_config(None, list(overrides)).train


@pytest.mark.parametrize(
    ("records", "overrides", "epochs", "steps"),
    [
        # the identity file of the issue: 72 records / 8 = 9 steps an epoch; 2 epochs = 18 <
        # 100, so ceil(100 / 9) = 12 epochs = 108 steps
        (72, [], 12, 108),
        # the bundled data: 239 / 8 → 30 steps an epoch; 2 epochs = 60 < 100 → 4 epochs
        (239, [], 4, 120),
        # a large set keeps budget.epochs: 5000 / 8 → 625 an epoch, 2 epochs
        (5000, [], 2, 1250),
        # records per step = 4 × 2 × 2 = 16: 72 → 5 an epoch; ceil(100 / 5) = 20 epochs
        (72, ["train.batch_size=4", "train.grad_accum=2", "train.num_processes=2"], 20, 100),
        # 3 records: 1 step an epoch; 100 epochs needed, capped at max_epochs 20
        (3, [], 20, 20),
        (72, ["train.budget.min_steps=60"], 7, 63),
        (72, ["train.budget.epochs=3", "train.budget.min_steps=20"], 3, 27),
    ],
)
def test_auto_epochs_reach_the_minimum_steps(records, overrides, epochs, steps):
    chosen = budget.resolve(train_section("train.num_epochs=auto", *overrides), records)
    assert chosen.chosen_by == "auto"
    assert chosen.train.num_epochs == epochs
    assert chosen.steps == steps


def test_the_line_says_what_was_chosen_and_why():
    line = budget.resolve(train_section("train.num_epochs=auto"), 72).line
    assert line.startswith("budget: 72 train records, batch 8 → 9 steps/epoch")
    assert "2 epochs would give 18 steps < min 100 → 12 epochs = 108 steps" in line
    assert "--set train.num_epochs=N" in line
    capped = budget.resolve(train_section("train.num_epochs=auto"), 3).line
    assert "capped by train.budget.max_epochs=20" in capped
    big = budget.resolve(train_section("train.num_epochs=auto"), 5000).line
    assert "2 epochs give 1250 steps ≥ min 100 → 2 epochs" in big


@pytest.mark.parametrize(
    ("overrides", "chosen_by", "steps"),
    [
        (["train.num_epochs=3"], "num_epochs", 27),  # 3 × 9, no minimum applied
        (["train.num_epochs=auto", "train.max_steps=10"], "max_steps", 10),
        (["train.num_epochs=2", "train.max_steps=10"], "max_steps", 10),
    ],
)
def test_explicit_epochs_or_steps_win(overrides, chosen_by, steps):
    t = train_section(*overrides)
    chosen = budget.resolve(t, 72)
    assert (chosen.chosen_by, chosen.steps) == (chosen_by, steps)
    assert chosen.train == t  # nothing of the section is changed
    assert "as set" in chosen.line


def test_early_stopping_measures_the_dev_loss_every_epoch_unless_told():
    chosen = budget.resolve(train_section("train.early_stopping_patience=2"), 72)
    assert chosen.train.eval_steps == 9
    assert "early stopping: dev loss every 9 steps" in chosen.line
    told = budget.resolve(
        train_section("train.early_stopping_patience=2", "train.eval_steps=4"), 72
    )
    assert told.train.eval_steps == 4


def test_the_default_recipe_is_auto_and_bad_values_are_named():
    assert load_config().train.num_epochs == "auto"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.num_epochs=many", "train.budget.min_steps=0"])
    text = str(err.value)
    assert "train.num_epochs" in text and "train.budget.min_steps" in text


# the fine-tuning recipes; a recipe for one bundled dataset (dpo.yaml) may fix its epochs
SIZED_FROM_THE_DATA = {"default", "lora_gpu", "qlora_gpu", "ptuning_gpu", "full_deepspeed"}


@pytest.mark.parametrize("recipe", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_has_a_budget_and_the_fine_tuning_ones_size_it(recipe: Path):
    raw = yaml.safe_load(recipe.read_text())
    cfg = load_config(recipe)
    small, large = (budget.resolve(cfg.train, n) for n in (72, 100_000))
    assert small.steps >= 1 and small.line.startswith("budget: 72 train records")
    if recipe.stem not in SIZED_FROM_THE_DATA:
        return
    assert raw["train"].get("num_epochs") == "auto"
    assert small.steps >= cfg.train.budget.min_steps
    assert large.train.num_epochs == cfg.train.budget.epochs


def fake_data(folder: Path, train_records: int) -> Ref:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"train": train_records}))
    return Ref("data", "same-data-key", str(folder))


def test_the_key_holds_the_resolved_epochs_not_the_word_auto(tmp_path):
    base = Ref("base", "base-key", str(tmp_path / "base"))
    small, large = fake_data(tmp_path / "small", 72), fake_data(tmp_path / "large", 239)
    auto = load_config()
    # the same recipe on data of another size trains another number of epochs
    assert train.key(auto, small, base) != train.key(auto, large, base)
    # and is the same artifact as asking for that number outright
    assert train.key(auto, small, base) == train.key(
        load_config(None, ["train.num_epochs=12"]), small, base
    )
    assert train.key(auto, large, base) == train.key(
        load_config(None, ["train.num_epochs=4"]), large, base
    )


def test_train_records_reads_the_report_or_counts_the_split(tmp_path):
    assert budget.train_records(fake_data(tmp_path / "a", 72)) == 72
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps([{"instruction": "q", "output": "a"}] * 5))
    assert budget.train_records(Ref("data", "k", str(folder))) == 5


# --- early stopping --------------------------------------------------------------------


def history(*losses: float, every: int = 5) -> list[dict]:
    """Log history as training writes it: the step-0 dev loss, then train and dev entries."""
    out = [{"step": 0, "dev_loss": 9.0}]
    for i, loss in enumerate(losses, start=1):
        out += [{"step": i * every, "loss": 1.0}, {"step": i * every, "dev_loss": loss}]
    return out


@pytest.mark.parametrize(
    ("losses", "patience", "stop"),
    [
        ((3.0, 2.5, 2.0), 1, False),  # still improving
        ((3.0, 2.5, 2.6), 1, True),  # one evaluation past the best
        ((3.0, 2.5, 2.6), 2, False),
        ((3.0, 2.5, 2.6, 2.5), 2, True),  # a tie is no improvement
        ((3.0, 2.5, 2.6, 2.4), 2, False),  # a new best resets the count
        ((3.0, 9.0, 9.0), None, False),  # off
    ],
)
def test_patience_counts_evaluations_since_the_best(losses, patience, stop):
    assert early_stop.should_stop(history(*losses), patience) is stop


def test_step_zero_is_not_a_candidate_for_the_best():
    # the base's dev loss (9.0 at step 0 above) is lower here, but the run has no weights of it
    assert early_stop.best_of(early_stop.evaluations(history(10.0, 11.0))) == (5, 10.0)


@pytest.fixture(scope="module")
def tiny_base(base_model_dir, tmp_path_factory) -> Path:
    from train_fixtures import make_tiny_model

    out = tmp_path_factory.mktemp("tiny-base")
    make_tiny_model(base_model_dir, out)
    return out


def test_a_run_that_overshoots_stops_and_ends_on_its_best_weights(tiny_base, tmp_path):
    """A learning rate far too high makes the dev loss climb: with patience 1 the job stops
    at the first evaluation past the best, and the saved adapter has the best one's dev loss."""
    import torch
    from peft import PeftModel
    from train_fixtures import ASSETS, refs, tiny_config
    from transformers import AutoModelForCausalLM

    from tasks.evaluate import answer_loss
    from tasks.store import Store
    from tasks.train import loop, tokens
    from tasks.train.tokens import load_tokenizer

    cfg = tiny_config(
        "train.max_steps=40",
        "train.learning_rate=0.3",
        "train.eval_steps=2",
        "train.early_stopping_patience=1",
        "train.save_steps=1000",
    )
    data, base = refs(tiny_base)
    tok = tokens.run(cfg, Store(tmp_path / "store"), data, base)
    out = tmp_path / "job"
    out.mkdir()
    metrics = loop.train_job(loop.Spec(cfg.train, tiny_base / "model", tok.dir, out))

    logged = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    evals = early_stop.evaluations(logged)
    best_step, best_loss = early_stop.best_of(evals)
    print(f"\nstopped at step {metrics['steps']} of 40; dev losses {evals}; kept step {best_step}")
    assert metrics["steps"] < 40, "the dev loss never stopped improving at this rate"
    assert best_step < metrics["steps"]  # the last weights are not the best ones
    assert metrics["dev_loss"]["after"] == pytest.approx(best_loss)
    resolved = yaml.safe_load((out / "hyperparameters.yaml").read_text())["resolved"]
    assert resolved["early_stopping"]["kept_step"] == best_step

    # measured again from the saved adapter, by evaluate's own loss
    eval_cfg = load_config(None, ["train.cutoff_len=128"])
    model = AutoModelForCausalLM.from_pretrained(tiny_base / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, out / "adapter").eval()
    dev = json.loads((ASSETS / "dev.json").read_text())
    with torch.no_grad():
        remeasured = answer_loss(model, load_tokenizer(tiny_base / "model"), dev, eval_cfg)
    assert remeasured == pytest.approx(best_loss, rel=1e-3)
    assert not (out / "checkpoints").exists()  # the best weights' copy went with them
