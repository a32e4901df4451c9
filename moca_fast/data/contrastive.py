"""Stage-2 batches: pairs -> queries, positives and hard negatives encoded and packed for one forward.

A global batch holds `pairs_per_rank * world_size` pairs; each rank takes its slice. Its sequences are packed
in the order [queries, positives, negatives (pair-major)], into one PackedBatch or, for GradCache, into
several under a token budget; `duplicate_ids` lets the loss mask in-batch false negatives. The plan is a pure
function of (seed, epoch), so a resume continues exactly; a trailing global batch too small to fill every
rank is left out and counted in the log, never silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .batch import PackedBatch, pack_sequences
from .images import load_image
from .pairs import Pair, Side, target_ids, task_batches
from .processor import EncodedSequence, Processor
from .skips import after, load_or_stand_in

log = logging.getLogger(__name__)


class PairBatchSampler:
    """Batch sampler over pair indices: fixed-size global batches, optionally one task per batch."""

    def __init__(
        self,
        tasks: Sequence[str],
        pairs_per_rank: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        task_homogeneous: bool = False,
    ):
        self.tasks, self.pairs_per_rank = list(tasks), pairs_per_rank
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.task_homogeneous = task_homogeneous
        self.epoch, self.start = 0, 0
        if len(self.plan(0)) == 0:
            raise ValueError(
                f"{len(self.tasks)} pairs cannot fill one global batch of {pairs_per_rank * world_size} pairs"
            )

    def plan(self, epoch: int) -> list[list[int]]:
        size = self.pairs_per_rank * self.world_size
        seed = self.seed * 1_000_003 + epoch
        if self.task_homogeneous:
            batches = task_batches(self.tasks, size, seed=seed)
        else:
            order = torch.randperm(len(self.tasks), generator=torch.Generator().manual_seed(seed)).tolist()
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        full = [b for b in batches if len(b) == size]
        left_out = sum(len(b) for b in batches) - size * len(full)
        if left_out:
            log.info("epoch %d: %d pairs in batches smaller than %d left out of this epoch", epoch, left_out, size)
        return full

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        lo = self.rank * self.pairs_per_rank
        for batch in self.plan(self.epoch)[self.start :]:
            yield [(self.epoch, i) for i in batch[lo : lo + self.pairs_per_rank]]

    def __len__(self) -> int:
        return len(self.plan(self.epoch)) - self.start


@dataclass
class EncodedPair:
    query: EncodedSequence
    positive: EncodedSequence
    negatives: list[EncodedSequence]
    positive_side: Side


class EncodedPairs(Dataset):
    """(epoch, index) -> the pair's query, positive and negatives encoded (images decoded in the worker). A pair
    whose images fail to decode raises naming it, or with `skip_invalid` is replaced by the next pair of its task
    that decodes (logged), so the batch keeps its size and its task."""

    def __init__(self, pairs: Sequence[Pair], processor: Processor, skip_invalid: bool = False):
        self.pairs, self.processor, self.skip_invalid = pairs, processor, skip_invalid

    def __len__(self) -> int:
        return len(self.pairs)

    def encode_side(self, side: Side, sample_id: str) -> EncodedSequence:
        images = [load_image(side.image, sample_id)] if side.image else []
        return self.processor.encode(side.text, images, sample_id)

    def __getitem__(self, key: tuple[int, int]) -> EncodedPair:
        index = key[1]
        same_task = (j for j in after(index, len(self)) if self.pairs.tasks[j] == self.pairs.tasks[index])
        return load_or_stand_in(self._encode, index, same_task, skip=self.skip_invalid, log=log, what="pair")

    def _encode(self, index: int) -> EncodedPair:
        pair = self.pairs[index]
        negatives = [self.encode_side(n, f"{pair.id}/neg{k}") for k, n in enumerate(pair.negatives)]
        return EncodedPair(
            self.encode_side(pair.query, f"{pair.id}/qry"),
            self.encode_side(pair.positive, f"{pair.id}/pos"),
            negatives,
            pair.positive,
        )


@dataclass
class ContrastiveBatch:
    """One rank's stage-2 step: `chunks` pack the sequences [queries, positives, negatives] in that order."""

    chunks: list[PackedBatch]
    num_pairs: int
    num_negatives: int  # per query
    duplicate_ids: torch.Tensor  # [num_pairs] content ids of the positives

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def to(self, device, non_blocking: bool = False) -> ContrastiveBatch:
        return ContrastiveBatch(
            [c.to(device, non_blocking) for c in self.chunks],
            self.num_pairs,
            self.num_negatives,
            self.duplicate_ids.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> ContrastiveBatch:
        return ContrastiveBatch(
            [c.pin_memory() for c in self.chunks], self.num_pairs, self.num_negatives, self.duplicate_ids.pin_memory()
        )


class ContrastiveCollator:
    """Encoded pairs -> ContrastiveBatch; `chunk_tokens` splits the sequences for GradCache (None: one chunk)."""

    def __init__(self, processor: Processor, chunk_tokens: int | None = None, window_size: int = 112):
        self.processor, self.chunk_tokens, self.window_size = processor, chunk_tokens, window_size

    def __call__(self, pairs: list[EncodedPair]) -> ContrastiveBatch:
        counts = {len(p.negatives) for p in pairs}
        if len(counts) > 1:
            raise ValueError(
                f"pairs {[p.query.sample_id for p in pairs][:4]}... carry different numbers of hard "
                f"negatives {sorted(counts)}; use task-homogeneous batches or one negative ratio"
            )
        sequences = [p.query for p in pairs] + [p.positive for p in pairs] + [n for p in pairs for n in p.negatives]
        chunks, current, tokens = [], [], 0
        for seq in sequences:
            if current and self.chunk_tokens is not None and tokens + len(seq) > self.chunk_tokens:
                chunks.append(current)
                current, tokens = [], 0
            current.append(seq)
            tokens += len(seq)
        chunks.append(current)
        proc = self.processor
        packed = [
            pack_sequences(
                c,
                proc.image_token_id,
                spatial_merge_size=proc.spatial_merge_size,
                window_size=self.window_size,
                patch_size=proc.patch_size,
            )
            for c in chunks
        ]
        return ContrastiveBatch(packed, len(pairs), counts.pop(), target_ids([p.positive_side for p in pairs]))
