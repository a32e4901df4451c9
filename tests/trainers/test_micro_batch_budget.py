"""Stage-1 micro-batches in the reference's cost units hold the reference's samples: on the same documents, the
micro-batches of `micro_batch_budget: reference_cost` are the reference path's cost buckets (bench/reference_path.py,
costs taken from the encoded sequences), so a micro-batch and an optimizer step hold as many samples as the
reference's; `micro_batch_budget: tokens` packs more."""

import pytest

from bench.reference_path import BUCKET_COST, MAX_COST, cost_buckets, sample_cost
from moca_fast.config import TrainConfig
from moca_fast.data.loader import MaskedDocuments
from moca_fast.data.processor import Processor
from moca_fast.data.realistic import realistic_documents
from moca_fast.data.synthetic import make_documents
from moca_fast.trainers.cpt import micro_batch_sampler

GRAD_ACCUM = 4


def _config(budget: str) -> TrainConfig:
    return TrainConfig(
        stage="cpt",
        model="tiny",
        data="unused",
        output_dir="unused",
        grad_accum=GRAD_ACCUM,
        tokens_per_micro_batch=BUCKET_COST,
        max_length=MAX_COST,
        micro_batch_budget=budget,
    )


@pytest.fixture(scope="module")
def documents(tokenizer):
    """Documents at the reference's pixel budget and max_len, each encoded as the reference path sees it."""
    processor = Processor(tokenizer, min_pixels=256 * 28 * 28, max_pixels=1024 * 28 * 28, max_length=MAX_COST)
    documents = realistic_documents(60, seed=11) + make_documents(60, seed=11)  # pages at the cap, text, photos
    samples = MaskedDocuments(documents, processor, seed=0)
    encoded = [samples[(0, i)] for i in range(len(samples))]
    return samples, [sample_cost(s, processor.image_token_id) for s in encoded]


def _per_step(batches: list[list[int]]) -> list[int]:
    return [sum(len(b) for b in batches[k : k + GRAD_ACCUM]) for k in range(0, len(batches), GRAD_ACCUM)]


def test_cost_units_give_the_references_micro_batches(documents):
    samples, costs = documents
    assert samples.reference_costs() == costs  # measured from headers = counted on the encoded sequences
    ours = micro_batch_sampler(_config("reference_cost"), samples.lengths(), samples.reference_costs()).plan(0)
    reference = cost_buckets(costs, BUCKET_COST)

    # The same micro-batches up to samples of equal cost (the order among ties is the shuffle's).
    def cost_groups(batches):
        return sorted(tuple(sorted(costs[i] for i in b)) for b in batches)

    assert cost_groups(ours) == cost_groups(reference)
    assert sorted(map(len, ours)) == sorted(map(len, reference))  # samples per micro-batch
    assert sorted(i for b in ours for i in b) == list(range(len(costs)))
    # Samples per optimizer step of grad_accum micro-batches: in the reference's batch order, step by step equal.
    in_reference_order = sorted(ours, key=lambda b: [-costs[i] for i in sorted(b, key=lambda i: -costs[i])])
    assert _per_step(in_reference_order) == _per_step(reference)
    assert len(_per_step(ours)) == len(_per_step(reference)) and sum(_per_step(ours)) == sum(_per_step(reference))


def test_token_budgets_pack_more_samples_per_step(documents):
    samples, costs = documents
    by_cost = micro_batch_sampler(_config("reference_cost"), samples.lengths(), samples.reference_costs()).plan(0)
    by_tokens = micro_batch_sampler(_config("tokens"), samples.lengths(), samples.reference_costs()).plan(0)
    lengths = samples.lengths()
    assert all(sum(lengths[i] for i in b) <= BUCKET_COST for b in by_tokens)
    assert all(sum(costs[i] for i in b) <= BUCKET_COST for b in by_cost)
    assert len(by_tokens) < len(by_cost)  # fewer, fuller micro-batches: more samples per step than the reference


def test_unknown_budget_is_refused():
    with pytest.raises(ValueError, match="micro_batch_budget"):
        _config("cost")
