"""Patch reconstruction (Linear + MSE): forward and the three gradients against the fp64 reference."""

import pytest
import torch

from moca_fast.kernels import patch_reconstruction_loss, patch_reconstruction_reference

from .conftest import CASES, assert_matches, device_for, rounded_pair


@pytest.mark.parametrize("backend,dtype,tol", CASES)
@pytest.mark.parametrize("K,N,H", [(37, 300, 48), (5, 4704, 40)])  # ragged tiles; the MoCa head's N = 4 * 1176
def test_matches_reference(backend, dtype, tol, K, N, H, chunks):
    device = device_for(backend)
    hidden, hidden_ref = rounded_pair(torch.randn(K, H), dtype, device)
    weight, weight_ref = rounded_pair(torch.randn(N, H) / H**0.5, dtype, device)
    bias, bias_ref = rounded_pair(torch.randn(N) * 0.1, dtype, device)
    targets = torch.randn(K, N, device=device).requires_grad_()  # fp32 patches whatever the input dtype; no gradient

    loss = patch_reconstruction_loss(hidden, weight, bias, targets, backend=backend)
    (0.1 * loss).backward()  # a non-unit incoming gradient, as in MLM + 0.1 * MAE
    expected = patch_reconstruction_reference(hidden_ref, weight_ref, bias_ref, targets.detach().cpu().double())
    (0.1 * expected).backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert targets.grad is None
    assert_matches(loss, expected.double(), tol, "loss")
    for name, actual, reference in [
        ("d_hidden", hidden.grad, hidden_ref.grad),
        ("d_weight", weight.grad, weight_ref.grad),
        ("d_bias", bias.grad, bias_ref.grad),
    ]:
        assert actual.dtype == dtype
        assert_matches(actual, reference, tol, name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_rows_gives_zero_loss_and_zero_gradients(backend):
    device = device_for(backend)
    hidden = torch.randn(0, 16, device=device, requires_grad=True)
    weight = torch.randn(50, 16, device=device, requires_grad=True)
    bias = torch.randn(50, device=device, requires_grad=True)
    loss = patch_reconstruction_loss(hidden, weight, bias, torch.randn(0, 50, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_bad_shapes_are_clear_errors():
    hidden, weight, bias = torch.randn(4, 8), torch.randn(10, 8), torch.randn(10)
    with pytest.raises(ValueError, match="targets"):
        patch_reconstruction_loss(hidden, weight, bias, torch.randn(4, 9))
    with pytest.raises(ValueError, match="weight"):
        patch_reconstruction_loss(hidden, torch.randn(10, 7), bias, torch.randn(4, 10))
