"""Token-budget packing: budget respected, every sample once per epoch, exact resume, balanced ranks."""

import pytest
import torch

from moca_fast.data.packing import TokenBudgetSampler


def _lengths(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(5, 300, (n,), generator=g)).tolist()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_budget_and_exactly_once(world_size):
    lengths = _lengths()
    seen = []
    for rank in range(world_size):
        sampler = TokenBudgetSampler(lengths, 1024, seed=1, bucket_size=128, rank=rank, world_size=world_size)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            assert sum(lengths[i] for _, i in batch) <= 1024
        seen += [i for batch in batches for _, i in batch]
    assert sorted(seen) == list(range(len(lengths)))
    counts = {len(list(TokenBudgetSampler(lengths, 1024, seed=1, bucket_size=128, rank=r, world_size=world_size)))
              for r in range(world_size)}
    assert len(counts) == 1  # every rank runs the same number of steps


def test_batches_are_full():
    lengths = _lengths(2000)
    batches = list(TokenBudgetSampler(lengths, 2048, seed=0))
    fill = sum(lengths) / (len(batches) * 2048)
    assert fill > 0.95


def test_deterministic_by_seed_and_new_order_per_epoch():
    lengths = _lengths()
    a = TokenBudgetSampler(lengths, 1024, seed=3)
    b = TokenBudgetSampler(lengths, 1024, seed=3)
    assert a.plan(0) == b.plan(0)
    assert a.plan(0) != a.plan(1)
    assert a.plan(0) != TokenBudgetSampler(lengths, 1024, seed=4).plan(0)


def test_resume_yields_the_remaining_batches_exactly():
    lengths = _lengths()
    sampler = TokenBudgetSampler(lengths, 1024, seed=2, rank=1, world_size=2)
    sampler.set_epoch(4)
    full = list(sampler)
    resumed = TokenBudgetSampler(lengths, 1024, seed=2, rank=1, world_size=2)
    resumed.set_epoch(4, start=7)
    assert list(resumed) == full[7:]
    assert len(resumed) == len(full) - 7


def test_sample_over_budget_is_named():
    with pytest.raises(ValueError, match="sample doc-b has 2000 tokens, more than the token budget 1024"):
        TokenBudgetSampler([10, 2000], 1024, sample_ids=["doc-a", "doc-b"])
