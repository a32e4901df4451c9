"""Each fused loss scales its gradients by the gradient it receives: a loss weighted in a sum (MAE's 0.1, a
Matryoshka weight, GradCache's cached gradient) must pass its weight on. The other kernel tests backpropagate
1.0 and cannot tell a backward that ignores its incoming gradient from a correct one."""

import pytest
import torch

from moca_fast.kernels import (
    info_nce_loss,
    info_nce_reference,
    masked_lm_ce_reference,
    masked_lm_cross_entropy,
    patch_reconstruction_loss,
    patch_reconstruction_reference,
)

from .conftest import assert_matches, device_for, rounded_pair

WEIGHT = -2.75  # negative and not a power of two: a dropped, squared or absolute scale all show


def _masked_lm(device, backend):
    hidden, weight = torch.randn(13, 24) / 24**0.5, torch.randn(150, 24)
    labels = torch.randint(0, 150, (13,))
    return (
        [hidden, weight],
        lambda h, w: masked_lm_cross_entropy(h, w, labels.to(device), backend=backend),
        lambda h, w: masked_lm_ce_reference(h, w, labels),
    )


def _patches(device, backend):
    hidden, weight, bias, targets = (
        torch.randn(6, 20),
        torch.randn(40, 20) / 20**0.5,
        torch.randn(40),
        torch.randn(6, 40),
    )
    return (
        [hidden, weight, bias],
        lambda h, w, b: patch_reconstruction_loss(h, w, b, targets.to(device), backend=backend),
        lambda h, w, b: patch_reconstruction_reference(h, w, b, targets.double()),
    )


def _info_nce(device, backend):
    queries, positives, negatives = torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 2, 16)
    targets = torch.arange(5)
    return (
        [queries, positives, negatives],
        lambda q, p, n: info_nce_loss(q, p, n, targets.to(device), temperature=0.05, backend=backend),
        lambda q, p, n: info_nce_reference(q, p, n, targets, temperature=0.05),
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", [_masked_lm, _patches, _info_nce], ids=["masked_lm", "patches", "info_nce"])
def test_gradients_carry_the_incoming_gradient(backend, case):
    torch.manual_seed(0)
    device = device_for(backend)
    inputs, ours, reference = case(device, backend)
    pairs = [rounded_pair(x, torch.float32, device) for x in inputs]
    (ours(*[p[0] for p in pairs]) * WEIGHT).backward()
    (reference(*[p[1] for p in pairs]) * WEIGHT).backward()
    for i, (actual, expected) in enumerate(pairs):
        assert_matches(actual.grad, expected.grad, 2e-5, f"gradient of input {i}")
