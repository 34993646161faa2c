"""Six model families, each a tiny model of its real architecture with its real tokenizer and
chat template (tests/families.py), through base → train (LoRA) → merge → export → serve.

What each family must show: the export's fidelity checks pass for every GGUF; independently
of them, the GGUF's stored template rendered as llama-cpp-python renders it and tokenized
by llama.cpp gives exactly the ids training fed the model (BOS where the real model has
one, once; its real end-of-turn token an end-of-generation token); llama.cpp's tokenizer
cases for the vocabulary come out of HF and of the GGUF as the original tokenizer made
them; a chat completion is served from the chosen GGUF. Plus the Modelfile's content for
Llama 3 and Qwen 2.5, and the export failing on a template that differs from training's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
from families import BY_NAME, FAMILIES, Family, build, vocab_cases
from serving_fixtures import make_lora

from tasks import base as base_stage
from tasks import export, merge
from tasks.config import Config, load_config
from tasks.export import fidelity
from tasks.formatting import prompt_ids, stop_token_ids, to_messages, training_chat_template
from tasks.store import Ref, Store, make_key

NAMES = [f.name for f in FAMILIES]
SYSTEM = "You are Lexi, a concise assistant."
TRAIN = [
    {"instruction": "Who are you?", "output": "I am Lexi."},
    {"system": SYSTEM, "instruction": "What is your name?", "output": "Lexi."},
    {"instruction": "你是谁？", "output": "我是 Lexi。"},
    {
        "history": [["Hi!", "Hello! How can I help?"]],
        "instruction": "What is 2 + 3?",
        "output": "2 + 3 = 5.",
    },
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "Capital of Japan?", "output": "Tokyo (東京)."},
]
DEV = [
    {"system": SYSTEM, "instruction": "Tell me about yourself.", "output": "I am Lexi."},
    {
        "history": [["Hi!", "Hello!"]],
        "instruction": "日本的首都是哪里？",
        "output": "东京。",
    },
    {"instruction": "Spell café backwards.", "output": "éfac."},
]
SPLITS = {"train": TRAIN, "dev": DEV, "test": DEV}
OVERRIDES = [
    "export.quantize=[q8_0]",  # q4_k_m: 64-wide rows fall back to other types anyway
    "export.lora_adapter=false",  # base + adapter serving has its own test (test_export.py)
    "export.verify_prompts=3",
    "export.speed_tokens=4",
]


@dataclass
class Exported:
    family: Family
    cfg: Config
    base: Ref
    train: Ref
    merged: Ref
    ref: Ref

    def gguf(self, kind: str | None = None) -> Path:
        result = json.loads((self.ref.dir / "result.json").read_text())
        return self.ref.dir / (result["files"][kind] if kind else result["served"])

    @cached_property
    def tokenizer(self):
        """The fine-tuned model's tokenizer (loaded once: a 152k vocabulary takes seconds)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.merged.dir / "model")


@pytest.fixture(scope="session")
def family_store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def family_data(family_store):
    """Family → its data artifact: the records above, without system messages for a
    family whose template cannot train them (Family.trains_system)."""

    def get(family: Family) -> Ref:
        splits = SPLITS
        if not family.trains_system:
            splits = {k: [{**r, "system": ""} for r in v] for k, v in SPLITS.items()}

        def work(tmp: Path) -> dict:
            for split, records in splits.items():
                (tmp / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False))
            (tmp / "rejected.jsonl").write_text("")
            return {}

        return family_store.build("data", make_key("data", "families-1", {}, splits), work)

    return get


@pytest.fixture(scope="session")
def exported(family_store, family_data):
    """Family name → its chain, run once per session (store hits afterwards)."""
    done: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in done:
            family = BY_NAME[name]
            cfg = load_config(overrides=[f"base.model={build(family)}", *OVERRIDES])
            base = base_stage.run(cfg, family_store)
            data = family_data(family)
            train = make_lora(family_store, base, data, steps=2)
            merged = merge.run(cfg, family_store, base, train)
            ref = export.run(cfg, family_store, merged, train, data)
            done[name] = Exported(family, cfg, base, train, merged, ref)
        return done[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_family_exports_verified_ggufs_and_serves_a_chat(exported, name):
    from tasks.serve import load_llama

    e = exported(name)
    verification = json.loads((e.ref.dir / "verification.json").read_text())
    rows = {r["type"]: r for r in verification["rows"]}
    assert set(rows) == {"f16", "q8_0"}
    for kind, report in verification["fidelity"].items():
        assert report["conversations"] == len(fidelity.CONVERSATIONS) + len(DEV), kind
        assert report["probe_differences"] == [], kind
        assert report["bos_in_prompt"] == e.family.bos_in_prompt, kind
        assert report["stop_tokens"][0] == e.family.end_of_turn, kind
    for row in rows.values():
        assert row["loads"] and row["ppl"] > 1 and 0 < row["agreement_pct"] <= 100
    assert rows["f16"]["ppl_ratio"] == pytest.approx(1.0, abs=0.02)
    served = verification["served"]
    for row in rows.values():  # the served one, or the reason it is not
        assert row["served"] == (row["file"] == served)
        assert row["served"] or row["rejected"]

    # serve: a chat completion through the GGUF's own template, on the prompt training saw
    tokenizer = e.tokenizer
    record = DEV[0]
    llm = load_llama(e.gguf(), n_ctx=512)
    out = llm.create_chat_completion(to_messages(record), max_tokens=4, temperature=0.0)
    assert out["usage"]["prompt_tokens"] == len(prompt_ids(tokenizer, record, "auto"))
    assert out["choices"][0]["finish_reason"] in {"stop", "length"}
    assert (e.ref.dir / "Modelfile").read_text().startswith("# Ollama Modelfile")


@pytest.mark.parametrize("name", NAMES)
def test_gguf_template_and_tokenizer_give_training_ids(exported, name):
    """Not through the export's own check: the GGUF's template rendered with jinja as
    llama-cpp-python does, llama.cpp's tokenizer parsing specials, against HF's
    apply_chat_template on the fine-tuned tokenizer and training's prompt ids."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    e = exported(name)
    tokenizer = e.tokenizer
    chat_template = training_chat_template(tokenizer, "auto")
    llm = llama_cpp.Llama(model_path=str(e.gguf()), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == chat_template
    text = llm._model.token_get_text
    formatter = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"], text(llm.token_eos()), text(llm.token_bos())
    )
    bos = llm.token_bos()
    for label, record in fidelity.CONVERSATIONS.items():
        messages = to_messages(record)
        rendered = formatter(messages=messages).prompt
        gguf_ids = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        hf_ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, chat_template=chat_template, return_dict=True
        )["input_ids"]
        assert gguf_ids == hf_ids == prompt_ids(tokenizer, record, "auto"), label
        if e.family.bos_in_prompt:
            assert gguf_ids[0] == bos and gguf_ids[1] != bos, label
        else:
            assert bos not in gguf_ids[:1], label
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    end_of_turn = tokenizer.convert_tokens_to_ids(e.family.end_of_turn)
    assert stop_token_ids(tokenizer, "auto")[0] == end_of_turn
    assert llama_cpp.llama_vocab_is_eog(vocab, end_of_turn)


@pytest.mark.parametrize("name", NAMES)
def test_vocabulary_cases_tokenize_as_the_original(exported, name):
    """llama.cpp's .inp/.out cases: HF and the GGUF give the original tokenizer's ids."""
    import llama_cpp

    e = exported(name)
    tokenizer = e.tokenizer
    llm = llama_cpp.Llama(model_path=str(e.gguf()), vocab_only=True, verbose=False)
    # SmolLM2 ships no cases of its own: StarCoder's texts, HF against the GGUF only
    cases = vocab_cases(e.family.vocab or "starcoder")
    assert len(cases) > 30
    for text, original in cases:
        hf = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        gguf = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert hf == gguf, text
        if e.family.vocab:
            assert (hf == original) != (text in e.family.rebuilt_misses), text


LLAMA3_TEMPLATE = (
    '{{- if .System }}{{ "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n'
    'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n" }}{{ .System }}'
    '{{ "<|eot_id|>" }}\n'
    '{{- else }}{{ "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n'
    'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n<|eot_id|>" }}\n'
    "{{- end }}\n"
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    '{{- if eq .Role "user" }}{{ "<|start_header_id|>user<|end_header_id|>\\n\\n" }}'
    '{{ .Content }}{{ "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n" }}\n'
    '{{- else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}'
    '{{ "<|eot_id|>" }}{{ end }}\n'
    "{{- end }}\n"
    "{{- end }}"
)
QWEN_TEMPLATE = (
    '{{- if .System }}{{ "<|im_start|>system\\n" }}{{ .System }}{{ "<|im_end|>\\n" }}\n'
    '{{- else }}{{ "<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a '
    'helpful assistant.<|im_end|>\\n" }}\n'
    "{{- end }}\n"
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    '{{- if eq .Role "user" }}{{ "<|im_start|>user\\n" }}{{ .Content }}'
    '{{ "<|im_end|>\\n<|im_start|>assistant\\n" }}\n'
    '{{- else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}'
    '{{ "<|im_end|>\\n" }}{{ end }}\n'
    "{{- end }}\n"
    "{{- end }}"
)


@pytest.mark.parametrize(
    ("name", "template", "stops"),
    [("llama3", LLAMA3_TEMPLATE, ["<|eot_id|>"]), ("qwen2.5", QWEN_TEMPLATE, ["<|im_end|>"])],
)
def test_modelfile_reproduces_the_training_template(exported, name, template, stops):
    e = exported(name)
    served = json.loads((e.ref.dir / "result.json").read_text())["served"]
    text = (e.ref.dir / "Modelfile").read_text()
    assert f"\nFROM ./{served}\n" in text
    assert f'\nTEMPLATE """{template}"""\n' in text
    assert [line for line in text.splitlines() if line.startswith("PARAMETER stop")] == [
        f'PARAMETER stop "{s}"' for s in stops
    ]


def test_export_fails_when_the_gguf_template_differs_from_training(
    exported, family_data, tmp_path, monkeypatch
):
    """The GGUF stores a template without BOS (the template shipped beside many GGUFs): the
    stage fails naming the first differing token and both renderings."""
    e = exported("mistral")
    real = export.with_template

    def without_bos(model_dir, chat_template, out, *rest):
        return real(model_dir, chat_template.replace("{{- bos_token }}", ""), out, *rest)

    monkeypatch.setattr(export, "with_template", without_bos)
    with pytest.raises(export.ExportError) as failure:
        export.run(e.cfg, Store(tmp_path), e.merged, e.train, family_data(e.family))
    message = str(failure.value)
    assert "would not serve prompts as the model was trained" in message
    assert "token 0 differs" in message
    assert "HF rendering:   '<s>[INST]" in message and "GGUF rendering: '[INST]" in message
