import json

import pytest
from serving_fixtures import make_data, make_lora

from tasks import base as base_stage
from tasks import evaluate
from tasks.config import load_config

# --- metrics on strings with known values -------------------------------------------------


def test_identical_answers_score_100_in_english_and_chinese():
    for text in ["The cat sat on the mat.", "我喜欢吃苹果，也喜欢吃香蕉。"]:
        m = evaluate.text_metrics([text], [text])
        assert m == {
            "bleu4": 100.0,
            "rouge1": 100.0,
            "rouge2": 100.0,
            "rougeL": 100.0,
            "exact_match": 100.0,
        }


def test_english_partial_overlap_known_values():
    # 1- to 4-gram precisions 5/6, 4/5, 3/4, 2/3, no brevity penalty: BLEU = (1/3)^(1/4)
    m = evaluate.text_metrics(["a b c d e f"], ["a b c d e g"])
    assert m["bleu4"] == pytest.approx(100 * (1 / 3) ** 0.25, abs=0.01)  # 75.98
    assert m["rouge1"] == pytest.approx(100 * 5 / 6, abs=0.01)
    assert m["rouge2"] == pytest.approx(100 * 4 / 5, abs=0.01)
    assert m["exact_match"] == 0.0


def test_chinese_by_characters_known_values():
    # 我喜欢吃苹果 vs 我喜欢吃香蕉: 4 of 6 characters, 3 of 5 bigrams, LCS 4
    m = evaluate.text_metrics(["我喜欢吃苹果"], ["我喜欢吃香蕉"], zh="char")
    assert m["bleu4"] == pytest.approx(100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=0.01)
    assert m["rouge1"] == pytest.approx(100 * 4 / 6, abs=0.01)
    assert m["rouge2"] == pytest.approx(100 * 3 / 5, abs=0.01)
    assert m["rougeL"] == pytest.approx(100 * 4 / 6, abs=0.01)


def test_chinese_by_jieba_words_known_values():
    assert evaluate.segment("我喜欢吃苹果") == ["我", "喜欢", "吃", "苹果"]
    m = evaluate.text_metrics(["我喜欢吃苹果"], ["我喜欢吃香蕉"], zh="jieba")
    assert m["rouge1"] == pytest.approx(75.0)  # 我 / 喜欢 / 吃 shared, 苹果 ≠ 香蕉
    assert m["rouge2"] == pytest.approx(100 * 2 / 3, abs=0.01)


def test_rouge_default_tokenizer_would_lose_chinese_ours_does_not():
    # rouge-score alone keeps only [a-z0-9]: every Chinese pair would score 0 (or crash).
    m = evaluate.text_metrics(["北京。"], ["东京。"], zh="char")
    assert 0 < m["rouge1"] < 100


def test_mixed_text_segmentation_and_exact_match_whitespace():
    assert evaluate.segment("我是Lexi，你好 world!", zh="char") == [
        "我",
        "是",
        "Lexi",
        "，",
        "你",
        "好",
        "world",
        "!",
    ]
    assert evaluate.text_metrics(["Paris.  "], [" Paris."])["exact_match"] == 100.0


# --- the stage on a real LoRA and a real P-Tuning v2 prefix ---------------------------------

FAST = ["evaluate.num_samples=3", "evaluate.max_new_tokens=16"]


@pytest.fixture(scope="module")
def refs(test_store, base_model_dir):
    cfg = load_config(overrides=FAST)
    base = base_stage.run(cfg, test_store)
    data = make_data(test_store)
    return cfg, base, data


def test_evaluate_lora_base_vs_tuned(refs, test_store):
    cfg, base, data = refs
    train = make_lora(test_store, base, data)
    ref = evaluate.run(cfg, test_store, data, base, train)
    metrics = json.loads((ref.dir / "metrics.json").read_text())
    tuned, base_m = metrics["tuned"], metrics["base"]
    assert metrics["samples"] == 3 and metrics["test_records"] == 5
    # The adapter was trained on the identity records: it must beat the base on them.
    assert tuned["test_loss"] < base_m["test_loss"]
    assert tuned["test_ppl"] == pytest.approx(2.718281828 ** tuned["test_loss"], rel=1e-3)
    assert tuned["rougeL"] > base_m["rougeL"]
    rows = [json.loads(line) for line in (ref.dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"prompt", "reference", "base", "tuned"}
    assert "Lexi" in rows[0]["tuned"] and "Lexi" not in rows[0]["base"]
    table = (ref.dir / "table.md").read_text()
    assert "| test perplexity |" in table and "ROUGE-L" in table
    again = evaluate.run(cfg, test_store, data, base, train)
    assert again.cached and again.key == ref.key


def test_evaluate_ptuning_generates_through_peft(refs, test_store):
    cfg, base, data = refs
    cfg = load_config(overrides=[*FAST, "train.method=ptuning", "evaluate.max_new_tokens=8"])
    train = make_lora(test_store, base, data, method="ptuning", steps=6)
    ref = evaluate.run(cfg, test_store, data, base, train)
    metrics = json.loads((ref.dir / "metrics.json").read_text())
    assert metrics["tuned"]["test_loss"] < metrics["base"]["test_loss"]
    rows = [json.loads(line) for line in (ref.dir / "predictions.jsonl").read_text().splitlines()]
    assert any(r["tuned"] != r["base"] for r in rows)  # the prefix changed what was generated
