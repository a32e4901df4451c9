"""The stage-1 loader: exact lengths without decoding, worker-count-independent batches, exact resume; bad documents
raise naming the sample (one line, even from a worker) or, with skip_invalid, are skipped or stood in for."""

import pytest
import torch

from moca_fast.data.documents import Document
from moca_fast.data.loader import MaskedDocuments, PackCollator, one_line_errors, packed_loader
from moca_fast.data.packing import TokenBudgetSampler
from moca_fast.data.synthetic import make_documents, png_bytes
from moca_fast.data.tokens import IMAGE_PLACEHOLDER as PH


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
    return (
        a.sample_ids == b.sample_ids
        and torch.equal(a.input_ids, b.input_ids)
        and torch.equal(a.pixel_values, b.pixel_values)
        and torch.equal(a.mlm_labels, b.mlm_labels)
        and torch.equal(a.mae_targets, b.mae_targets)
    )


def test_batches_do_not_depend_on_worker_count_and_resume_exactly(samples, processor):
    serial = _batches(samples, processor)
    parallel = _batches(samples, processor, workers=2)
    assert len(serial) == len(parallel) and all(_same(a, b) for a, b in zip(serial, parallel))
    resumed = _batches(samples, processor, start=3)
    assert len(resumed) == len(serial) - 3 and all(_same(a, b) for a, b in zip(serial[3:], resumed))
    other_epoch = _batches(samples, processor, epoch=2)
    assert not all(_same(a, b) for a, b in zip(serial, other_epoch))  # new order and masks each epoch


def _with_bad_image(data: bytes, at: int = 3):
    documents = make_documents(12, seed=3)
    return documents[:at] + [Document("bad", f"{PH}a picture", [data])] + documents[at:]


def test_a_document_unreadable_when_opened_raises_or_is_skipped(processor, caplog):
    documents = _with_bad_image(b"not an image")
    with pytest.raises(ValueError, match="sample bad: cannot decode image bytes"):
        MaskedDocuments(documents, processor)
    with caplog.at_level("WARNING", logger="moca_fast.data.loader"):
        samples = MaskedDocuments(documents, processor, skip_invalid=True)
    assert len(samples) == len(documents) - 1 and "bad" not in samples.sample_ids()
    assert samples.skipped.total() == 1 and "skipped document 1: sample bad: cannot decode" in caplog.text


def test_a_document_failing_on_use_raises_or_gets_a_stand_in_cut_to_fit(processor, make_image, caplog):
    truncated = png_bytes(make_image(56, 56))[:200]  # its header reads, its pixels do not
    documents = _with_bad_image(truncated)
    strict = MaskedDocuments(documents, processor)
    with pytest.raises(ValueError, match="sample bad: cannot decode image bytes"):
        strict[(0, 3)]
    samples = MaskedDocuments(documents, processor, skip_invalid=True)
    with caplog.at_level("WARNING", logger="moca_fast.data.loader"):
        stand_in = samples[(0, 3)]
    assert stand_in.sample_id != "bad" and len(stand_in) <= samples.lengths()[3]
    assert "skipped document 3 on use: sample bad: cannot decode" in caplog.text and "takes its place" in caplog.text
    assert samples[(0, 3)].sample_id == stand_in.sample_id  # the same choice every time (a resume makes it too)


def test_a_bad_sample_in_a_worker_is_a_one_line_error(processor, make_image):
    samples = MaskedDocuments(_with_bad_image(png_bytes(make_image(56, 56))[:200]), processor)
    sampler = TokenBudgetSampler(samples.lengths(), 256, seed=7)
    loader = packed_loader(samples, sampler, PackCollator(processor), num_workers=1)
    with pytest.raises(ValueError) as error:
        list(one_line_errors(loader))
    assert str(error.value).startswith("sample bad: cannot decode image bytes") and "\n" not in str(error.value)
