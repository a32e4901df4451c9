"""Loading that keeps a GPU fed: decode, resize, patchify and mask in DataLoader workers, pack, pin, prefetch.

The sampler (data/packing.py) hands workers (epoch, index) pairs; each sample's masks are drawn from a
generator seeded by (seed, epoch, index), so batches are identical whatever the number of workers and a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import atexit
import copy
import logging
import signal
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .batch import PackedBatch, pack_sequences
from .documents import Document
from .images import image_size
from .masking import apply_mae, apply_mlm
from .packing import TokenBudgetSampler, reference_cost
from .processor import EncodedSequence, Processor
from .skips import Skips, after, load_or_stand_in

log = logging.getLogger(__name__)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The RNG of one sample in one epoch, independent of worker scheduling."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63))


class MaskedDocuments(Dataset):
    """Stage 1: (epoch, index) -> one document encoded and MLM/MAE-masked, ready for packing.

    Opening it measures every document from its text and image headers (no pixel decoded): one that cannot be
    measured raises naming it, or with `skip_invalid` is left out (logged, counted in `skipped`). One whose
    images fail to decode when used raises naming it, or with `skip_invalid` is replaced by the next document
    that decodes (logged), cut to its length so that the micro-batch stays within the token budget."""

    def __init__(
        self,
        documents: Sequence[Document],
        processor: Processor,
        *,
        mlm_rate: float = 0.4,
        mae_rate: float = 0.5,
        seed: int = 0,
        skip_invalid: bool = False,
    ):
        if processor.mask_token_id is None:
            raise ValueError("the tokenizer has no <|mask|> token; stage 1 needs one (load_tokenizer adds it)")
        self.documents, self.processor = documents, processor
        self.mlm_rate, self.mae_rate, self.seed = mlm_rate, mae_rate, seed
        self.skip_invalid = skip_invalid
        self.skipped = Skips(log, "document")
        self._index, self._lengths, self._ids, self._sizes = [], [], [], []
        for i in range(len(documents)):
            try:
                doc = documents[i]
                size = processor.measure(doc.text, [image_size(im, doc.id) for im in doc.images], doc.id)
            except ValueError as error:
                if not skip_invalid:
                    raise
                self.skipped.add("unreadable", str(error))
                continue
            self._index.append(i)
            self._lengths.append(size.tokens)
            self._ids.append(doc.id)
            self._sizes.append(size)

    def __len__(self) -> int:
        return len(self._index)

    def lengths(self) -> list[int]:
        """Each document's encoded length, from its text and image headers (no pixel is decoded)."""
        return list(self._lengths)

    def reference_costs(self) -> list[int]:
        """Each document's bucketing cost in the reference's units (packing.reference_cost, capped at the
        processor's max_length when set), from its text and image headers."""
        return [reference_cost(s.tokens, s.image_tokens, s.images, self.processor.max_length) for s in self._sizes]

    def sample_ids(self) -> list[str]:
        return list(self._ids)

    def __getitem__(self, key: tuple[int, int]) -> EncodedSequence:
        epoch, index = key
        return load_or_stand_in(
            lambda i: self._masked(epoch, i, self._lengths[index]),
            index,
            after(index, len(self)),
            skip=self.skip_invalid,
            log=log,
            what="document",
        )

    def _masked(self, epoch: int, index: int, room: int) -> EncodedSequence:
        """Document `index` encoded (cut to `room` tokens: only a stand-in is ever cut) and masked."""
        doc, proc = self.documents[self._index[index]], self.processor
        if room < self._lengths[index]:
            proc = copy.copy(proc)
            proc.max_length = room
        seq = proc.encode(doc.text, doc.load_images(), doc.id)
        generator = sample_generator(self.seed, epoch, index)
        seq = apply_mlm(
            seq, mask_token_id=proc.mask_token_id, special_ids=proc.special_ids, rate=self.mlm_rate, generator=generator
        )
        return apply_mae(
            seq,
            image_token_id=proc.image_token_id,
            rate=self.mae_rate,
            generator=generator,
            merge_unit=proc.spatial_merge_size**2,
        )


class PackCollator:
    """Worker-side collate: encoded sequences -> one PackedBatch (positions and vision layout included)."""

    def __init__(self, processor: Processor, window_size: int = 112):
        self.image_token_id = processor.image_token_id
        self.spatial_merge_size, self.patch_size = processor.spatial_merge_size, processor.patch_size
        self.window_size = window_size

    def __call__(self, sequences: list[EncodedSequence]) -> PackedBatch:
        return pack_sequences(
            sequences,
            self.image_token_id,
            spatial_merge_size=self.spatial_merge_size,
            window_size=self.window_size,
            patch_size=self.patch_size,
        )


def _kill_daemonic_children() -> None:
    """At exit, multiprocessing terminates its daemonic children (DataLoader workers) with SIGTERM and joins them;
    workers that ignore SIGTERM (below) would make that join, and so the process's exit, wait forever. Registered
    after multiprocessing's own exit handler, so it runs first (atexit is last-in, first-out)."""
    import multiprocessing

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the killed workers as failures
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def stop_owned_by_main():
    """The `worker_init_fn` of DataLoaders whose workers leave SIGTERM/SIGINT to the main process; called in the
    main process as the loader is built, it registers the exit handler above once, after multiprocessing's."""
    import multiprocessing.util  # noqa: F401  (registers multiprocessing's own exit handler first)

    atexit.unregister(_kill_daemonic_children)
    atexit.register(_kill_daemonic_children)
    return ignore_stop_signals


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's `worker_init_fn`: SIGTERM and SIGINT sent to the whole process group (as SLURM,
    systemd and Ctrl-C do) reach the workers too; the main process owns the stop (it finishes the step, saves and
    shuts the workers down), so a worker must not die of them first."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def packed_loader(
    dataset: Dataset,
    sampler: TokenBudgetSampler,
    collator: PackCollator,
    *,
    num_workers: int = 0,
    prefetch_factor: int = 4,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader of PackedBatches; pins memory when CUDA is there (so host-to-device copies overlap)."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
        worker_init_fn=stop_owned_by_main(),
    )


def one_line_errors(batches: Iterable) -> Iterator:
    """Iterate a DataLoader; a ValueError raised in a worker (bad input, whose message names the sample) comes out
    as that one-line ValueError rather than wrapped in the worker's whole traceback."""
    try:
        yield from batches
    except ValueError as error:
        message = str(error)
        if "Original Traceback" not in message:
            raise
        raise ValueError(message.rstrip().splitlines()[-1].partition(": ")[2]) from None
