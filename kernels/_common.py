"""Pieces shared by the fused losses: backend choice, tile sizes, memory-bounded chunking and the A·Bᵀ tile.

Every loss has two implementations behind one entry point: Triton kernels for CUDA tensors and a chunked
torch path for everything else. `backend="triton"` on CPU tensors runs the kernels in Triton's interpreter
(TRITON_INTERPRET=1 set before triton is imported); that is how the tests exercise them without a GPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BACKENDS = ("auto", "triton", "torch")

# Largest number of elements a chunked step may hold in one temporary (logits or their gradient): 32 Mi
# elements, 64 MiB in bf16. Read at call time, so tests shrink it to exercise many chunks on small shapes.
CHUNK_ELEMENTS = 1 << 25

# The kernels' masked logit: finite, so that a tile row with every column masked keeps the online log-sum-exp
# free of inf - inf; exp(MASKED - anything real) is exactly 0.
MASKED = tl.constexpr(-1.0e30)


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The matmul operands of a fused loss as autocast would give them to a matmul: cast to autocast's dtype when
    it is on for their device (the cast is differentiable: gradients return in each input's dtype), else as they
    are. Custom ops get no autocast casting of their own, so without this an fp32 master weight and fp32 hidden
    states would reach the kernels under bf16 autocast: fp32 dots, no tensor cores."""
    kind = tensors[0].device.type
    if not torch.is_autocast_enabled(kind):
        return tensors
    return tuple(t.to(torch.get_autocast_dtype(kind)) for t in tensors)


def autocast_off(x: torch.Tensor):
    """Inside a loss's op: its own precision policy (fp32 accumulation), whatever autocast the caller runs."""
    return torch.autocast(x.device.type, enabled=False)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' -> 'triton' for CUDA tensors, 'torch' otherwise; 'triton' on CPU tensors needs the interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda and not interpreting():
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return backend


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch options of the matmul-shaped kernels."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    upcast: bool  # convert operands to fp32 after loading (the interpreter mis-computes bf16 arithmetic)


def tiles_for(dtype: torch.dtype) -> Tiles:
    # 128x128 output tiles keep Hopper's tensor cores busy; fp32 operands (exact "ieee" dots) halve block_k to
    # keep three pipeline stages in shared memory. The interpreter ignores warps and stages.
    block_k = 32 if dtype == torch.float32 else 64
    return Tiles(128, 128, block_k, num_warps=8, num_stages=3, upcast=interpreting() and dtype == torch.bfloat16)


@dataclass(frozen=True)
class Multiprocessors:
    """A GPU's streaming multiprocessors: how many, and what one holds at once."""

    count: int
    registers: int = 65536
    shared_bytes: int = 233472  # Hopper: 228 KiB per SM
    threads: int = 2048
    blocks: int = 32


@functools.cache
def multiprocessors(device_index: int) -> Multiprocessors:
    props = torch.cuda.get_device_properties(device_index)
    limits = {
        field: getattr(props, name)
        for field, name in (
            ("registers", "regs_per_multiprocessor"),
            ("shared_bytes", "shared_memory_per_multiprocessor"),
            ("threads", "max_threads_per_multi_processor"),
        )
        if getattr(props, name, None)
    }
    return Multiprocessors(props.multi_processor_count, **limits)


def resident_blocks(registers: int, shared_bytes: int, num_warps: int, sm: Multiprocessors, warp_size: int = 32) -> int:
    """How many blocks of a kernel one SM runs at once, from the compiled kernel's registers per thread and shared
    memory per block: registers are allocated per warp in units of 256, and CUDA reserves 1 KiB of shared memory
    per block."""
    registers_per_warp = -(-registers * warp_size // 256) * 256
    by_registers = sm.registers // registers_per_warp // num_warps if registers else sm.blocks
    by_shared = sm.shared_bytes // (shared_bytes + 1024)
    by_threads = sm.threads // (num_warps * warp_size)
    return max(1, min(by_registers, by_shared, by_threads, sm.blocks))


def resident_programs(kernel, device: torch.device, *args, **kwargs) -> int:
    """How many programs of `kernel`, launched with these arguments, run at once on `device`: its compiled
    registers and shared memory against the device's SMs. The interpreter runs programs one after another: 2 keep
    the multi-program paths (split reductions) exercised there."""
    if device.type != "cuda":
        return 2
    compiled = kernel.warmup(*args, grid=(1,), **kwargs)  # compiles (or finds) the kernel without launching it
    compiled._init_handles()  # loads it: the driver reports its registers
    sm = multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return sm.count * resident_blocks(compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps, sm)


def balanced_splits(row_tiles: int, col_tiles: int, slots: int) -> int:
    """Into how many programs to split each row tile's columns so that the launch, row_tiles x splits programs of
    ceil(col_tiles / splits) column tiles each on `slots` concurrent program slots, wastes the least of its last
    wave: the split count that maximises the busy fraction of slots x waves x the longest program's tiles (the
    fewest splits among equals)."""

    def busy(splits: int) -> float:
        waves = -(-row_tiles * splits // slots)
        return row_tiles * col_tiles / (slots * waves * -(-col_tiles // splits))

    return max(range(1, col_tiles + 1), key=lambda s: (round(busy(s), 6), -s))


def chunk_bounds(length: int, elements_per_index: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Split range(length) into [start, end) pieces holding at most CHUNK_ELEMENTS elements when one index costs
    `elements_per_index`; every width is a multiple of `multiple` (at least one multiple)."""
    width = CHUNK_ELEMENTS // max(elements_per_index, 1) // multiple * multiple
    width = max(width, multiple)
    return [(start, min(start + width, length)) for start in range(0, length, width)]


@triton.jit
def dot_tile(
    a_ptr,
    b_ptr,
    offs_m,
    offs_n,
    m_limit,
    n_limit,
    K,
    stride_a,
    stride_b,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """fp32 tile A[offs_m, :] @ B[offs_n, :]ᵀ of two row-major matrices with unit stride along K.

    Rows at or beyond m_limit / n_limit and the ragged end of K read as zero."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * stride_b + offs_k[None, :]
    a_rows = offs_m[:, None] < m_limit
    b_rows = offs_n[:, None] < n_limit
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        in_k = offs_k[None, :] < K - k
        a = tl.load(a_ptrs, mask=a_rows & in_k, other=0.0)
        b = tl.load(b_ptrs, mask=b_rows & in_k, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc
