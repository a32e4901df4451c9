"""Token-budget packing: sample indices grouped into micro-batches whose token counts (or costs) fit a budget.

An epoch's plan is a pure function of (seed, epoch): shuffle, cut into buckets, pack each bucket
first-fit-decreasing (so similar costs travel together and micro-batches come out full), or, with
`cut="sorted"`, sort it by decreasing cost and cut it into consecutive runs as the reference cuts its cost
buckets (`plan_batches`, which the embedder also uses), then shuffle the batches,
deal them round-robin to ranks. Every sample lands in exactly one batch of one rank. The plan does not depend on
the number of ranks: when its batch count does not divide by it, the last round is filled with padding batches
(repeats of the first ones, logged), which the trainer weights zero. So W ranks taking micro-batch r, r + W, ...
see exactly the batches one process sees. Resuming needs only (epoch, batches already consumed by this rank):
the trainer records that, not the sampler, because a DataLoader prefetches ahead of what was trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

log = logging.getLogger(__name__)


def plan_batches(costs: Sequence[int], budget: int, max_items: int | None = None) -> list[list[int]]:
    """Indices sorted by decreasing cost, cut into consecutive batches of at most `budget` (and `max_items`
    inputs, when given): the embedder's and the server's batch plan, and TokenBudgetSampler's sorted cut of a
    bucket. No epochs, ranks or resume here, and an input over the budget is a batch of its own."""
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    batches, current, used = [], [], 0
    for i in order:
        if current and (used + costs[i] > budget or len(current) == max_items):
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += costs[i]
    return batches + [current] if current else batches


def reference_cost(tokens: int, image_tokens: int, images: int, max_length: int | None) -> int:
    """The reference's bucketing cost of one sample: text tokens + 4 x image tokens + 2 per image, capped at
    max_length (its max_len; None: no cap). Text tokens are every token that is not an image token (vision
    start/end included)."""
    cost = tokens - image_tokens + 4 * image_tokens + 2 * images
    return cost if max_length is None else min(cost, max_length)


class TokenBudgetSampler:
    """A batch sampler for `torch.utils.data.DataLoader`; each batch holds (epoch, index) pairs. `lengths` are
    whatever the budget counts (tokens, or reference_cost units); `cut` is "first_fit" (fullest micro-batches)
    or "sorted" (the reference's buckets)."""

    def __init__(
        self,
        lengths: Sequence[int],
        budget: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        bucket_size: int = 4096,
        rank: int = 0,
        world_size: int = 1,
        sample_ids: Sequence[str] | None = None,
        cut: str = "first_fit",
    ):
        if cut not in ("first_fit", "sorted"):
            raise ValueError(f"unknown cut {cut!r}: use 'first_fit' or 'sorted'")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        if self.lengths.numel() == 0:
            raise ValueError("no samples to plan batches from")
        too_long = torch.nonzero(self.lengths > budget).flatten().tolist()
        if too_long:
            i = too_long[0]
            name = sample_ids[i] if sample_ids is not None else str(i)
            raise ValueError(
                f"sample {name} has {int(self.lengths[i])} tokens, more than the token budget "
                f"{budget} ({len(too_long)} such samples); raise the budget or lower max_length"
            )
        self.budget, self.seed, self.shuffle, self.cut = budget, seed, shuffle, cut
        self.bucket_size, self.rank, self.world_size = bucket_size, rank, world_size
        self.epoch, self.start = 0, 0

    def plan(self, epoch: int) -> list[list[int]]:
        """All batches of an epoch in global order, the same for any number of ranks (without padding)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = self.lengths.numel()
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        batches = []
        for bucket in order.split(self.bucket_size):
            if self.cut == "sorted":
                batches.extend(
                    [[int(bucket[i]) for i in run] for run in plan_batches(self.lengths[bucket].tolist(), self.budget)]
                )
            else:
                batches.extend(self._first_fit_decreasing(bucket))
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def rank_batches(self, epoch: int) -> tuple[list[list[int]], int]:
        """This rank's batches of an epoch (rank r takes r, r + W, ... of the plan, the last round padded with
        repeats of the plan's first batches) and how many of them are real; every rank gets as many."""
        plan = self.plan(epoch)
        padded = plan + [plan[k % len(plan)] for k in range(-len(plan) % self.world_size)]
        return padded[self.rank :: self.world_size], len(plan[self.rank :: self.world_size])

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch`, skipping this rank's first `start` batches (a resume position)."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches, real = self.rank_batches(self.epoch)
        if real < len(batches):
            log.info(
                "epoch %d, rank %d: the batches do not divide over %d ranks; the last %d of this rank's %d are "
                "padding (weight zero)",
                self.epoch,
                self.rank,
                self.world_size,
                len(batches) - real,
                len(batches),
            )
        for batch in batches[self.start :]:
            yield [(self.epoch, i) for i in batch]

    def __len__(self) -> int:
        return -(-len(self.plan(self.epoch)) // self.world_size) - self.start

    def _first_fit_decreasing(self, bucket: torch.Tensor) -> list[list[int]]:
        lengths = self.lengths[bucket]
        order = torch.argsort(lengths, descending=True, stable=True)
        batches, room = [], []
        for i in order.tolist():
            cost = int(lengths[i])
            for b, free in enumerate(room):
                if cost <= free:
                    batches[b].append(int(bucket[i]))
                    room[b] -= cost
                    break
            else:
                batches.append([int(bucket[i])])
                room.append(self.budget - cost)
        return batches
