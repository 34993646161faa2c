"""The evaluate stage on a test split of preference pairs, without a chain: the tiny model
tuned with DPO on the demo legal pairs, scored against the base it started from."""

from __future__ import annotations

import json

import pytest

from tasks import evaluate, train
from tasks.config import REPO_ROOT, load_config
from tasks.evaluate import pairs as held_out
from tasks.store import Ref, Store

FAST = ["evaluate.num_samples=2", "evaluate.max_new_tokens=8", "evaluate.max_loss_records=12"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, base_model_dir):
    """(store, data, base, DPO train ref, its config) on the tiny model."""
    from train_fixtures import make_tiny_model, tiny_config

    from tasks.data import clean_dataset

    root = tmp_path_factory.mktemp("pair-eval")
    data_dir, pairs = root / "data", root / "pairs.jsonl"
    # every third demo pair, English and Chinese: 70 pairs, 7 of them held out for the test
    lines = (REPO_ROOT / "datasets_raw/preference/law_pairs.jsonl").read_text("utf-8").splitlines()
    pairs.write_text("\n".join(lines[::3]) + "\n", encoding="utf-8")
    clean_dataset(pairs, data_dir, load_config().data)
    make_tiny_model(base_model_dir, root / "tiny")
    data, base = Ref("data", "pairs", str(data_dir)), Ref("base", "tiny", str(root / "tiny"))
    cfg = tiny_config("train.objective=dpo", "train.max_steps=6", "train.learning_rate=1e-2",
                      *FAST)  # fmt: skip
    store = Store(root / "store")
    return store, data, base, train.run(cfg, store, data, base), cfg


def test_a_dpo_model_is_scored_against_the_base_it_started_from(tuned):
    store, data, base, trained, cfg = tuned
    ref = evaluate.run(cfg, store, data, base, trained)
    metrics = json.loads((ref.dir / "metrics.json").read_text())
    assert metrics["pairs"]["reference"] == "base" and metrics["pairs"]["objective"] == "dpo"
    assert "sft" not in metrics
    b, t = metrics["base"], metrics["tuned"]
    expected = 0.1 * (
        (t["logp_chosen"] - b["logp_chosen"]) - (t["logp_rejected"] - b["logp_rejected"])
    )
    assert t["dpo_reward_margin"] == pytest.approx(expected, abs=2e-4)
    # DPO moved the chosen answers up against the rejected ones, as on the dev pairs
    assert t["mean_logp_margin"] > b["mean_logp_margin"]
    rows = (ref.dir / "predictions.jsonl").read_text().splitlines()
    assert set(json.loads(rows[0])) == {"prompt", "reference", "base", "tuned"}
    table = (ref.dir / "table.md").read_text()
    assert "| metric | base | tuned | Δ |" in table and "| DPO reward accuracy (vs base) |" in table


def test_the_ranking_is_the_mean_token_logprob_of_each_answer(tuned):
    """ranking_accuracy recomputed from one unpacked forward per answer, in float64."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.formatting import IGNORE
    from tasks.train.tokens import encode_pair, load_tokenizer

    store, data, base, _, cfg = tuned
    model_dir = base.dir / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(model_dir)
    test = json.loads((data.dir / "test.json").read_text())

    def mean_logp(enc) -> float:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0].double()
        logps = logits.log_softmax(-1)
        picked = [float(logps[i, y]) for i, y in enumerate(enc.labels[1:]) if y != IGNORE]
        return sum(picked) / len(picked)

    wins = []
    for record in test:
        chosen, rejected = encode_pair(tokenizer, record, "auto", cfg.train.cutoff_len)
        wins.append(mean_logp(chosen) > mean_logp(rejected))
    pairs = held_out.load(tokenizer, test, "auto", cfg.train.cutoff_len, batch_size=4)
    assert pairs.count == len(test) and len(pairs.batches) == -(-len(test) // 4)  # 4 a batch
    assert pairs.score(model)["ranking_accuracy"] == pytest.approx(sum(wins) / len(wins), abs=1e-4)


def test_without_the_base_scored_dpo_still_gets_its_reference(tuned):
    store, data, base, trained, cfg = tuned
    cfg = cfg.model_copy(
        update={"evaluate": cfg.evaluate.model_copy(update={"compare_base": False})}
    )
    metrics = json.loads(
        (evaluate.run(cfg, store, data, base, trained).dir / "metrics.json").read_text()
    )
    assert metrics["base"] is None and "dpo_reward_accuracy" in metrics["tuned"]


def test_pairs_and_their_basis_follow_the_texts_and_the_cut(tuned):
    from tasks.train.tokens import load_tokenizer

    _, data, base, _, _ = tuned
    tokenizer = load_tokenizer(base.dir / "model")
    test = json.loads((data.dir / "test.json").read_text())
    a = held_out.load(tokenizer, test, "auto", 128, 4)
    assert a.basis == held_out.load(tokenizer, test, "auto", 128, 8).basis  # batching: same
    assert a.basis != held_out.load(tokenizer, test, "auto", 96, 4).basis
    assert a.basis != held_out.load(tokenizer, test[1:], "auto", 128, 4).basis
    plain = [{k: v for k, v in r.items() if k != "rejected"} for r in test]
    assert held_out.load(tokenizer, plain, "auto", 128, 4) is None  # no pairs: no metrics
