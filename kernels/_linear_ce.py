"""Cross-entropy over logits z = (rows @ colsᵀ) · row_scale · col_scale without storing z: the engine shared
by the masked-LM loss (rows = hidden states, cols = LM head) and InfoNCE (rows = queries, cols = positives).

Forward: one pass of blockwise online log-sum-exp over column tiles gives each row's log-normaliser `lse` and
its target logit; nothing of size [M, V] is written. Backward: the logits are recomputed tile by tile and turned
into their gradient dz = (softmax - onehot) · grad_scale · scales right where they are formed; dz exists only
for a bounded band of columns at a time (common.CHUNK_ELEMENTS), from which tensor-core GEMMs form
d_rows += dz @ cols[band] and d_cols[band] = dzᵀ @ rows. Every gradient is exact: no tile is skipped.

Optional false-negative masking: with `col_groups`, a column j other than row i's label is left out of row i's
normaliser when col_groups[j] == col_groups[label_i].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from . import _common as common
from ._common import MASKED, dot_tile


@dataclass(frozen=True)
class LogitTerms:
    """What turns rows @ colsᵀ into logits: per-row and per-column fp32 scales and false-negative groups."""

    row_scale: torch.Tensor | None = None  # [M] fp32
    col_scale: torch.Tensor | None = None  # [V] fp32
    col_groups: torch.Tensor | None = None  # [V] integer ids; equal ids = same content


def forward(rows, cols, labels, terms: LogitTerms, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp and target logit, both [M] fp32."""
    if rows.shape[0] == 0:
        empty = rows.new_empty(0, dtype=torch.float32)
        return empty, empty.clone()
    if backend == "triton":
        return _triton_forward(rows, cols, labels, terms)
    return _torch_forward(rows, cols, labels, terms)


def backward(rows, cols, labels, lse, grad_scale, terms: LogitTerms, backend: str):
    """Gradients of grad_scale · Σ_i (lse_i - z_i,label_i) with the scales held constant.

    `lse` may include columns this engine does not see (InfoNCE's own negatives). Returns d_rows in fp32 and
    d_cols in cols' dtype."""
    d_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
    if rows.shape[0] == 0:
        return d_rows, torch.zeros_like(cols)
    if backend == "triton":
        tiles = common.tiles_for(rows.dtype)
        bands = common.chunk_bounds(cols.shape[0], rows.shape[0], multiple=tiles.block_n)
        dz_band = _triton_dlogits(rows, cols, labels, lse, grad_scale, terms, tiles)
        rows_c = rows
    else:
        bands = common.chunk_bounds(cols.shape[0], rows.shape[0])
        rows_c = rows.float()
        dz_band = _torch_dlogits(rows_c, cols, labels, lse, grad_scale, terms)
    d_cols = torch.empty_like(cols)
    for start, end in bands:
        dz = dz_band(start, end)  # [M, end - start] in the GEMMs' dtype
        d_rows += dz @ cols[start:end].to(dz.dtype)
        d_cols[start:end] = dz.T @ rows_c
    return d_rows, d_cols


def _row_groups(labels, terms: LogitTerms):
    return None if terms.col_groups is None else terms.col_groups[labels].contiguous()


# ----------------------------------------------------------------------------------------------- torch path


def _torch_logits(rows32, cols, labels, row_groups, terms: LogitTerms, start: int, end: int) -> torch.Tensor:
    z = rows32 @ cols[start:end].float().T
    if terms.row_scale is not None:
        z *= terms.row_scale[:, None]
    if terms.col_scale is not None:
        z *= terms.col_scale[start:end]
    if row_groups is not None:
        column = torch.arange(start, end, device=z.device)
        same = terms.col_groups[start:end] == row_groups[:, None]
        z.masked_fill_(same & (column != labels[:, None]), float("-inf"))
    return z


def _label_in_band(labels, start: int, end: int):
    """(whether each row's label lies in [start, end), its column within the band, clamped when it does not)."""
    return (labels >= start) & (labels < end), (labels - start).clamp(0, end - start - 1)[:, None]


def _torch_forward(rows, cols, labels, terms: LogitTerms):
    rows32, row_groups = rows.float(), _row_groups(labels, terms)
    lse = rows32.new_full((rows.shape[0],), float("-inf"))
    target = rows32.new_zeros(rows.shape[0])
    for start, end in common.chunk_bounds(cols.shape[0], rows.shape[0]):
        z = _torch_logits(rows32, cols, labels, row_groups, terms, start, end)
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
        hit, column = _label_in_band(labels, start, end)
        target += torch.where(hit, z.gather(1, column)[:, 0], 0.0)
    return lse, target


def _torch_dlogits(rows32, cols, labels, lse, grad_scale, terms: LogitTerms) -> Callable[[int, int], torch.Tensor]:
    row_groups = _row_groups(labels, terms)

    def dz_band(start: int, end: int) -> torch.Tensor:
        dz = torch.exp(_torch_logits(rows32, cols, labels, row_groups, terms, start, end) - lse[:, None])
        hit, column = _label_in_band(labels, start, end)
        dz.scatter_add_(1, column, -hit[:, None].float())
        dz *= grad_scale
        if terms.row_scale is not None:
            dz *= terms.row_scale[:, None]
        if terms.col_scale is not None:
            dz *= terms.col_scale[start:end]
        return dz

    return dz_band


# ----------------------------------------------------------------------------------------------- Triton path


@triton.jit
def _logits_tile(
    rows_ptr,
    cols_ptr,
    labels,
    row_scale_ptr,
    col_scale_ptr,
    col_groups_ptr,
    row_groups_ptr,
    offs_m,
    offs_n,
    M,
    n_limit,
    H,
    stride_rows,
    stride_cols,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Logits of one [BLOCK_M, BLOCK_N] tile in fp32; columns at or past n_limit and false negatives -> MASKED."""
    z = dot_tile(
        rows_ptr, cols_ptr, offs_m, offs_n, M, n_limit, H, stride_rows, stride_cols, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST
    )
    row_ok = offs_m < M
    col_ok = offs_n < n_limit
    if HAS_ROW_SCALE:
        z *= tl.load(row_scale_ptr + offs_m, mask=row_ok, other=0.0)[:, None]
    if HAS_COL_SCALE:
        z *= tl.load(col_scale_ptr + offs_n, mask=col_ok, other=0.0)[None, :]
    keep = col_ok[None, :]
    if HAS_GROUPS:
        row_groups = tl.load(row_groups_ptr + offs_m, mask=row_ok, other=0)
        col_groups = tl.load(col_groups_ptr + offs_n, mask=col_ok, other=0)
        is_label = offs_n[None, :] == labels[:, None]
        keep &= (col_groups[None, :] != row_groups[:, None]) | is_label
    return tl.where(keep, z, MASKED)


@triton.jit
def _lse_kernel(
    rows_ptr,
    cols_ptr,
    labels_ptr,
    row_scale_ptr,
    col_scale_ptr,
    col_groups_ptr,
    row_groups_ptr,
    part_lse_ptr,
    part_target_ptr,
    M,
    V,
    H,
    stride_rows,
    stride_cols,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (i, s): rows tile i, column tiles s, s + S, s + 2S, ...; writes partial lse and target logit."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    labels = tl.load(labels_ptr + offs_m, mask=row_ok, other=-1)
    running_max = tl.full((BLOCK_M,), MASKED, dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(split, tl.cdiv(V, BLOCK_N), n_splits):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        z = _logits_tile(
            rows_ptr, cols_ptr, labels, row_scale_ptr, col_scale_ptr, col_groups_ptr, row_groups_ptr,
            offs_m, offs_n, M, V, H, stride_rows, stride_cols,
            HAS_ROW_SCALE, HAS_COL_SCALE, HAS_GROUPS, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST,
        )  # fmt: skip
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        running_max = new_max
        target += tl.sum(tl.where(offs_n[None, :] == labels[:, None], z, 0.0), axis=1)
    tl.store(part_lse_ptr + split * M + offs_m, running_max + tl.log(running_sum), mask=row_ok)
    tl.store(part_target_ptr + split * M + offs_m, target, mask=row_ok)


@triton.jit
def _dlogits_kernel(
    rows_ptr,
    cols_ptr,
    labels_ptr,
    row_scale_ptr,
    col_scale_ptr,
    col_groups_ptr,
    row_groups_ptr,
    lse_ptr,
    grad_scale_ptr,
    dz_ptr,
    M,
    H,
    col_start,
    col_end,
    stride_rows,
    stride_cols,
    stride_dz,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """dz[:, band] = (softmax - onehot) · grad_scale · row_scale · col_scale for columns [col_start, col_end)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = col_start + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    col_ok = offs_n < col_end
    labels = tl.load(labels_ptr + offs_m, mask=row_ok, other=-1)
    z = _logits_tile(
        rows_ptr, cols_ptr, labels, row_scale_ptr, col_scale_ptr, col_groups_ptr, row_groups_ptr,
        offs_m, offs_n, M, col_end, H, stride_rows, stride_cols,
        HAS_ROW_SCALE, HAS_COL_SCALE, HAS_GROUPS, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST,
    )  # fmt: skip
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = tl.where(offs_n[None, :] == labels[:, None], p - 1.0, p) * tl.load(grad_scale_ptr)
    if HAS_ROW_SCALE:
        dz *= tl.load(row_scale_ptr + offs_m, mask=row_ok, other=0.0)[:, None]
    if HAS_COL_SCALE:
        dz *= tl.load(col_scale_ptr + offs_n, mask=col_ok, other=0.0)[None, :]
    dz_ptrs = dz_ptr + offs_m[:, None].to(tl.int64) * stride_dz + (offs_n - col_start)[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _kernel_terms(terms: LogitTerms, row_groups):
    return dict(
        row_scale_ptr=terms.row_scale,
        col_scale_ptr=terms.col_scale,
        col_groups_ptr=terms.col_groups,
        row_groups_ptr=row_groups,
        HAS_ROW_SCALE=terms.row_scale is not None,
        HAS_COL_SCALE=terms.col_scale is not None,
        HAS_GROUPS=terms.col_groups is not None,
    )


def _launch_options(tiles: common.Tiles):
    return dict(
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        UPCAST=tiles.upcast,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )


def _triton_forward(rows, cols, labels, terms: LogitTerms):
    (M, H), V = rows.shape, cols.shape[0]
    tiles = common.tiles_for(rows.dtype)
    row_tiles, col_tiles = triton.cdiv(M, tiles.block_m), triton.cdiv(V, tiles.block_n)
    # Split the columns over enough programs to fill the device; partial results combine exactly below.
    splits = min(col_tiles, triton.cdiv(common.programs_to_fill(rows.device), row_tiles))
    part_lse = rows.new_empty((splits, M), dtype=torch.float32)
    part_target = torch.empty_like(part_lse)
    _lse_kernel[(row_tiles, splits)](
        rows, cols, labels, part_lse_ptr=part_lse, part_target_ptr=part_target, M=M, V=V, H=H,
        stride_rows=rows.stride(0), stride_cols=cols.stride(0),
        **_kernel_terms(terms, _row_groups(labels, terms)), **_launch_options(tiles),
    )  # fmt: skip
    return torch.logsumexp(part_lse, dim=0), part_target.sum(dim=0)


def _triton_dlogits(rows, cols, labels, lse, grad_scale, terms: LogitTerms, tiles: common.Tiles):
    M, H = rows.shape
    kernel_terms = _kernel_terms(terms, _row_groups(labels, terms))

    def dz_band(start: int, end: int) -> torch.Tensor:
        dz = rows.new_empty((M, end - start))
        grid = (triton.cdiv(M, tiles.block_m), triton.cdiv(end - start, tiles.block_n))
        _dlogits_kernel[grid](
            rows, cols, labels, lse_ptr=lse, grad_scale_ptr=grad_scale, dz_ptr=dz, M=M, H=H,
            col_start=start, col_end=end, stride_rows=rows.stride(0), stride_cols=cols.stride(0),
            stride_dz=dz.stride(0), **kernel_terms, **_launch_options(tiles),
        )  # fmt: skip
        return dz

    return dz_band
