"""Preference tuning's maths on a tiny random Llama: log-probs in both layouts, the losses
against their formulas, and DPO steps that make the chosen answers win."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.formatting import IGNORE
from tasks.train.preference import (
    evaluate_pairs,
    pair_batches,
    pair_loss,
    reference_logps,
    sequence_logps,
)

PLAN = SimpleNamespace(attention="sdpa")


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def record(prompt: list[int], answer: list[int]) -> dict:
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def make_pairs(n: int, seed: int = 1) -> list[tuple[dict, dict]]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(3, 30, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        good = torch.randint(30, 40, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        bad = torch.randint(40, 64, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        p = prompt.tolist()
        pairs.append((record(p, good.tolist()), record(p, bad.tolist())))
    return pairs


def direct_logp(model, rec: dict) -> float:
    """log p(answer | prompt) from one unpacked forward, in float64."""
    ids = torch.tensor([rec["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = logits.log_softmax(-1)
    total = 0.0
    for t in range(len(rec["input_ids"]) - 1):
        if rec["labels"][t + 1] != IGNORE:
            total += float(logps[t, rec["labels"][t + 1]])
    return total


@pytest.mark.parametrize("packing", [True, False])
def test_sequence_logps_match_a_direct_computation(packing):
    model = tiny_model()
    pairs = make_pairs(5)
    batches = pair_batches(pairs, token_budget=24, packing=packing, pad_id=0)
    assert len(batches) > 1  # several micro-batches, each of whole pairs
    seen = []
    for batch in batches:
        with torch.no_grad():
            logps = sequence_logps(model, batch, PLAN)
        records = [rec for i in batch["pair_index"].tolist() for rec in pairs[i]]
        expected = torch.tensor([direct_logp(model, r) for r in records])
        assert torch.allclose(logps.double(), expected.double(), atol=1e-4)
        seen += batch["pair_index"].tolist()
    assert sorted(seen) == list(range(5))


def test_losses_follow_their_formulas():
    logps = torch.tensor([-4.0, -6.0, -9.0, -3.0])  # pair 0: chosen wins; pair 1: loses
    tokens = torch.tensor([2, 3, 3, 1])
    ref = torch.tensor([-5.0, -5.0, -8.0, -4.0])
    loss, s = pair_loss("dpo", logps, tokens, ref, beta=0.1)
    expect = [-math.log(1 / (1 + math.exp(-0.1 * ((1) - (-1))))),
              -math.log(1 / (1 + math.exp(-0.1 * ((-1) - (1)))))]  # fmt: skip
    assert loss.tolist() == pytest.approx(expect, rel=1e-5)
    assert s["reward_chosen"].tolist() == pytest.approx([0.1, -0.1])
    loss, _ = pair_loss("simpo", logps, tokens, None, beta=2.0, simpo_gamma=0.5)
    margin0 = 2.0 * (-4.0 / 2 - -6.0 / 3) - 0.5
    assert float(loss[0]) == pytest.approx(-F.logsigmoid(torch.tensor(margin0)).item(), rel=1e-5)
    loss, _ = pair_loss("orpo", logps, tokens, None, beta=0.1, orpo_lambda=0.5)
    mc = -2.0  # pair 0: mean logps equal (−4/2, −6/3), so the log odds ratio is 0
    assert float(loss[0]) == pytest.approx(-mc + 0.5 * math.log(2), rel=1e-5)
    assert float(loss[1]) > float(loss[0])  # a chosen answer less likely than the rejected


def test_dpo_steps_make_the_chosen_answers_win():
    torch.manual_seed(0)
    model = tiny_model().train()
    pairs = make_pairs(8)
    batches = pair_batches(pairs, token_budget=40, packing=True, pad_id=0)
    ref = reference_logps(model, batches, PLAN, "cpu", len(pairs))
    before = evaluate_pairs(model, batches, PLAN, "cpu", "dpo", 0.1, ref)
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # the policy is its reference
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        total = 0.0
        for batch in batches:
            logps = sequence_logps(model, batch, PLAN)
            pair_ref = ref[batch["pair_index"]].flatten()
            loss, _ = pair_loss("dpo", logps, batch["answer_tokens"], pair_ref, beta=0.1)
            loss.sum().div(len(pairs)).backward()
            total += float(loss.sum().detach())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / len(pairs))
    after = evaluate_pairs(model, batches, PLAN, "cpu", "dpo", 0.1, ref)
    assert losses[0] == pytest.approx(math.log(2), rel=1e-3)
    assert losses[-1] < 0.5 * losses[0]
    assert after["reward_accuracy"] == 1.0 and after["reward_margin"] > 0.5


# --- through the training stage ----------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory):
    """The demo preference set, cleaned and split by the data stage."""
    from tasks.config import REPO_ROOT, load_config
    from tasks.data import clean_dataset

    out = tmp_path_factory.mktemp("pairs-data")
    clean_dataset(REPO_ROOT / "datasets_raw" / "preference", out, load_config().data)
    return out


@pytest.mark.parametrize("objective", ["dpo", pytest.param("orpo", marks=pytest.mark.slow)])
def test_the_training_stage_tunes_on_pairs(objective, base_model_dir, pairs_data, tmp_path):
    from train_fixtures import make_tiny_model, refs, tiny_config

    from tasks import train
    from tasks.store import Ref, Store

    tiny = make_tiny_model(base_model_dir, tmp_path / "tiny").parent
    cfg = tiny_config(
        f"train.objective={objective}", "train.max_steps=12", "train.learning_rate=1e-2"
    )
    _, base = refs(tiny)
    data = Ref("data", "pairs", str(pairs_data))
    ref = train.run(cfg, Store(tmp_path / "store"), data, base)
    metrics = ref.manifest()["metrics"]
    pref = metrics["preference"]
    assert pref["objective"] == objective and pref["before"]["pairs"] == pref["after"]["pairs"] > 10
    # held-out pairs: chosen answers gain on rejected ones in mean token log-prob
    assert pref["after"]["mean_logp_margin"] > pref["before"]["mean_logp_margin"]
    history = [
        json.loads(line) for line in (ref.dir / "log_history.jsonl").read_text().splitlines()
    ]
    logged = [h for h in history if "reward_accuracy" in h]
    assert logged and logged[-1]["reward_margin"] > logged[0]["reward_margin"]
    if objective == "dpo":
        assert "reward_accuracy" in pref["after"]  # DPO's own rewards against the start
