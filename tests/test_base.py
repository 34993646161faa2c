"""The base model stage's checks of a local folder: each error names what is missing and
the fix, pickle weights are refused, and the config's trust_remote_code reaches every
loader of the training stage (off unless turned on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import base
from tasks.base import ModelError, check_model_dir
from tasks.config import load_config
from tasks.store import Store


def model_folder(root: Path, *files: str) -> Path:
    """A folder with these files (contents do not matter to the check, only names)."""
    folder = root / "model"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("{}")
    return folder


COMPLETE = ("config.json", "model.safetensors", "tokenizer.json")


def test_a_complete_folder_passes(tmp_path):
    check_model_dir(model_folder(tmp_path, *COMPLETE))


def test_a_missing_folder_is_named_with_the_fix(tmp_path):
    with pytest.raises(ModelError) as err:
        check_model_dir(tmp_path / "nope")
    assert f"base.model='{tmp_path / 'nope'}': folder not found" in str(err.value)
    assert "fix: --set base.model=" in str(err.value)


def test_a_missing_path_is_not_taken_for_a_hub_id(tmp_path):
    cfg = load_config(None, [f"base.model={tmp_path / 'nope'}"])
    with pytest.raises(ModelError, match="folder not found"):
        base.key(cfg)


@pytest.mark.parametrize(
    ("files", "missing", "fix"),
    [
        (("model.safetensors", "tokenizer.json"), "missing config.json", "save_pretrained(folder)"),
        (("config.json", "tokenizer.json"), "missing model.safetensors", "save_pretrained(folder)"),
        (
            ("config.json", "model.safetensors"),
            "missing tokenizer.json or tokenizer.model",
            "AutoTokenizer.from_pretrained(<the model's source>).save_pretrained(folder)",
        ),
    ],
    ids=["config", "weights", "tokenizer"],
)
def test_each_missing_file_is_named_with_the_fix(tmp_path, files, missing, fix):
    folder = model_folder(tmp_path, *files)
    with pytest.raises(ModelError) as err:
        check_model_dir(folder)
    msg = str(err.value)
    assert msg.startswith(f"base.model='{folder}': {missing} (fix: ")
    assert fix in msg.split("(fix: ", 1)[1]


def test_pickle_weights_are_refused(tmp_path):
    folder = model_folder(tmp_path, "config.json", "pytorch_model.bin", "tokenizer.json")
    cfg = load_config(None, [f"base.model={folder}"])
    with pytest.raises(ModelError) as err:
        base.run(cfg, Store(tmp_path / "store"))  # refused before anything is stored
    msg = str(err.value)
    assert "missing model.safetensors (only pickle weights: pytorch_model.bin" in msg
    assert "unpickling a file can run code" in msg
    assert "fix: convert them once" in msg and "safe_serialization=True" in msg
    assert not (tmp_path / "store" / "base").exists()


def test_broken_config_json_is_named(tmp_path):
    folder = model_folder(tmp_path, *COMPLETE)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config.json: not valid JSON .*fix: "):
        check_model_dir(folder)


# --- trust_remote_code: from base.trust_remote_code to the training stage's loaders ---------


@pytest.fixture
def loaders(monkeypatch):
    """Each from_pretrained call of the training stage, its trust_remote_code recorded."""
    import transformers

    seen: list[tuple[str, object]] = []

    def fake(kind):
        def from_pretrained(path, *args, **kwargs):
            seen.append((kind, kwargs.get("trust_remote_code", "not given")))
            raise _Stop

        return from_pretrained

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer"))
    return seen


class _Stop(Exception):
    """Raised by the fake loaders: the test only needs the arguments."""


@pytest.mark.parametrize("trust", [False, True])
def test_the_training_loaders_get_the_configs_trust_remote_code(tmp_path, loaders, trust):
    from tasks.config import TrainConfig
    from tasks.train import methods
    from tasks.train.tokens import load_tokenizer

    folder = model_folder(tmp_path, *COMPLETE)
    overrides = [f"base.model={folder}"] + (["base.trust_remote_code=true"] if trust else [])
    ref = base.run(load_config(None, overrides), Store(tmp_path / "store"))
    model_dir = base.model_dir(ref)
    for method in ("lora", "qlora", "full"):
        with pytest.raises(_Stop):
            methods.load(TrainConfig(method=method), model_dir, compute_dtype=None, device="cpu")
    with pytest.raises(_Stop):
        load_tokenizer(model_dir)
    assert loaders == [("model", trust)] * 3 + [("tokenizer", trust)]


def test_a_folder_the_base_stage_did_not_make_runs_no_model_code(tmp_path):
    folder = model_folder(tmp_path, *COMPLETE)
    assert base.trusts_remote_code(folder) is False
    (tmp_path / "manifest.json").write_text(json.dumps({"trust_remote_code": "yes"}))
    assert base.trusts_remote_code(folder) is False  # only a recorded true turns it on


@pytest.mark.parametrize("trust", [False, True])
def test_merge_loads_the_base_with_the_configs_trust_remote_code(tmp_path, monkeypatch, trust):
    import transformers

    from tasks import merge

    seen = []

    def from_pretrained(path, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "not given"))
        raise _Stop

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    folder = model_folder(tmp_path, *COMPLETE)
    overrides = [f"base.model={folder}"] + (["base.trust_remote_code=true"] if trust else [])
    ref = base.run(load_config(None, overrides), Store(tmp_path / "store"))
    with pytest.raises(_Stop):
        merge.merge_adapter(base.model_dir(ref), tmp_path / "adapter", tmp_path / "out")
    assert seen == [trust]
