"""Launching: two processes on CPU through torchrun (gloo), the launch commands, and the
accelerate/DeepSpeed configs in deploy/ (parsed, and naming what they claim to be)."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from train_fixtures import make_tiny_model, refs, tiny_config

from tasks import train
from tasks.config import REPO_ROOT
from tasks.store import Store

ACCELERATE = sorted((REPO_ROOT / "deploy" / "accelerate").glob("*.yaml"))
DEEPSPEED = sorted((REPO_ROOT / "deploy" / "deepspeed").glob("*.json"))


def test_two_cpu_processes_train_one_adapter(base_model_dir, tmp_path):
    """torchrun --nproc_per_node=2: DDP over gloo, each process half of every step."""
    from safetensors.torch import load_file

    make_tiny_model(base_model_dir, tmp_path / "base")
    cfg = tiny_config(
        "train.launcher=torchrun", "train.num_processes=2", "train.device=cpu",
        "train.batch_size=2", "train.max_steps=4", "train.save_steps=2",
    )  # fmt: skip
    ref = train.run(cfg, Store(tmp_path / "store"), *refs(tmp_path / "base"))
    metrics = json.loads((ref.dir / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 4
    assert metrics["dev_loss"]["after"] < metrics["dev_loss"]["before"]
    adapter = load_file(ref.dir / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    hyper = yaml.safe_load((ref.dir / "hyperparameters.yaml").read_text())
    assert hyper["resolved"]["processes"] == 2 and hyper["method"] == "lora"


def test_the_job_dies_with_the_process_that_started_it(base_model_dir, tmp_path):
    """A SIGKILLed worker (a Prefect process, say) leaves no training job running."""
    import signal
    import subprocess
    import time

    import psutil

    make_tiny_model(base_model_dir, tmp_path / "base")
    store = tmp_path / "store"
    script = (
        f"import sys; sys.path[:0] = [{str(REPO_ROOT)!r}, {str(REPO_ROOT / 'tests')!r}]\n"
        "from pathlib import Path\n"
        "from train_fixtures import refs, tiny_config\n"
        "from tasks import train\n"
        "from tasks.store import Store\n"
        "cfg = tiny_config('train.max_steps=100000', 'train.save_steps=100000')\n"
        f"train.run(cfg, Store({str(store)!r}), *refs(Path({str(tmp_path / 'base')!r})))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 180
    while not list(store.glob("train/.partial-*/log_history.jsonl")) and time.time() < deadline:
        assert parent.poll() is None
        time.sleep(0.2)
    job = psutil.Process(parent.pid).children(recursive=True)
    assert any("tasks.train" in " ".join(p.cmdline()) for p in job)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs(job, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def test_launch_commands(tmp_path):
    spec = tmp_path / "spec.json"
    plain = train.launch_command(tiny_config(), spec)
    assert plain == [sys.executable, "-m", "tasks.train", "--spec", str(spec)]
    torchrun = train.launch_command(
        tiny_config("train.launcher=torchrun", "train.num_processes=4"), spec
    )
    assert torchrun[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert torchrun[-4:] == ["-m", "tasks.train", "--spec", str(spec)]
    acc = train.launch_command(
        tiny_config(
            "train.launcher=accelerate", "train.accelerate_config=zero2_offload",
            "train.num_processes=2",
        ),
        spec,
    )  # fmt: skip
    assert acc[1:3] == ["-m", "accelerate.commands.launch"]
    assert acc[acc.index("--config_file") + 1].endswith("deploy/accelerate/zero2_offload.yaml")
    assert acc[acc.index("--num_processes") + 1] == "2"


def test_deploy_has_ddp_and_the_zero_configs():
    names = {p.stem for p in ACCELERATE}
    assert {"ddp", "zero2_offload", "zero3_offload", "zero2", "zero3"} <= names
    assert {p.stem for p in DEEPSPEED} == names - {"ddp"}


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_parses_and_names_its_setup(path):
    from accelerate.commands.config.config_args import load_config_from_file

    parsed = load_config_from_file(str(path))  # accelerate's own reader: unknown keys fail
    raw = yaml.safe_load(path.read_text())
    if path.stem == "ddp":
        assert raw["distributed_type"] == "MULTI_GPU" == parsed.distributed_type.value
        return
    assert raw["distributed_type"] == "DEEPSPEED"
    ds_file = REPO_ROOT / raw["deepspeed_config"]["deepspeed_config_file"]
    assert ds_file.stem == path.stem and ds_file.is_file()
    assert "mixed_precision" not in raw  # accelerate refuses it beside a DeepSpeed file
    assert raw["deepspeed_config"]["zero3_init_flag"] == path.stem.startswith("zero3")


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_json_matches_its_name(path):
    ds = json.loads(path.read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == int(path.stem[4])
    offload = "_offload" in path.stem
    assert (zero.get("offload_optimizer", {}).get("device") == "cpu") == offload
    assert (zero.get("offload_param", {}).get("device") == "cpu") == (
        offload and zero["stage"] == 3
    )
    # filled by the training job from the train config, never hard-coded here
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert ds[key] == "auto"
    if zero["stage"] == 3:  # the final save gathers the partitioned weights
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if offload:  # AdamW from torch steps on the CPU (no compiled DeepSpeed ops needed)
        assert ds["zero_force_ds_cpu_optimizer"] is False


def test_deepspeed_config_without_deepspeed_is_refused(base_model_dir, tmp_path, monkeypatch):
    import importlib.util

    from tasks.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a)
    )
    make_tiny_model(base_model_dir, tmp_path / "base")
    cfg = tiny_config("train.launcher=accelerate", "train.accelerate_config=zero3_offload")
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        train.validate(cfg, tmp_path / "base" / "model")
