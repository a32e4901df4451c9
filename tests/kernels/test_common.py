"""Backend choice and chunking shared by the kernels."""

import pytest
import torch

from moca_fast.kernels import _common


def test_auto_backend_is_torch_on_cpu_and_rejects_unknown_names():
    x = torch.zeros(2)
    assert _common.resolve_backend("auto", x) == "torch"
    assert _common.resolve_backend("triton", x) == "triton"  # the interpreter is on in tests
    with pytest.raises(ValueError, match="backend must be one of"):
        _common.resolve_backend("cuda", x)


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _common.resolve_backend("triton", torch.zeros(2))


@pytest.mark.parametrize("length,per_index,multiple", [(1000, 37, 1), (1000, 37, 128), (5, 10**9, 1), (0, 4, 1)])
def test_chunk_bounds_cover_the_range_within_budget(monkeypatch, length, per_index, multiple):
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 4096)
    bounds = _common.chunk_bounds(length, per_index, multiple)
    assert [i for start, end in bounds for i in range(start, end)] == list(range(length))
    widths = [end - start for start, end in bounds]
    assert all(w % multiple == 0 for w in widths[:-1])
    assert all(w * per_index <= 4096 or w == multiple for w in widths)
