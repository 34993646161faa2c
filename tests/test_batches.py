"""Which records each process trains on, step by step."""

from tasks.train.batches import step_indices
from tasks.config import TrainConfig


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
