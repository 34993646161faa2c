from pathlib import Path

import pytest

from tasks.config import CONFIG_DIR, Config, ConfigError, load_config, parse_overrides

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.name == "default.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


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


def test_bad_split_names_the_fix():
    with pytest.raises(ConfigError, match="data.split"):
        load_config(None, ["data.split=[0.5,0.1,0.1]"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_exits_2_on_bad_config(capsys):
    from flows.cli import main

    assert main(["config", "--set", "train.lora.r=0"]) == 2
    assert "train.lora.r" in capsys.readouterr().err
