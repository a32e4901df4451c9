"""Backend choice and chunking shared by the kernels."""

import pytest
import torch

from moca_fast.kernels import _common


def test_auto_backend_follows_the_device_and_unknown_names_are_rejected():
    assert _common.resolve_backend("auto", torch.zeros(2)) == "torch"
    if torch.cuda.is_available():
        assert _common.resolve_backend("auto", torch.zeros(2, device="cuda")) == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        _common.resolve_backend("cuda", torch.zeros(2))


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
