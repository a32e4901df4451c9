"""Masked-LM cross-entropy: forward and both gradients against the fp64 reference, both backends."""

import pytest
import torch

from moca_fast.kernels import masked_lm_ce_reference, masked_lm_cross_entropy

from .conftest import CASES, assert_matches, device_for, rounded_pair


def _check(backend, dtype, tol, M, V, H, logit_scale=1.0):
    device = device_for(backend)
    hidden, hidden_ref = rounded_pair(torch.randn(M, H) * logit_scale / H**0.5, dtype, device)
    weight, weight_ref = rounded_pair(torch.randn(V, H), dtype, device)
    labels = torch.randint(0, V, (M,))

    loss = masked_lm_cross_entropy(hidden, weight, labels.to(device), backend=backend)
    loss.backward()
    expected = masked_lm_ce_reference(hidden_ref, weight_ref, labels)
    expected.backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert hidden.grad.dtype == weight.grad.dtype == dtype
    assert_matches(loss, expected.double(), tol, "loss")
    assert_matches(hidden.grad, hidden_ref.grad, tol, "d_hidden")
    assert_matches(weight.grad, weight_ref.grad, tol, "d_weight")


@pytest.mark.parametrize("backend,dtype,tol", CASES)
@pytest.mark.parametrize("V", [257, 1000])  # not multiples of the 128-column tiles
def test_matches_reference(backend, dtype, tol, V, chunks):
    _check(backend, dtype, tol, M=37, V=V, H=48)


@pytest.mark.parametrize("backend,dtype,tol", CASES)
def test_large_logits_stay_exact(backend, dtype, tol):
    """Logits up to ±~60: the online log-sum-exp must rescale, not overflow."""
    _check(backend, dtype, tol, M=9, V=300, H=40, logit_scale=20.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_rows_gives_zero_loss_and_zero_gradients(backend):
    device = device_for(backend)
    hidden = torch.randn(0, 16, device=device, requires_grad=True)
    weight = torch.randn(100, 16, device=device, requires_grad=True)
    loss = masked_lm_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tied_embedding_gradients_add(backend):
    """The head is the embedding table: both uses of the one Parameter contribute to its gradient."""
    V, H, T = 300, 32, 24
    ids, labels = torch.randint(0, V, (T,)), torch.randint(0, V, (T,))
    mix = torch.randn(H, H, dtype=torch.float64) / H**0.5

    def loss_and_grad(loss_fn, dtype, device):
        embedding = torch.nn.Embedding(V, H, dtype=dtype)
        with torch.no_grad():
            embedding.weight.copy_(torch.randn(V, H, generator=torch.Generator().manual_seed(1)))
        embedding.to(device)
        hidden = torch.tanh(embedding(ids.to(device)) @ mix.to(device, dtype))
        loss = loss_fn(hidden, embedding.weight, labels.to(device))
        loss.backward()
        return loss, embedding.weight.grad

    ours = lambda h, w, y: masked_lm_cross_entropy(h, w, y, backend=backend)
    loss, grad = loss_and_grad(ours, torch.float32, device_for(backend))
    expected_loss, expected_grad = loss_and_grad(masked_lm_ce_reference, torch.float64, "cpu")
    assert_matches(loss, expected_loss.double(), 2e-5, "loss")
    assert_matches(grad, expected_grad, 2e-5, "d_embedding")
    assert grad[ids].abs().sum() > 0


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="weight"):
        masked_lm_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        masked_lm_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        masked_lm_cross_entropy(torch.randn(4, 8), torch.randn(10, 8).half(), torch.zeros(4, dtype=torch.long))
