"""Which records each process trains on, step by step."""

from tasks.batches import step_indices
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
