"""Token-budget packing: budget respected, every sample once per epoch, exact resume, balanced ranks, and W ranks
see exactly the batches of one process whatever the batch count."""

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
        real = sampler.rank_batches(0)[1]  # the rest are padding, weighted zero by the trainer
        seen += [i for batch in batches[:real] for _, i in batch]
    assert sorted(seen) == list(range(len(lengths)))
    counts = {
        len(list(TokenBudgetSampler(lengths, 1024, seed=1, bucket_size=128, rank=r, world_size=world_size)))
        for r in range(world_size)
    }
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


@pytest.mark.parametrize("n, world_size, accum", [(499, 2, 2), (500, 3, 1), (37, 4, 2), (3, 4, 1)])
def test_ranks_see_the_single_process_batches_step_by_step(n, world_size, accum):
    """Step k of W ranks with grad_accum A holds the micro-batches of step k of one process with A * W, plus
    padding: even when the epoch's batch count does not divide by W (a batch used to be split then)."""
    lengths = _lengths(n)
    single = TokenBudgetSampler(lengths, 1024, seed=5, bucket_size=64).plan(0)
    assert len(single) % world_size or n == 3  # the case that used to split a batch
    ranks = [
        TokenBudgetSampler(lengths, 1024, seed=5, bucket_size=64, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert all(s.plan(0) == single for s in ranks)  # the plan does not depend on the world size
    per_rank = [s.rank_batches(0) for s in ranks]
    assert len({len(batches) for batches, _ in per_rank}) == 1  # every rank runs the same number of steps
    steps = -(-len(per_rank[0][0]) // accum)
    assert steps == -(-len(single) // (accum * world_size))
    for k in range(steps):
        step = sorted(
            batch
            for batches, real in per_rank
            for j, batch in enumerate(batches)
            if k * accum <= j < (k + 1) * accum and j < real
        )
        assert step == sorted(single[k * accum * world_size : (k + 1) * accum * world_size])
