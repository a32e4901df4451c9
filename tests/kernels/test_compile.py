"""torch.compile(fullgraph=True) over each loss, forward and backward: one opaque custom op, whose loss and
gradients are the fp64 reference's (kernels/reference.py) on the same inputs."""

import functools

import pytest
import torch

from moca_fast.kernels import (
    info_nce_loss,
    info_nce_reference,
    masked_lm_ce_reference,
    masked_lm_cross_entropy,
    maxsim_info_nce,
    maxsim_info_nce_reference,
    patch_reconstruction_loss,
    patch_reconstruction_reference,
)

from .conftest import assert_matches, device_for

FP32_TOLERANCE = 2e-5  # as the kernel tests' fp32 cases
NO_GRADIENT = {"patch_reconstruction": {3}}  # floating inputs the op gives no gradient: the patch targets

M, H, V = 16, 32, 300


def _inputs(name, device):
    """(the loss, its fp64 oracle, the inputs on `device`)."""
    if name == "masked_lm_ce":
        inputs = [torch.randn(M, H), torch.randn(V, H), torch.randint(0, V, (M,))]
        return masked_lm_cross_entropy, masked_lm_ce_reference, [x.to(device) for x in inputs]
    if name == "patch_reconstruction":
        inputs = [torch.randn(M, H), torch.randn(V, H) / 8, torch.randn(V), torch.randn(M, V)]
        return patch_reconstruction_loss, patch_reconstruction_reference, [x.to(device) for x in inputs]
    if name == "maxsim_info_nce":  # 4 queries, 3 positives and one hard negative a query, ragged
        q_tokens, d_tokens = torch.randn(40, H), torch.randn(60, H)
        q_cu, d_cu = torch.tensor([0, 3, 10, 24, 40]), torch.tensor([0, 1, 20, 35, 41, 50, 55, 60])
        settings = dict(temperature=0.05, negatives=1)
        tensors = [x.to(device) for x in (q_tokens, q_cu, d_tokens, d_cu, torch.tensor([2, 0, 1, 1]))]
        loss_fn, reference_fn = (functools.partial(f, **settings) for f in (maxsim_info_nce, maxsim_info_nce_reference))
        return loss_fn, reference_fn, tensors
    queries, positives, negatives = torch.randn(M, H), torch.randn(40, H), torch.randn(M, 2, H)
    targets, duplicate_ids = torch.randperm(40)[:M], torch.randint(0, 20, (40,))
    tensors = [x.to(device) for x in (queries, positives, negatives, targets)]
    return info_nce_loss, info_nce_reference, [*tensors, 0.05, True, duplicate_ids.to(device)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["masked_lm_ce", "patch_reconstruction", "info_nce", "maxsim_info_nce"])
def test_compiles_to_one_op_with_the_references_loss_and_gradients(name, backend):
    loss_fn, reference_fn, inputs = _inputs(name, device_for(backend))
    graphs = []

    def inductor_recording_graphs(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    def step(*args):
        return 3.0 * loss_fn(*args, backend=backend)  # a non-unit gradient into the op

    def run(fn, dtype=None):
        leaves = [
            x.detach().to(dtype or x.dtype, copy=True).requires_grad_()
            if torch.is_tensor(x) and x.is_floating_point()
            else x
            for x in inputs
        ]
        loss = fn(*leaves)
        loss.backward()
        return loss, [x.grad for x in leaves if torch.is_tensor(x) and x.requires_grad]

    torch._dynamo.reset()
    compiled_loss, compiled_grads = run(torch.compile(step, fullgraph=True, backend=inductor_recording_graphs))
    expected_loss, expected_grads = run(lambda *args: 3.0 * reference_fn(*args).double(), torch.float64)

    (graph,) = graphs
    custom_ops = [n.target for n in graph.graph.nodes if "moca_fast" in str(n.target)]
    assert [str(op) for op in custom_ops] == [f"moca_fast.{name}.default"]
    assert_matches(compiled_loss.detach(), expected_loss.detach().cpu(), FP32_TOLERANCE, f"{name} loss")
    for i, (compiled, expected) in enumerate(zip(compiled_grads, expected_grads, strict=True)):
        if i in NO_GRADIENT.get(name, ()):
            assert compiled is None
            continue
        assert_matches(compiled, expected.cpu(), FP32_TOLERANCE, f"{name} gradient {i}")
