"""The stage-1 loader: exact lengths without decoding, worker-count-independent batches, exact resume."""

import pytest
import torch

from moca_fast.data.loader import MaskedDocuments, PackCollator, packed_loader
from moca_fast.data.packing import TokenBudgetSampler
from moca_fast.data.synthetic import make_documents


@pytest.fixture(scope="module")
def samples(processor):
    return MaskedDocuments(make_documents(40, seed=3), processor, seed=5)


def _batches(samples, processor, *, workers=0, start=0, epoch=1):
    sampler = TokenBudgetSampler(samples.lengths(), 256, seed=7, sample_ids=samples.sample_ids())
    sampler.set_epoch(epoch, start=start)
    return list(packed_loader(samples, sampler, PackCollator(processor), num_workers=workers))


def test_lengths_equal_encoded_lengths(samples):
    lengths = samples.lengths()
    for i in range(len(samples)):
        assert len(samples[(0, i)]) == lengths[i]


def test_every_sample_once_within_budget_and_masked(samples, processor):
    batches = _batches(samples, processor)
    ids = [sid for b in batches for sid in b.sample_ids]
    assert sorted(ids) == sorted(samples.sample_ids())
    for b in batches:
        assert b.num_tokens <= 256
        assert (b.input_ids[b.mlm_index] == processor.mask_token_id).all()
        assert b.mae_targets.shape[0] == 4 * b.mae_index.numel()


def _same(a, b):
    return (a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
            and torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.mlm_labels, b.mlm_labels)
            and torch.equal(a.mae_targets, b.mae_targets))


def test_batches_do_not_depend_on_worker_count_and_resume_exactly(samples, processor):
    serial = _batches(samples, processor)
    parallel = _batches(samples, processor, workers=2)
    assert len(serial) == len(parallel) and all(_same(a, b) for a, b in zip(serial, parallel))
    resumed = _batches(samples, processor, start=3)
    assert len(resumed) == len(serial) - 3 and all(_same(a, b) for a, b in zip(serial[3:], resumed))
    other_epoch = _batches(samples, processor, epoch=2)
    assert not all(_same(a, b) for a, b in zip(serial, other_epoch))  # new order and masks each epoch
