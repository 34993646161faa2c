"""Prompt/answer boundary, label masking, cutoff and packing on SmolLM2's real tokenizer."""

from __future__ import annotations

import copy

import pytest

from tasks.formatting import (
    IGNORE,
    FormatError,
    answer_text,
    encode,
    prompt_ids,
    prompt_text,
    template_length,
)
from tasks.train import batches

RECORD = {"instruction": "Who are you?", "input": "", "output": "I am Lexi."}


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from tasks.train.tokens import load_tokenizer

    return load_tokenizer(base_model_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template (a base model's), for the alpaca path."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


def trained(tokenizer, enc) -> str:
    return tokenizer.decode(
        [i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE]
    )


def test_chat_labels_are_exactly_the_answer_and_its_end_of_turn(tokenizer):
    enc = encode(tokenizer, RECORD, "auto", cutoff_len=256)
    assert trained(tokenizer, enc) == "I am Lexi.<|im_end|>"
    # prompt tokens are exactly what inference feeds the model, all masked
    prompt = prompt_ids(tokenizer, RECORD)
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert tokenizer.decode(prompt) == prompt_text(tokenizer, RECORD)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    # every answer token is trained, the end-of-turn token last
    assert enc.labels[len(prompt) :] == enc.input_ids[len(prompt) :]
    assert enc.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_system_and_history_go_through_the_template_and_stay_masked(tokenizer):
    record = RECORD | {"system": "You are terse.", "history": [["Hi", "Hello!"]]}
    enc = encode(tokenizer, record, "chat", cutoff_len=256)
    prompt = tokenizer.decode(enc.input_ids[: enc.prompt_len])
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in prompt
    assert "SmolLM" not in prompt  # the record's system prompt replaces the default
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>" in prompt
    assert trained(tokenizer, enc) == "I am Lexi.<|im_end|>"  # only the last answer


def test_train_on_prompt_trains_every_token(tokenizer):
    enc = encode(tokenizer, RECORD, "auto", cutoff_len=256, train_on_prompt=True)
    assert enc.labels == enc.input_ids


def test_alpaca_fallback_without_a_chat_template(plain_tokenizer):
    enc = encode(plain_tokenizer, RECORD | {"input": "Be brief."}, "auto", cutoff_len=256)
    prompt = plain_tokenizer.decode(enc.input_ids[: enc.prompt_len])
    assert prompt.endswith("### Instruction:\nWho are you?\n\nBe brief.\n\n### Response:\n")
    assert trained(plain_tokenizer, enc) == "I am Lexi." + plain_tokenizer.eos_token
    with pytest.raises(FormatError, match="train.template=alpaca"):
        answer_text(plain_tokenizer, RECORD, "chat")


def test_cutoff_keeps_the_prompt_and_cuts_the_answer(tokenizer):
    long = RECORD | {"output": "word " * 300}
    prompt_len = len(prompt_ids(tokenizer, long))
    enc = encode(tokenizer, long, "auto", cutoff_len=prompt_len + 10)
    assert len(enc.input_ids) == prompt_len + 10 and enc.truncated
    assert encode(tokenizer, long, "auto", cutoff_len=prompt_len) is None  # no room to answer


def test_template_length_is_the_empty_conversation(tokenizer):
    n = template_length(tokenizer, "auto")
    # SmolLM2 adds a default system prompt: about 30 tokens before any text
    assert 25 <= n <= 45
    assert n == len(encode(tokenizer, {"instruction": "", "output": ""}, "auto", 512).input_ids)


def test_packed_row_restarts_positions_and_never_trains_across_records(tokenizer):
    records = [
        {"input_ids": e.input_ids, "labels": e.labels}
        for e in (
            encode(tokenizer, RECORD, "auto", 256, train_on_prompt=True),
            encode(tokenizer, RECORD | {"output": "Lexi."}, "auto", 256, train_on_prompt=True),
        )
    ]
    n0, n1 = (len(r["input_ids"]) for r in records)
    packed = batches.pack(records)
    assert packed["input_ids"].shape == (1, n0 + n1) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [*range(n0), *range(n1)]
    labels = packed["shift_labels"][0].tolist()  # position t predicts token t + 1
    assert labels[: n0 - 1] == records[0]["input_ids"][1:]
    assert labels[n0 - 1] == IGNORE and labels[-1] == IGNORE  # nothing predicts a record's start
    padded = batches.pad(records, pad_id=tokenizer.pad_token_id)
    assert padded["attention_mask"].sum() == n0 + n1
    assert packed["num_targets"] == padded["num_targets"] == n0 + n1 - 2  # same tokens carry loss
