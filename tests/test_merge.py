import json

import pytest
import torch
from serving_fixtures import make_data, make_lora

from tasks import base as base_stage
from tasks import merge
from tasks.config import load_config
from tasks.store import Ref


@pytest.fixture(scope="module")
def lora(test_store, base_model_dir):
    cfg = load_config()
    base = base_stage.run(cfg, test_store)
    train = make_lora(test_store, base, make_data(test_store))
    return cfg, base, train


def test_merged_model_gives_the_logits_of_base_plus_adapter(lora, test_store):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, base, train = lora
    ref = merge.run(cfg, test_store, base, train)
    out = merge.model_dir(ref)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["Who are you? 你是谁？"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # no peft
        plain = AutoModelForCausalLM.from_pretrained(base.dir / "model", dtype=torch.float32)
        unmerged = PeftModel.from_pretrained(plain, train.dir / "adapter")
        expected = unmerged(ids).logits
        got = merged(ids).logits
        with unmerged.disable_adapter():
            before = unmerged(ids).logits
    assert (expected - before).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_merged_folder_is_complete_and_self_describing(lora, test_store):
    cfg, base, train = lora
    out = merge.model_dir(merge.run(cfg, test_store, base, train))
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()
    assert (out / "generation_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    template = (out / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template
    assert (out.parent / "hyperparameters.yaml").is_file()


def test_second_merge_is_a_store_hit(lora, test_store):
    cfg, base, train = lora
    first = merge.run(cfg, test_store, base, train)
    mtime = (first.dir / "manifest.json").stat().st_mtime_ns
    again = merge.run(cfg, test_store, base, train)
    assert again.cached and again.path == first.path
    assert (again.dir / "manifest.json").stat().st_mtime_ns == mtime


def test_ptuning_has_nothing_to_merge_and_full_is_already_merged(lora, test_store, tmp_path):
    cfg, base, _ = lora
    ptuning = tmp_path / "ptuning"
    (ptuning / "adapter").mkdir(parents=True)
    (ptuning / "hyperparameters.yaml").write_text("method: ptuning\n")
    assert merge.run(cfg, test_store, base, Ref("train", "p", str(ptuning))) is None

    full = tmp_path / "full"
    (full / "model").mkdir(parents=True)
    (full / "hyperparameters.yaml").write_text("method: full\n")
    train = Ref("train", "f", str(full))
    assert merge.run(cfg, test_store, base, train) == train
