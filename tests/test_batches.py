"""Which records each process trains on, step by step, and the one way they become
micro-batches: packed or padded rows within a token budget, labels shifted per record,
and packing refused where the model's attention would mix a row's records."""

import random

import pytest
from train_fixtures import tiny_llama, token_records

from tasks.config import TrainConfig
from tasks.train import batches, fastpath
from tasks.train.batches import step_indices


def test_processes_split_each_step_and_cover_the_epoch():
    cfg = TrainConfig(batch_size=2, grad_accum=2, seed=3)
    n, world = 16, 2  # 8 records a step: 2 steps an epoch
    seen = []
    for step in range(2):
        parts = [step_indices(n, step, cfg, rank, world) for rank in range(world)]
        assert all(len(p) == 4 for p in parts)
        assert not set(parts[0]) & set(parts[1])
        seen += parts[0] + parts[1]
    assert sorted(seen) == list(range(n))


def test_a_short_last_step_leaves_no_process_without_records():
    cfg = TrainConfig(batch_size=2, grad_accum=2, seed=3)
    n, world = 10, 2  # the second step has 2 records for 8 places
    last = [step_indices(n, 1, cfg, rank, world) for rank in range(world)]
    assert [len(p) for p in last] == [4, 4]  # filled from the epoch's head
    first = step_indices(n, 0, cfg, 0, world) + step_indices(n, 0, cfg, 1, world)
    assert set(first + last[0] + last[1]) == set(range(n))  # every record still trained on
    assert step_indices(n, 1, cfg, None, world) == last[0] + last[1]  # rank None: all of them


def test_neftune_noise_in_a_packed_row_is_sized_by_each_record():
    import math

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.train.loop import add_neftune

    torch.manual_seed(0)
    d, alpha = 64, 5.0
    config = LlamaConfig(
        vocab_size=100, hidden_size=d, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4,
    )  # fmt: skip
    model = LlamaForCausalLM(config).train()
    add_neftune(model, alpha)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out))
    ids = torch.randint(0, 100, (1, 8))
    clean = model.get_input_embeddings().weight[ids[0]].detach()

    def noise(**kwargs) -> torch.Tensor:
        seen.clear()
        model(input_ids=ids, **kwargs)
        return (seen[0][0].detach() - clean).abs()

    packed = noise(position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))  # records of 3 and 5
    for rows, n in ((slice(0, 3), 3), (slice(3, 8), 5)):
        bound = alpha / math.sqrt(n * d)
        assert packed[rows].max() <= bound and packed[rows].max() > 0.9 * bound
    plain = noise()  # one record of 8: the whole row's length
    bound = alpha / math.sqrt(8 * d)
    assert plain.max() <= bound and plain.max() > 0.9 * bound
    model.eval()
    assert noise().max() == 0  # no noise outside training


def test_plan_microbatches_covers_each_record_once_within_budget():
    rng = random.Random(1)
    lengths = [rng.randint(30, 1024) for _ in range(32)]
    groups = batches.plan_microbatches(lengths, 8192)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(32))
    loads = [sum(lengths[i] for i in g) for g in groups]
    assert max(loads) <= 8192
    assert len(groups) == -(-sum(lengths) // 8192) or min(loads) > 0.5 * max(loads)
    # a record over the budget still trains, alone in its row
    assert batches.plan_microbatches([5000, 10], 4096) == [[0], [1]]


def test_pack_resets_positions_and_never_shifts_labels_across_records():
    recs = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
    ]
    b = batches.pack(recs)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5]
    # record 1's last token must not learn to predict record 2's first token (8)
    assert b["shift_labels"].tolist() == [[6, 7, -100, 9, -100]]
    assert b["target_index"].tolist() == [0, 1, 3]
    assert b["targets"].tolist() == [6, 7, 9]
    assert b["num_tokens"] == 5 and b["max_length_q"] == 3
    padded = batches.pad(recs, pad_id=0)  # the same (position, target) pairs, row by row
    assert padded["shift_labels"].tolist() == [[6, 7, -100], [9, -100, -100]]
    assert padded["num_targets"] == 3 and padded["num_tokens"] == 5


def test_step_batches_respects_the_token_budget():
    recs = token_records(16, seed=5)
    mbs = batches.step_batches(recs, token_budget=128, packing=True)
    assert sum(mb["num_tokens"] for mb in mbs) == sum(len(r["input_ids"]) for r in recs)
    assert all(mb["num_tokens"] <= 128 for mb in mbs)
    padded = batches.step_batches(recs, token_budget=128, packing=False, batch_size=4)
    assert len(padded) == 4
    assert sum(mb["num_targets"] for mb in padded) == sum(mb["num_targets"] for mb in mbs)


def test_packing_is_refused_when_the_attention_mixes_records(monkeypatch):
    """transformers' sdpa keeps a packed row's records apart only by reading the restarting
    position ids; without that, records would attend to each other and training would go
    on silently. The check catches it before the first step."""
    from transformers import masking_utils

    model = tiny_llama().train()
    plan = fastpath.make_plan(TrainConfig(packing=True), "cpu", model)
    batches.check_packing(model, plan, "cpu")  # sdpa with the position-id mask: fine
    assert model.training  # the check leaves the model as it found it

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda positions: None)
    with pytest.raises(batches.PackingError, match="train.packing=true.*'sdpa'.*fix:"):
        batches.check_packing(model, plan, "cpu")
    plan.packing = False  # padded rows: nothing to check
    batches.check_packing(model, plan, "cpu")
