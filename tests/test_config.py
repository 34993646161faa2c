from pathlib import Path

import pytest

from tasks.config import (
    CONFIG_DIR,
    ConfigError,
    load_config,
    parse_overrides,
    train_problems,
)

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.name == "default.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path: Path):
    cfg = load_config(path)
    assert train_problems(cfg.train) == []  # what `llmft run` checks before anything loads


def test_overrides_nest_and_parse_yaml_values():
    assert parse_overrides(["train.lora.r=16", "data.placeholders.name=Lexi"]) == {
        "train": {"lora": {"r": 16}},
        "data": {"placeholders": {"name": "Lexi"}},
    }
    cfg = load_config(None, ["data.placeholders.name=Ada", "train.lora.r=4"])
    assert cfg.data.placeholders["name"] == "Ada"
    assert "author" in cfg.data.placeholders  # a mapping override merges, not replaces
    assert cfg.train.lora.r == 4


def test_validation_collects_every_problem_with_key_value_and_fix():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.method=lorra", "train.lora.r=0", "data.bogus=1"])
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "train.method" in msg and "'lorra'" in msg
    assert "train.lora.r" in msg and "got 0" in msg
    assert "data.bogus" in msg and "unknown key" in msg
    assert msg.count("fix:") == 3


def test_a_check_across_a_fields_values_names_that_key_and_its_fix():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.split=[0.5,0.1,0.1]", "export.quantize=[q8_0,q9]"])
    msg = str(err.value)
    assert (
        "  - data.split: got [0.5, 0.1, 0.1]: the ratios must be non-negative and sum to 1 " in msg
    )
    assert msg.count("fix:") == 2 and "fix: --set data.split=[0.8,0.1,0.1]" in msg
    assert "  - export.quantize: got ['q8_0', 'q9']: unknown quantisation type(s) ['q9']" in msg
    assert "fix: --set export.quantize=[q8_0,q4_k_m]" in msg
    assert "--set data=" not in msg and "--set export=" not in msg and "{…}" not in msg


def test_a_section_given_a_value_says_to_set_its_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data=5"])
    assert "data: got 5: " in str(err.value)
    assert "fix: --set data.<key>=<value>" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["train.num_processes=2"],
            "train.num_processes: got 2: launcher='python' starts one process; "
            "fix: --set train.launcher=accelerate or torchrun",
        ),
        (
            ["train.accelerate_config=ddp"],
            "train.accelerate_config: got 'ddp': only launcher='accelerate' reads it "
            "(train.launcher is 'python'); fix: --set train.launcher=accelerate",
        ),
        (
            ["train.launcher=accelerate", "train.accelerate_config=zero9"],
            "deploy/accelerate/zero9.yaml not found; fix: --set train.accelerate_config=<one of [",
        ),
        (
            ["train.method=qlora", "train.launcher=accelerate", "train.accelerate_config=zero3"],
            "train.accelerate_config: got 'zero3': ZeRO-3 partitions the weights",
        ),
        (
            ["train.method=ptuning", "train.packing=true"],
            "train.packing: got True: with train.method='ptuning' every token of a row attends "
            "the prefix",
        ),
    ],
    ids=["processes", "launcher", "missing-file", "qlora-zero3", "ptuning-packing"],
)
def test_train_settings_that_contradict_each_other_stop_the_load(overrides, line):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, for_training=True)  # on any machine
    assert line in str(err.value) and "fix: " in str(err.value)


def test_other_verbs_skip_the_train_checks():
    """`llmft plan` picks its ZeRO row from accelerate_config, whatever the launcher."""
    cfg = load_config(None, ["train.method=full", "train.accelerate_config=zero3_offload"])
    assert cfg.train.accelerate_config == "zero3_offload"


@pytest.fixture
def no_cuda_no_server(monkeypatch):
    """This machine as the tests see it: no CUDA, no Prefect server configured."""
    import torch

    from tasks import machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "prefect_api_url", lambda: None)
    return machine


def test_what_this_machine_lacks_joins_the_other_problems(no_cuda_no_server):
    overrides = ["train.method=qlora", "train.precision=fp16", "data.split=[1,1,1]"]
    load_config(None, overrides[:2])  # not for training (plan, serve, chat): fine
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, for_training=True)
    msg = str(err.value)
    assert "3 problem(s) in the configuration" in msg
    for key in ("data.split: got [1, 1, 1]", "train.method: got 'qlora'", "train.precision"):
        assert f"  - {key}" in msg
    assert "it needs a CUDA GPU" in msg and "fix: --set train.method=lora" in msg


def test_the_machine_is_checked_where_training_runs(no_cuda_no_server, monkeypatch):
    qlora = ["train.method=qlora"]
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_config(None, [*qlora, "pipeline.train_on=local"], for_training=True)
    # the gpu pool trains it: its worker's train stage checks its own machine
    load_config(None, [*qlora, "pipeline.train_on=gpu-pool"], for_training=True)
    # auto with a server configured: the gpu pool may take it, known only when training starts
    monkeypatch.setattr(no_cuda_no_server, "prefect_api_url", lambda: "http://gpu-host/api")
    load_config(None, qlora, for_training=True)


def _no_model_loads(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("verb", ["config", "run"])
def test_cli_stops_qlora_on_a_machine_without_cuda(
    verb, no_cuda_no_server, tmp_path, monkeypatch, capsys
):
    import time

    from flows import pipeline
    from flows.cli import main

    _no_model_loads(monkeypatch)
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: pytest.fail("the run started"))
    store = tmp_path / "store"
    started = time.perf_counter()
    assert main([verb, "--set", "train.method=qlora", "--set", f"pipeline.store={store}"]) == 2
    assert time.perf_counter() - started < 30  # no base model loaded, no data stage run
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "1 problem(s) in the configuration" in err
    assert "train.method: got 'qlora': it needs a CUDA GPU" in err
    assert "fix: --set train.method=lora" in err
    assert not store.exists()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_exits_2_on_bad_config(capsys):
    from flows.cli import main

    assert main(["config", "--set", "train.lora.r=0"]) == 2
    assert "train.lora.r" in capsys.readouterr().err
