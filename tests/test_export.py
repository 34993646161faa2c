import json
import time

import pytest
from serving_fixtures import make_export

from tasks import export
from tasks.config import load_config
from tasks.store import Ref


@pytest.fixture(scope="module")
def exported(test_store, base_model_dir):
    return make_export(test_store)


def _row(type_, size, ratio, loads=True, agreement=99.0):
    return {
        "type": type_,
        "file": f"model-{type_}.gguf",
        "bytes": size,
        "loads": loads,
        "ppl": 10 * ratio,
        "ppl_ratio": ratio,
        "agreement_pct": agreement,
        "error": "bad magic",
    }


# --- the choice of the served file and the failure rules (pure functions) ------------------


def test_serves_the_smallest_type_within_tolerance():
    rows = [_row("f16", 300, 1.0), _row("q8_0", 160, 1.01), _row("q4_k_m", 100, 1.04)]
    assert export.choose_served(rows, 0.05)[0] == "model-q4_k_m.gguf"
    assert export.choose_served(rows, 0.02)[0] == "model-q8_0.gguf"


def test_falls_back_to_f16_and_says_why():
    rows = [_row("f16", 300, 1.08), _row("q8_0", 160, 1.09), _row("q4_k_m", 100, 1.3)]
    served, reason, rejected = export.choose_served(rows, 0.05)
    assert served == "model-f16.gguf" and set(rejected) == {"model-q8_0.gguf", "model-q4_k_m.gguf"}
    assert "no GGUF within 5%" in reason and "q4_k_m 1.3000" in reason


def test_agreement_floor_is_a_gate_and_every_other_file_says_why_it_was_not_served():
    rows = [
        _row("f16", 300, 1.0, agreement=100.0),
        _row("q8_0", 160, 1.01, agreement=97.0),
        _row("q4_k_m", 100, 1.02, agreement=80.0),
    ]
    served, reason, rejected = export.choose_served(rows, 0.05, 90.0)
    assert served == "model-q8_0.gguf" and "at or above 90% greedy agreement" in reason
    assert rejected == {
        "model-q4_k_m.gguf": "greedy agreement 80.00% below the 90% floor",
        "model-f16.gguf": "larger than model-q8_0.gguf (300 > 160 bytes)",
    }
    # without the floor the smaller one wins: the floor, not the tolerance, rejected it
    assert export.choose_served(rows, 0.05, 0.0)[0] == "model-q4_k_m.gguf"
    # the unquantized conversion under the floor is a broken conversion: the stage fails
    with pytest.raises(export.ExportError, match=r"model-f16.gguf: greedy agreement .* 85.00%"):
        export.check_rows([_row("f16", 300, 1.0, agreement=85.0)], 2.0, 90.0)
    export.check_rows([_row("f16", 300, 1.0, agreement=95.0), rows[2]], 2.0, 90.0)


def test_adapter_row_is_never_the_served_file():
    rows = [_row("f16", 300, 1.0), {**_row("adapter", 10, 1.0), "file": "base + adapter"}]
    assert export.choose_served(rows, 0.05)[0] == "model-f16.gguf"


def test_unloadable_or_far_out_gguf_fails_with_the_numbers():
    with pytest.raises(export.ExportError, match="model-q4_k_m.gguf: bad magic"):
        export.check_rows([_row("f16", 300, 1.0), _row("q4_k_m", 100, 1.0, loads=False)], 2.0)
    with pytest.raises(export.ExportError, match=r"perplexity 25.0 is 2.50× HF's \(limit 2.0×\)"):
        export.check_rows([_row("f16", 300, 1.0), _row("q4_k_m", 100, 2.5)], 2.0)
    export.check_rows([_row("f16", 300, 1.0), _row("q4_k_m", 100, 1.9)], 2.0)


def test_fault_switch_fails_the_stage_clearly(test_store):
    cfg = load_config(overrides=["export.fail_stage=true"])
    fake = Ref("x", "k", "/nonexistent")
    with pytest.raises(export.ExportError, match="export.fail_stage is set"):
        export.run(cfg, test_store, fake, fake, fake)
    # The switch is not part of the key: a retry with it off finds the same artifact.
    off = load_config()
    assert export.key(cfg, fake, fake, fake) == export.key(off, fake, fake, fake)


def test_ptuning_returns_none_and_says_why(test_store, caplog):
    cfg = load_config(overrides=["train.method=ptuning"])
    fake = Ref("x", "k", "/nonexistent")
    with caplog.at_level("WARNING"):
        assert export.run(cfg, test_store, None, fake, fake) is None
    assert "llama.cpp has no prefix tuning" in caplog.text


def test_fetch_converter_is_quick_when_present():
    first = export.fetch_converter()
    started = time.perf_counter()
    assert export.fetch_converter() == first
    assert time.perf_counter() - started < 1.0
    assert (first / "convert_hf_to_gguf.py").is_file() and (first / "gguf-py" / "gguf").is_dir()


# --- the real export of the LoRA fixture --------------------------------------------------


def test_export_writes_loadable_ggufs_and_a_measured_verification_table(exported):
    from llama_cpp import Llama

    ref, *_ = exported
    result = json.loads((ref.dir / "result.json").read_text())
    verification = json.loads((ref.dir / "verification.json").read_text())
    rows = {r["type"]: r for r in verification["rows"]}
    assert set(rows) == {"f16", "q8_0", "q4_k_m", "adapter"}
    assert rows["f16"]["bytes"] > rows["q8_0"]["bytes"] > rows["q4_k_m"]["bytes"]
    hf_ppl = verification["hf"]["ppl"]
    for r in rows.values():
        assert r["loads"] and r["ppl"] > 1.0 and 0 < r["agreement_pct"] <= 100
        assert r["gen_tps"] > 0 and r["prompt_tps"] > 0
        assert r["ppl_ratio"] == pytest.approx(r["ppl"] / hf_ppl, rel=1e-3)
    # f16 is HF up to rounding; 4-bit weights measurably move the numbers.
    assert rows["f16"]["ppl_ratio"] == pytest.approx(1.0, abs=0.01)
    assert rows["f16"]["agreement_pct"] >= 95
    assert rows["q4_k_m"]["ppl"] != rows["f16"]["ppl"]
    # base GGUF + LoRA GGUF adapter reproduces the merged model
    assert rows["adapter"]["ppl_ratio"] == pytest.approx(1.0, abs=0.01)
    assert result["served"] == export.choose_served(verification["rows"], 0.05, 90.0)[0]
    assert result["served"] in (ref.dir / "verification.md").read_text()
    for r in rows.values():  # each GGUF is the served one or says why it is not
        assert r["served"] == (r["file"] == result["served"]) and (r["served"] or r["rejected"])
    # SmolLM2's GGUF renders and tokenizes its chats as training did, and stops on <|im_end|>
    for report in verification["fidelity"].values():
        assert report["stop_tokens"][0] == "<|im_end|>" and report["bos_in_prompt"] == 1
    modelfile = (ref.dir / "Modelfile").read_text()
    assert f"FROM ./{result['served']}\n" in modelfile
    assert '{{ "<|im_start|>user\\n" }}{{ .Content }}' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    for name in [*result["files"].values(), result["lora_base"]]:
        llm = Llama(model_path=str(ref.dir / name), n_ctx=64, verbose=False)
        assert llm.n_vocab() == 49152
    assert export.served_gguf(ref).is_file()


def test_a_gguf_llama_cpp_cannot_load_is_reported(exported, tmp_path):
    ref, *_ = exported
    broken = tmp_path / "model-broken.gguf"
    broken.write_bytes((ref.dir / "model-q4_k_m.gguf").read_bytes()[: 1 << 20])  # truncated
    row = export.verify_gguf(broken, [([1, 2, 3], 1)], {"ppl": 1.0, "argmax": [[0, 0]]}, 4)
    assert row["loads"] is False and "cannot load" in row["error"]
    with pytest.raises(export.ExportError, match="model-broken.gguf"):
        export.check_rows([row | {"type": "q4_k_m"}], 2.0)


def test_second_export_is_a_store_hit(exported, test_store):
    ref, merged, train, data = exported
    cfg = load_config(overrides=["export.speed_tokens=8"])
    again = export.run(cfg, test_store, merged, train, data)
    assert again.cached and again.path == ref.path


# --- template travel ------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_the_travelling_template_renders_training_prompts(base_model_dir, template):
    """What the GGUF stores (formatting.training_chat_template), rendered by HF's
    apply_chat_template, gives the ids training used: also for the alpaca fallback, whose
    prompts training builds in Python."""
    from transformers import AutoTokenizer

    from tasks.export.fidelity import CONVERSATIONS
    from tasks.formatting import prompt_ids, to_messages, training_chat_template

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    chat_template = training_chat_template(tokenizer, template)
    assert (chat_template == tokenizer.chat_template) == (template == "chat")
    for label, record in CONVERSATIONS.items():
        ids = tokenizer.apply_chat_template(
            to_messages(record),
            add_generation_prompt=True,
            chat_template=chat_template,
            return_dict=True,
        )["input_ids"]
        assert ids == prompt_ids(tokenizer, record, template), label
