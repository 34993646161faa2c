"""The training stage on CPU: methods train what they should, packing is exact, a killed job
resumes to the same loss, the artifact has the layout later stages read, bad configs stop
before any weights load, and the real SmolLM2 learns its new name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from train_fixtures import ASSETS, greedy_answers, make_tiny_model, name_rate, refs, tiny_config

from tasks import train
from tasks.config import REPO_ROOT, ConfigError
from tasks.store import Store
from tasks.train import batches, checkpoint, fastpath, loop, steps, tokens


@pytest.fixture(scope="module")
def tiny_base(base_model_dir, tmp_path_factory) -> Path:
    """A base-stage folder (holding model/) with the 2-layer model."""
    out = tmp_path_factory.mktemp("tiny-base")
    make_tiny_model(base_model_dir, out)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("store"))


def make_spec(cfg, store, tiny_base, out: Path) -> loop.Spec:
    data, base = refs(tiny_base)
    tok = tokens.run(cfg, store, data, base)
    out.mkdir(parents=True, exist_ok=True)
    return loop.Spec(cfg.train, tiny_base / "model", tok.dir, out)


def train_in_process(spec: loop.Spec):
    """setup → train, keeping the model in hand so the test can look at its parameters."""
    job = loop.setup(spec)
    job.state = checkpoint.fresh_state()
    before = {n: p.detach().clone() for n, p in job.model.named_parameters()}
    steps.train_steps(job, steps.Log(job), steps.Clock(job.state, job.accelerator.device))
    after = dict(job.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in after.items() if p.requires_grad}
    losses = [h["loss"] for h in job.state["log_history"] if "loss" in h]
    return job, changed, trainable, losses, steps.dev_loss(job)


def test_tokenized_dataset_is_an_arrow_artifact_keyed_by_what_changes_tokens(tiny_base, tmp_path):
    store = Store(tmp_path)
    data, base = refs(tiny_base)
    ref = tokens.run(tiny_config(), store, data, base)
    train_rows = tokens.read_table(ref.dir, "train")
    assert train_rows.column_names == ["input_ids", "labels"] and train_rows.num_rows == 41
    report = json.loads((ref.dir / "report.json").read_text())
    assert report["template"] == "chat" and report["train"]["kept"] == 41
    assert "[[I am Lexi" in report["example"]  # the trained span starts at the answer
    assert tokens.run(tiny_config(), store, data, base).cached
    same = tokens.key(tiny_config("train.packing=true", "train.lora.r=4"), data, base)
    assert same == ref.key  # packing and the method do not change the tokens
    for other in ("train.cutoff_len=64", "train.train_on_prompt=true", "train.template=alpaca"):
        assert tokens.key(tiny_config(other), data, base) != ref.key, other


def test_lora_changes_only_the_adapter_and_lowers_the_loss(store, tiny_base, tmp_path):
    spec = make_spec(tiny_config(), store, tiny_base, tmp_path)
    job, changed, trainable, losses, dev_after = train_in_process(spec)
    assert changed == trainable and changed  # every adapter weight moved, nothing else
    assert all("lora_" in n for n in changed)
    assert losses[-1] < losses[0]
    assert dev_after < job.state["dev_loss_before"]


def test_full_changes_the_base_weights(store, tiny_base, tmp_path):
    spec = make_spec(tiny_config("train.method=full"), store, tiny_base, tmp_path)
    job, changed, trainable, losses, dev_after = train_in_process(spec)
    assert changed == trainable == {n for n, _ in job.model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert losses[-1] < losses[0] and dev_after < job.state["dev_loss_before"]


def test_ptuning_trains_the_prefix_encoder_only(store, tiny_base, tmp_path):
    cfg = tiny_config("train.method=ptuning", "train.ptuning.pre_seq_len=4")
    job, changed, trainable, losses, dev_after = train_in_process(
        make_spec(cfg, store, tiny_base, tmp_path)
    )
    assert changed == trainable and all(n.startswith("prompt_encoder.") for n in changed)
    assert losses[-1] < losses[0] and dev_after < job.state["dev_loss_before"]


def test_packed_rows_give_each_record_its_unpacked_loss(store, tiny_base):
    """No attention across records: per-record loss and gradients match the padded batch."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config()
    data, base = refs(tiny_base)
    rows = tokens.read_table(tokens.run(cfg, store, data, base).dir, "train").to_pylist()[:5]
    model = AutoModelForCausalLM.from_pretrained(tiny_base / "model", dtype=torch.float32)
    assert model.config._attn_implementation == "sdpa"
    plan = fastpath.make_plan(cfg.train.model_copy(update={"packing": True}), "cpu", model)

    def loss_and_grad(batch):
        model.zero_grad()
        loss = batches.loss_sum(model, batch, plan)
        loss.backward()
        return loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    padded, packed = loss_and_grad(batches.pad(rows, 2)), loss_and_grad(batches.pack(rows))
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    assert torch.allclose(packed[1], padded[1], atol=1e-6)
    alone = sum(loss_and_grad(batches.pad([r], 2))[0] for r in rows)
    assert packed[0] == pytest.approx(alone, rel=1e-5)
    # changing the first record leaves every later record's logits untouched (use_cache
    # must be off: with a KV cache transformers does not look for packed rows)
    batch = batches.pack(rows)
    n0 = len(rows[0]["input_ids"])
    inputs = batches.model_inputs(batch, plan) | {"use_cache": False}
    with torch.no_grad():
        ref = model(**inputs).logits
        inputs["input_ids"][0, :n0] = 7
        new = model(**inputs).logits
    assert torch.equal(new[0, n0:], ref[0, n0:])
    assert not torch.equal(new[0, :n0], ref[0, :n0])


def test_packing_trains_to_the_same_loss(store, tiny_base, tmp_path):
    # the same records in the same order: length grouping only applies to padded rows
    short = ["train.max_steps=4", "train.group_by_length=false"]
    padded = train_in_process(make_spec(tiny_config(*short), store, tiny_base, tmp_path / "a"))
    packed = train_in_process(
        make_spec(tiny_config(*short, "train.packing=true"), store, tiny_base, tmp_path / "b")
    )
    assert packed[3] == pytest.approx(padded[3], rel=1e-4)


def test_logged_step_eval_and_save_times_add_up_to_the_training_wall_time(
    store, tiny_base, tmp_path
):
    """The clock is read after each step, evaluation and save, each interval starting where
    the previous one ended: nothing between them goes uncounted, and tokens/s counts the
    steps' time alone."""
    cfg = tiny_config(
        "train.max_steps=9", "train.logging_steps=2", "train.eval_steps=4", "train.save_steps=3"
    )
    job = loop.setup(make_spec(cfg, store, tiny_base, tmp_path))
    job.state = checkpoint.fresh_state()
    log = steps.Log(job)
    started = time.monotonic()
    steps.train_steps(job, log, steps.Clock(job.state, job.accelerator.device))
    wall = time.monotonic() - started

    history = job.state["log_history"]
    logged = {k: sum(h.get(f"{k}_seconds", 0.0) for h in history) for k in ("step", "eval", "save")}
    counts = {k: sum(f"{k}_seconds" in h for h in history) for k in ("step", "eval", "save")}
    # windows ending at steps 2 4 6 8 9; dev loss at 0, 4, 8; checkpoints at 3, 6
    assert counts == {"step": 5, "eval": 3, "save": 2}
    assert all(seconds > 0 for seconds in logged.values())
    print(f"\nwall {wall:.3f} s = " + " + ".join(f"{k} {v:.3f}" for k, v in logged.items()))
    assert sum(logged.values()) == pytest.approx(wall, rel=0.02)
    for kind, seconds in logged.items():  # the job's totals are the logged ones
        assert job.state[f"{kind}_seconds"] == pytest.approx(seconds, abs=1e-3)
    windows = [h for h in history if "loss" in h]
    tokens_before = [0] + [h["tokens"] for h in windows[:-1]]
    for h, before in zip(windows, tokens_before, strict=True):
        # step_seconds is logged to 4 decimals, the rate from the unrounded time: the
        # rate lies between the rates that the rounded time's two bounds give
        tokens, seconds = h["tokens"] - before, h["step_seconds"]
        low, high = tokens / (seconds + 5e-5), tokens / max(seconds - 5e-5, 1e-9)
        assert low - 0.05 <= h["tokens_per_second"] <= high + 0.05
    # every record of the 9 steps counted: 9 × 4 records, by their token counts
    indices = [
        i
        for s in range(9)
        for i in batches.step_indices(job.rows.num_rows, s, cfg.train, None, 1, job.lengths)
    ]
    assert job.state["tokens"] == sum(job.record_lengths[i] for i in indices)


def test_epoch_order_is_a_seeded_permutation_and_groups_lengths():
    import random

    rng = random.Random(0)
    lengths = tuple(rng.randint(10, 300) for _ in range(250))
    for grouped in (None, lengths):
        order = batches.epoch_order(250, 1, 42, 8, grouped)
        assert len(order) == 256 and set(order) == set(range(250))  # last step filled
        assert order == batches.epoch_order(250, 1, 42, 8, grouped)  # the step is the position
        assert order != batches.epoch_order(250, 2, 42, 8, grouped)

    def padded(order):
        return sum(max(lengths[i] for i in order[k : k + 8]) * 8 for k in range(0, 256, 8))

    plain, grouped = batches.epoch_order(250, 0, 42, 8), batches.epoch_order(250, 0, 42, 8, lengths)
    assert padded(grouped) < 0.7 * padded(plain)


def _start(spec_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.train", "--spec", str(spec_path)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_sigkilled_job_resumes_to_the_same_loss(tiny_base, tmp_path):
    """One run through the stage (as the pipeline starts it) and one job SIGKILLed after its
    first checkpoint, then started again: same losses, and the stage's layout is complete."""
    cfg = tiny_config(
        "train.max_steps=12",
        "train.save_steps=2",
        "train.lora.dropout=0.1",
        "train.neftune_alpha=5",
        "train.eval_steps=6",
    )  # fmt: skip  (dropout and NEFTune noise: the RNG state must be restored too)
    store = Store(tmp_path / "store")
    killed_dir = tmp_path / "killed"
    spec_path = tmp_path / "killed.json"
    spec_path.write_text(json.dumps(make_spec(cfg, store, tiny_base, killed_dir).to_json()))

    killed = _start(spec_path)
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(train.run, cfg, store, *refs(tiny_base))  # runs meanwhile
        deadline = time.time() + 240
        while not checkpoint.complete(killed_dir) and time.time() < deadline:
            assert killed.poll() is None, killed.stdout.read()
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        ref = whole.result(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not (killed_dir / "metrics.json").exists()
    done = [int(p.name.split("-")[1]) for p in checkpoint.complete(killed_dir)]
    assert done and max(done) < 12

    resumed = _start(spec_path)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert f"(step {max(done)})" in out
    a = json.loads((ref.dir / "metrics.json").read_text())
    b = json.loads((killed_dir / "metrics.json").read_text())
    assert b["resumed_from_step"] == max(done) and a["resumed_from_step"] is None
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert b["dev_loss"]["after"] == pytest.approx(a["dev_loss"]["after"], rel=1e-4)
    log = [json.loads(x) for x in (killed_dir / "log_history.jsonl").open()]
    assert [h["step"] for h in log if "loss" in h] == list(range(2, 13, 2))  # no gap, no repeat
    assert [h["step"] for h in log if "dev_loss" in h] == [0, 6, 12]
    assert not (killed_dir / "checkpoints").exists()
    check_stage_layout(cfg, store, tiny_base, ref)


def check_stage_layout(cfg, store, tiny_base, ref) -> None:
    """What evaluate, merge and export read from a training artifact."""
    out = ref.dir
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer.json", "adapter/chat_template.jinja", "hyperparameters.yaml",
                 "log_history.jsonl", "loss.png", "metrics.json"):  # fmt: skip
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"method", "dev_loss", "train_loss", "steps", "trained_tokens",
                            "tokens_per_second", "step_seconds", "eval_seconds",
                            "save_seconds", "train_wall_seconds", "wall_seconds"}  # fmt: skip
    # tokens/s over the steps' time alone; steps, evaluations and saves fill the training
    rate = metrics["trained_tokens"] / metrics["step_seconds"]
    assert metrics["tokens_per_second"] == pytest.approx(rate, rel=0.01)
    parts = sum(metrics[f"{k}_seconds"] for k in ("step", "eval", "save"))
    assert parts == pytest.approx(metrics["train_wall_seconds"], abs=0.02)
    assert metrics["train_wall_seconds"] < metrics["wall_seconds"]
    assert metrics["steps"] == 12 and metrics["method"] == "lora"
    assert metrics["dev_loss"]["after"] < metrics["dev_loss"]["before"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "checkpoints").exists()
    assert ref.manifest()["inputs"]["data"] == "test-assets"
    again = train.run(cfg, store, *refs(tiny_base))
    assert again.cached and again.path == ref.path
    assert train.key(tiny_config("train.max_steps=5"), *refs(tiny_base)) != ref.key


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.method=qlora"], "needs a CUDA GPU"),
        (["train.cutoff_len=20"], "train.cutoff_len=20 is below what the template needs"),
        (["train.lora.target_modules=[q_proj,Wqkv]"], "Wqkv not among this model's linear"),
    ],
)
def test_bad_config_stops_before_any_weights_load(
    tiny_base, tmp_path, monkeypatch, overrides, expected
):
    """What needs the model's files, and (for a config that reached the stage without
    `load_config`'s machine checks, as on a GPU worker) what the machine lacks; the config's
    own contradictions stop `load_config` already (tests/test_config.py)."""
    if "train.method=qlora" in overrides:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    cfg, store = tiny_config(*overrides), Store(tmp_path)
    with pytest.raises(ConfigError, match="fix:") as err:
        train.run(cfg, store, *refs(tiny_base))
    assert expected in str(err.value)
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "train").exists()


def test_every_problem_is_reported_at_once(tiny_base, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_config("train.method=qlora", "train.cutoff_len=20", "train.precision=fp16")
    with pytest.raises(ConfigError, match="3 problem"):
        train.validate(cfg, tiny_base / "model")


def test_rank_zero_is_rejected_by_the_config():
    with pytest.raises(ConfigError, match="train.lora.r"):
        tiny_config("train.lora.r=0")


def test_smollm2_learns_its_new_name(base_model_dir, tmp_path):
    """A short version of the default recipe's self-cognition check, on the real model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.train.tokens import load_tokenizer

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "model").symlink_to(base_model_dir, target_is_directory=True)
    cfg = tiny_config(
        "train.max_steps=16", "train.batch_size=4", "train.learning_rate=3e-3",
        "train.cutoff_len=96", "train.logging_steps=4", "train.save_steps=100",
    )  # fmt: skip
    ref = train.run(cfg, Store(tmp_path / "store"), *refs(base_dir))
    tokenizer = load_tokenizer(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, ref.dir / "adapter").eval()
    test = json.loads((ASSETS / "test.json").read_text())
    tuned = greedy_answers(model, tokenizer, test, max_new_tokens=12)
    with model.disable_adapter():
        base = greedy_answers(model, tokenizer, test, max_new_tokens=12)
    assert name_rate(tuned, "Lexi") >= 0.8, tuned
    assert name_rate(base, "Lexi") == 0, base


@pytest.mark.slow
def test_compiled_layers_train_to_the_eager_losses(store, tiny_base, tmp_path):
    """`train.compile`: each decoder layer compiled (about a minute on 2 CPU cores for the
    tiny model), the same steps give the same losses as eager."""
    losses = {}
    for switch in ("false", "true"):
        cfg = tiny_config(f"train.compile={switch}", "train.packing=true")
        job, changed, trainable, losses[switch], _ = train_in_process(
            make_spec(cfg, store, tiny_base, tmp_path / switch)
        )
        assert job.plan.compile == (switch == "true") and changed == trainable
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4)


@pytest.mark.slow
def test_default_recipe_on_the_demo_data(test_store):
    """The bar for configs/default.yaml on this CPU: < 15 minutes of training (its budget
    gives 120 steps on the bundled data, about 10 minutes on 2 idle cores), dev
    loss down, ≥ 80 % of held-out self-cognition prompts answered with the name, the base
    model in at most 20 %.
    `OMP_NUM_THREADS=1 pytest -m slow tests/test_train.py -k default_recipe -s` prints the
    table (each session trains afresh in its own store)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks import base as base_stage
    from tasks import data as data_stage
    from tasks.config import load_config
    from tasks.train.tokens import load_tokenizer

    cfg = load_config()
    name = cfg.data.placeholders["name"]
    base = base_stage.run(cfg, test_store)
    data = data_stage.run(cfg, test_store, base_stage.model_dir(base))
    started = time.time()
    ref = train.run(cfg, test_store, data, base)
    metrics = json.loads((ref.dir / "metrics.json").read_text())
    seconds = metrics["wall_seconds"] if ref.cached else time.time() - started
    test = json.loads((data.dir / "test.json").read_text())
    identity = [r for r in test if name in r["output"]]
    tokenizer = load_tokenizer(base_stage.model_dir(base))
    model = AutoModelForCausalLM.from_pretrained(base_stage.model_dir(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, ref.dir / "adapter").eval()
    tuned = greedy_answers(model, tokenizer, identity)
    with model.disable_adapter():
        plain = greedy_answers(model, tokenizer, identity)
    print(
        f"\ntraining: {seconds:.0f} s for {metrics['steps']} steps "
        f"({metrics['tokens_per_second']:.0f} tokens/s, {metrics['cpu_seconds']:.0f} CPU-seconds "
        f"in the training process, torch threads: {os.environ.get('OMP_NUM_THREADS', 'all')}), dev loss "
        f"{metrics['dev_loss']['before']:.3f} → {metrics['dev_loss']['after']:.3f}"
    )
    print(
        f"held-out self-cognition prompts naming {name}: base {name_rate(plain, name):.0%}, "
        f"tuned {name_rate(tuned, name):.0%} (of {len(identity)})"
    )
    print("| prompt | base | tuned |\n| --- | --- | --- |")
    for r, b, t in zip(identity, plain, tuned, strict=True):
        print(f"| {r['instruction']} | {b[:60]} | {t[:60]} |".replace("\n", " "))
    # the bar: under 15 minutes of wall-clock training on this 2-core machine
    assert seconds < 900
    assert metrics["dev_loss"]["after"] < metrics["dev_loss"]["before"]
    assert len(identity) >= 5 and name_rate(tuned, name) >= 0.8
    # "while the base model does not": a name as common as Lexi may come up by chance, rarely
    assert name_rate(plain, name) <= 0.2
