"""InfoNCE over gathered embeddings: forward and the gradients of queries, positives and negatives against the
fp64 reference, with and without normalisation, hard negatives and duplicate masking."""

import pytest
import torch

from moca_fast.kernels import info_nce_loss, info_nce_reference

from .conftest import CASES, assert_matches, device_for, rounded_pair

B, G, D = 24, 150, 40  # G spans two 128-column tiles, ragged


def _embeddings(dtype, r: int, normalize: bool, device: str):
    scale = 1.0 if normalize else 0.03  # unnormalised dots of size ~1 / temperature, as cosines would give
    pairs = [rounded_pair(torch.randn(*shape) * scale, dtype, device) for shape in [(B, D), (G, D), (B, r, D)]]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _check(backend, dtype, tol, r, normalize, duplicate_ids, temperature=0.03):
    device = device_for(backend)
    (queries, positives, negatives), refs = _embeddings(dtype, r, normalize, device)
    targets = torch.randperm(G)[:B]

    ids = None if duplicate_ids is None else duplicate_ids.to(device)
    targets_on_device = targets.to(device)
    loss = info_nce_loss(queries, positives, negatives, targets_on_device, temperature, normalize, ids, backend=backend)
    loss.backward()
    expected = info_nce_reference(*refs, targets, temperature, normalize, duplicate_ids)
    expected.backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_matches(loss, expected.double(), tol, "loss")
    names = ["d_queries", "d_positives", "d_negatives"]
    for name, actual, reference in zip(names, [queries, positives, negatives], refs, strict=True):
        assert actual.grad.dtype == dtype
        assert_matches(actual.grad, reference.grad, tol, name)
    return loss


@pytest.mark.parametrize("backend,dtype,tol", CASES)
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("r", [0, 2], ids=["r0", "r2"])
def test_matches_reference(backend, dtype, tol, normalize, r, chunks):
    _check(backend, dtype, tol, r, normalize, duplicate_ids=None)


@pytest.mark.parametrize("backend,dtype,tol", CASES)
def test_duplicate_targets_leave_the_denominator(backend, dtype, tol, chunks):
    # ~4 copies of each content among the gathered positives
    duplicate_ids = torch.randint(0, 40, (G,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    masked = _check(backend, dtype, tol, r=2, normalize=True, duplicate_ids=duplicate_ids)
    torch.manual_seed(0)
    unmasked = _check(backend, dtype, tol, r=2, normalize=True, duplicate_ids=torch.arange(G))
    assert masked < unmasked  # same inputs (same seed): fewer negatives, lower loss


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_negatives_none_equals_zero_negatives(backend):
    device = device_for(backend)
    queries, positives = torch.randn(B, D, device=device), torch.randn(G, D, device=device)
    targets = torch.randperm(G, device=device)[:B]
    without = info_nce_loss(queries, positives, None, targets, backend=backend)
    empty = info_nce_loss(queries, positives, torch.empty(B, 0, D, device=device), targets, backend=backend)
    assert torch.equal(without, empty)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_queries_gives_zero_loss_and_zero_gradients(backend):
    device = device_for(backend)
    positives = torch.randn(G, D, device=device, requires_grad=True)
    queries, negatives = torch.randn(0, D, device=device), torch.randn(0, 2, D, device=device)
    targets = torch.zeros(0, dtype=torch.long, device=device)
    loss = info_nce_loss(queries, positives, negatives, targets, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(positives.grad, torch.zeros_like(positives))


def test_bad_shapes_are_clear_errors():
    queries, positives, targets = torch.randn(4, 8), torch.randn(6, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="negatives"):
        info_nce_loss(queries, positives, torch.randn(4, 2, 7), targets)
    with pytest.raises(ValueError, match="targets"):
        info_nce_loss(queries, positives, None, targets[:3])
    with pytest.raises(ValueError, match="duplicate_ids"):
        info_nce_loss(queries, positives, None, targets, duplicate_ids=torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_inputs(backend):
    """Views (a transposed positive matrix, every other duplicate id) give the same loss as their copies."""
    device = device_for(backend)
    queries, positives_t = torch.randn(B, D, device=device), torch.randn(D, G, device=device)
    negatives = torch.randn(B, D, 2, device=device).transpose(1, 2)
    targets, ids = torch.randperm(G, device=device)[:B], torch.randint(0, 40, (2 * G,), device=device)
    strided = info_nce_loss(queries, positives_t.T, negatives, targets, duplicate_ids=ids[::2], backend=backend)
    positives, negatives, ids = positives_t.T.contiguous(), negatives.contiguous(), ids[::2].contiguous()
    copied = info_nce_loss(queries, positives, negatives, targets, duplicate_ids=ids, backend=backend)
    torch.testing.assert_close(strided, copied)
