"""Shared cases for the kernel tests: (backend, dtype, tolerance) combinations, tiny chunks, comparisons."""

import pytest
import torch

from moca_fast.kernels import _common

# Triton runs on CUDA when there is a GPU, else under the interpreter on CPU tensors: fp32 and fp16, and bf16
# (through the kernels' upcast switch under the interpreter). The chunked torch path runs fp32 and bf16 on CPU.
# Tolerances bound the error relative to the largest reference value (and elementwise relative error): a few
# units of the dtype's last place, far below any real bug.
CASES = [
    pytest.param("torch", torch.float32, 2e-5, id="torch-fp32"),
    pytest.param("torch", torch.bfloat16, 1.6e-2, id="torch-bf16"),
    pytest.param("triton", torch.float32, 2e-5, id="triton-fp32"),
    pytest.param("triton", torch.float16, 2e-3, id="triton-fp16"),
    pytest.param("triton", torch.bfloat16, 1.6e-2, id="triton-bf16"),
]


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.fixture(params=[False, True], ids=["one-chunk", "tiny-chunks"])
def chunks(request, monkeypatch):
    """Run once with the default chunk budget and once with one so small that every chunked loop iterates."""
    if request.param:
        monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 1500)
    return request.param


def rounded_pair(x: torch.Tensor, dtype: torch.dtype, device: str = "cpu"):
    """(x in `dtype` on `device` as a leaf needing grad, the same values in fp64 on the CPU as a leaf needing
    grad): the reference sees exactly the kernel's inputs, so any difference is the kernel's own error."""
    low = x.to(dtype)
    return low.detach().to(device).requires_grad_(), low.double().requires_grad_()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str):
    assert actual.dtype != torch.float64
    actual = actual.cpu()
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")
