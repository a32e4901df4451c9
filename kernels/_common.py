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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's when autocast is on for x's device, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


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


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_to_fill(device: torch.device) -> int:
    """How many programs a launch should have to occupy the device: two per SM on CUDA. The interpreter runs
    programs one after another; two keep the multi-program paths (split reductions) exercised there too."""
    if device.type == "cuda":
        return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 2


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
