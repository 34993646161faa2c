"""Tool conversations rendered for training: with a tool-aware template (Qwen 2.5's, from
llama.cpp's collection) and with one that knows no tools (SmolLM2's own), the loss falls on
every assistant turn, calls included, and never on a tool's result."""

from __future__ import annotations

import copy
import json

import pytest

from tasks import conversation
from tasks.config import REPO_ROOT
from tasks.formatting import IGNORE, encode, prompt_text

TEMPLATES = REPO_ROOT / ".cache" / "llama-cpp"
TOOL = {
    "type": "function",
    "function": {
        "name": "small_claims_limit",
        "description": "The small-claims cap of a jurisdiction.",
        "parameters": {"type": "object", "properties": {"jurisdiction": {"type": "string"}}},
    },
}
RECORD = {
    "instruction": "And in Ohio?",
    "input": "",
    "output": "Ohio's cap is $6,000.",
    "system": "You are a legal assistant.",
    "messages": [
        {"role": "user", "content": "What is the cap in Texas?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "small_claims_limit",
                                              "arguments": {"jurisdiction": "Texas"}}}]},
        {"role": "tool", "content": "RESULT-TEXAS-20000"},
        {"role": "assistant", "content": "Texas hears claims up to $20,000."},
        {"role": "user", "content": "And in Ohio?"},
        {"role": "assistant", "content": "Ohio's cap is $6,000."},
    ],
    "tools": [TOOL],
}  # fmt: skip


@pytest.fixture(scope="module")
def smollm(base_model_dir):
    from tasks.train.tokens import load_tokenizer

    return load_tokenizer(base_model_dir)


@pytest.fixture(scope="module")
def qwen(smollm):
    """SmolLM2's ChatML tokenizer with Qwen 2.5's tool-aware ChatML template."""
    (path,) = TEMPLATES.glob("*/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja")
    tokenizer = copy.deepcopy(smollm)
    tokenizer.chat_template = path.read_text()
    return tokenizer


def trained_and_not(tokenizer, record):
    enc = encode(tokenizer, record, "auto", cutoff_len=2048)
    trained = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE]
    untrained = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label == IGNORE]
    return enc, tokenizer.decode(trained), tokenizer.decode(untrained)


def test_a_tool_aware_template_renders_the_tools_and_trains_every_answer(qwen):
    assert conversation.knows_tools(qwen)
    enc, trained, untrained = trained_and_not(qwen, RECORD)
    full = qwen.decode(enc.input_ids)
    system_turn = full.split("<|im_end|>")[0]
    assert "<tools>" in system_turn and '"name": "small_claims_limit"' in system_turn
    assert '"jurisdiction": "Texas"' in trained  # the call itself is trained
    assert "Texas hears claims up to $20,000." in trained
    assert "Ohio's cap is $6,000." in trained
    assert trained.count("<|im_end|>") == 3  # each answer learns to end its turn
    assert "RESULT-TEXAS-20000" in untrained and "RESULT-TEXAS" not in trained
    assert "What is the cap in Texas?" in untrained and "<tools>" not in trained
    # the pieces were tokenized apart, yet give the same text as rendering at once
    rendered = qwen.apply_chat_template(
        conversation.record_messages(RECORD), tools=[TOOL], tokenize=False
    )
    assert full == rendered.rstrip("\n") or full == rendered


def test_a_template_without_tools_gets_the_hermes_convention(smollm):
    assert not conversation.knows_tools(smollm)
    enc, trained, untrained = trained_and_not(smollm, RECORD)
    assert (
        '<tool_call>\n{"name": "small_claims_limit", "arguments": {"jurisdiction": "Texas"}}'
        in trained
    )
    assert "<tool_response>\nRESULT-TEXAS-20000\n</tool_response>" in untrained
    assert "RESULT-TEXAS" not in trained
    assert '"name": "small_claims_limit"' in untrained.split("<tool_call>")[0]  # tool list
    first_trained = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    assert enc.prompt_len == first_trained


def test_the_evaluated_prompt_ends_before_the_last_answer(qwen, smollm):
    for tokenizer in (qwen, smollm):
        text = prompt_text(tokenizer, RECORD)
        assert text.endswith("<|im_start|>assistant\n")
        assert "And in Ohio?" in text and "Ohio's cap" not in text


def test_generated_calls_parse_back_into_openai_form():
    text = 'Let me check.\n<tool_call>\n{"name": "small_claims_limit", "arguments": {"jurisdiction": "Ohio"}}\n</tool_call>'
    rest, calls = conversation.parse_calls(text)
    assert rest == "Let me check."
    assert calls[0]["function"]["name"] == "small_claims_limit"
    assert json.loads(calls[0]["function"]["arguments"]) == {"jurisdiction": "Ohio"}
    assert conversation.parse_calls("no calls here") == ("no calls here", [])
    assert conversation.parse_calls("<tool_call>{not json}</tool_call>")[1] == []


def test_a_conversation_that_does_not_fit_is_cut_after_its_first_answer_starts(smollm):
    enc = encode(smollm, RECORD, "auto", cutoff_len=2048)
    cut = encode(smollm, RECORD, "auto", cutoff_len=enc.prompt_len + 3)
    assert cut.truncated and len(cut.input_ids) == enc.prompt_len + 3
    assert encode(smollm, RECORD, "auto", cutoff_len=enc.prompt_len) is None
