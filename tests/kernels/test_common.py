"""Backend choice and chunking shared by the kernels."""

import pytest
import torch

from moca_fast.kernels import _common

H100_SXM = _common.Multiprocessors(132)  # an H100 SXM: 132 SMs with Hopper's per-SM limits


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


def test_resident_blocks_follow_registers_shared_memory_and_threads():
    sm = H100_SXM
    # 254 registers x 8 warps: 8,192 registers a warp (units of 256), 8 warps fit -> one block, whatever else fits.
    assert _common.resident_blocks(254, 98304, 8, sm) == 1
    assert _common.resident_blocks(128, 98304, 8, sm) == 2  # 16 warps' registers; 2 x (96 + 1) KiB shared
    assert _common.resident_blocks(128, 160 * 1024, 8, sm) == 1  # shared memory binds
    assert _common.resident_blocks(32, 0, 4, sm) == 16  # threads bind: 2,048 / 128
    assert _common.resident_blocks(16, 0, 1, sm) == 32  # the block limit binds


def _busy(row_tiles, col_tiles, slots, splits):
    waves = -(-row_tiles * splits // slots)
    return row_tiles * col_tiles / (slots * waves * -(-col_tiles // splits))


@pytest.mark.parametrize(
    "row_tiles,col_tiles,slots",
    [(40, 1187, 132), (28, 1188, 132), (40, 1187, 264), (2, 2, 132), (1, 8, 2), (300, 1187, 132)],
)
def test_balanced_splits_leave_the_last_wave_busy(row_tiles, col_tiles, slots):
    splits = _common.balanced_splits(row_tiles, col_tiles, slots)
    best = max(_busy(row_tiles, col_tiles, slots, s) for s in range(1, col_tiles + 1))
    assert 1 <= splits <= col_tiles and _busy(row_tiles, col_tiles, slots, splits) >= best - 1e-6
    if (row_tiles, col_tiles, slots) == (40, 1187, 132):  # 3B masked-LM: 5,120 rows, 151,936 columns, 1 block/SM
        assert splits == 33 and _busy(row_tiles, col_tiles, slots, splits) > 0.99
        # "Two programs per SM" gave 7 splits: 280 programs in 3 waves of 132, the last one mostly idle.
        assert _busy(row_tiles, col_tiles, slots, 7) < 0.71
