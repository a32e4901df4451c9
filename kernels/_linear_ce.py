"""Cross-entropy over logits z = (rows @ colsᵀ) · row_scale · col_scale without storing z: the engine shared
by the masked-LM loss (rows = hidden states, cols = LM head) and InfoNCE (rows = queries, cols = positives).

Forward: one pass of blockwise online log-sum-exp over column tiles gives each row's log-normaliser `lse` and
its target logit; nothing of size [M, V] is written. Backward: the logits are recomputed tile by tile and turned
into their gradient dz = (softmax - onehot) · grad_scale · scales right where they are formed; dz exists only
for a bounded band of columns at a time (common.CHUNK_ELEMENTS), from which tensor-core GEMMs form
d_rows += dz @ cols[band] and d_cols[band] = dzᵀ @ rows. Every gradient is exact: no tile is skipped.

Optional false-negative masking: with `col_groups`, a column j other than row i's label is left out of row i's
normaliser when col_groups[j] == col_groups[label_i].

Optional per-row extra columns (InfoNCE's hard negatives): with `negatives` [M, r, H], row i is also scored against
its own r rows negatives[i], z_ik = rows[i]·negatives[i, k] · row_scale[i] · negative_scale[i, k]. They enter the
same log-sum-exp: in the Triton path inside the forward kernel's pass (the first column split of each row tile
scores them), and one backward kernel adds their part of d_rows and forms d_negatives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    negatives: torch.Tensor | None = None  # [M, r, H] contiguous, rows' dtype: each row's own extra columns
    negative_scale: torch.Tensor | None = None  # [M, r] fp32

    @property
    def num_negatives(self) -> int:
        return 0 if self.negatives is None else self.negatives.shape[1]


def forward(rows, cols, labels, terms: LogitTerms, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp (over the columns and the row's own negatives) and target logit, both [M] fp32."""
    if rows.shape[0] == 0:
        empty = rows.new_empty(0, dtype=torch.float32)
        return empty, empty.clone()
    if backend == "triton":
        return _triton_forward(rows, cols, labels, terms)
    return _torch_forward(rows, cols, labels, terms)


def backward(rows, cols, labels, lse, grad_scale, terms: LogitTerms, backend: str):
    """Gradients of grad_scale · Σ_i (lse_i - z_i,label_i) with the scales held constant.

    Returns d_rows in fp32, d_cols in cols' dtype and d_negatives [M, r, H] in fp32 (None without negatives)."""
    d_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
    d_negatives = (
        None if terms.negatives is None else torch.zeros(terms.negatives.shape, dtype=torch.float32, device=rows.device)
    )
    if rows.shape[0] == 0:
        return d_rows, torch.zeros_like(cols), d_negatives
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
    if d_negatives is not None and terms.num_negatives:
        negatives_backward = _triton_negatives_backward if backend == "triton" else _torch_negatives_backward
        negatives_backward(rows, lse, grad_scale, terms, d_rows, d_negatives)
    return d_rows, d_cols, d_negatives


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
    for start, end in _negative_bands(rows, terms):
        lse[start:end] = torch.logaddexp(lse[start:end], _torch_negative_logits(rows, terms, start, end).logsumexp(1))
    return lse, target


def _negative_bands(rows, terms: LogitTerms) -> list[tuple[int, int]]:
    """Row bands whose negatives (r·H elements a row) fit one chunk; none without negatives."""
    if not terms.num_negatives:
        return []
    return common.chunk_bounds(rows.shape[0], terms.num_negatives * rows.shape[1])


def _torch_negative_logits(rows, terms: LogitTerms, start: int, end: int) -> torch.Tensor:
    """fp32 logits [end - start, r] of rows[start:end] against their own negatives."""
    z = torch.einsum("bd,brd->br", rows[start:end].float(), terms.negatives[start:end].float())
    if terms.row_scale is not None:
        z *= terms.row_scale[start:end, None]
    if terms.negative_scale is not None:
        z *= terms.negative_scale[start:end]
    return z


def _negative_weights(z, lse, grad_scale, terms: LogitTerms, start: int, end: int) -> torch.Tensor:
    """d loss / d (row · negative) [end - start, r] with the scales held constant: softmax · grad_scale · scales."""
    weights = torch.exp(z - lse[start:end, None]) * grad_scale
    if terms.row_scale is not None:
        weights *= terms.row_scale[start:end, None]
    if terms.negative_scale is not None:
        weights *= terms.negative_scale[start:end]
    return weights


def _torch_negatives_backward(rows, lse, grad_scale, terms: LogitTerms, d_rows, d_negatives) -> None:
    for start, end in _negative_bands(rows, terms):
        z = _torch_negative_logits(rows, terms, start, end)
        weights = _negative_weights(z, lse, grad_scale, terms, start, end)
        d_rows[start:end] += torch.einsum("br,brd->bd", weights, terms.negatives[start:end].float())
        d_negatives[start:end] = weights[..., None] * rows[start:end, None].float()


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
def _row_dots(
    rows_ptr, others_ptr, offs_m, M, H, stride_rows, stride_others, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """fp32 [BLOCK_M]: rows[m, :] · others[m, :] for the rows offs_m (each row against its own vector; rows at or
    past M give 0). Elementwise products in fp32, not a matmul: every row has its own right-hand side."""
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m[:, None] < M
    a_ptrs = rows_ptr + offs_m[:, None].to(tl.int64) * stride_rows + offs_k[None, :]
    b_ptrs = others_ptr + offs_m[:, None].to(tl.int64) * stride_others + offs_k[None, :]
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        inside = row_ok & (offs_k[None, :] < H - k)
        a = tl.load(a_ptrs, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(b_ptrs, mask=inside, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _negative_logit(
    rows_ptr,
    negatives_ptr,
    row_scale_ptr,
    negative_scale_ptr,
    offs_m,
    j,
    M,
    H,
    R,
    stride_rows,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_NEGATIVE_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 [BLOCK_M]: the logit of each row against its own negative j (negatives [M, R, H] contiguous)."""
    row_ok = offs_m < M
    z = _row_dots(rows_ptr, negatives_ptr + j * H, offs_m, M, H, stride_rows, R * H, BLOCK_M, BLOCK_K)
    if HAS_ROW_SCALE:
        z *= tl.load(row_scale_ptr + offs_m, mask=row_ok, other=0.0)
    if HAS_NEGATIVE_SCALE:
        z *= tl.load(negative_scale_ptr + offs_m.to(tl.int64) * R + j, mask=row_ok, other=0.0)
    return z


@triton.jit
def _lse_kernel(
    rows_ptr,
    cols_ptr,
    labels_ptr,
    row_scale_ptr,
    col_scale_ptr,
    col_groups_ptr,
    row_groups_ptr,
    negatives_ptr,
    negative_scale_ptr,
    part_lse_ptr,
    part_target_ptr,
    M,
    V,
    H,
    R,
    stride_rows,
    stride_cols,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HAS_NEGATIVES: tl.constexpr,
    HAS_NEGATIVE_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (i, s): rows tile i, column tiles s, s + S, s + 2S, ...; split 0 also scores the rows' own R
    negatives. Writes partial lse and target logit."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    labels = tl.load(labels_ptr + offs_m, mask=row_ok, other=-1)
    running_max = tl.full((BLOCK_M,), MASKED, dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_NEGATIVES:
        if split == 0:
            for j in range(0, R):
                z = _negative_logit(
                    rows_ptr,
                    negatives_ptr,
                    row_scale_ptr,
                    negative_scale_ptr,
                    offs_m,
                    j,
                    M,
                    H,
                    R,
                    stride_rows,
                    HAS_ROW_SCALE,
                    HAS_NEGATIVE_SCALE,
                    BLOCK_M,
                    BLOCK_K,
                )
                new_max = tl.maximum(running_max, z)
                running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(z - new_max)
                running_max = new_max
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


@triton.jit
def _negatives_backward_kernel(
    rows_ptr,
    negatives_ptr,
    row_scale_ptr,
    negative_scale_ptr,
    lse_ptr,
    grad_scale_ptr,
    d_rows_ptr,
    d_negatives_ptr,
    M,
    H,
    R,
    stride_rows,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_NEGATIVE_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows tile i: for each own negative j, w = softmax · grad_scale · scales; d_rows += w · negative_j (fp32, in
    place: this program owns its rows) and d_negatives[:, j] = w · row (fp32)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    scale = tl.load(grad_scale_ptr) + tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_ROW_SCALE:
        scale *= tl.load(row_scale_ptr + offs_m, mask=row_ok, other=0.0)
    rows_base = offs_m[:, None].to(tl.int64) * stride_rows + offs_k[None, :]
    d_rows_base = offs_m[:, None].to(tl.int64) * H + offs_k[None, :]
    for j in range(0, R):
        z = _negative_logit(
            rows_ptr,
            negatives_ptr,
            row_scale_ptr,
            negative_scale_ptr,
            offs_m,
            j,
            M,
            H,
            R,
            stride_rows,
            HAS_ROW_SCALE,
            HAS_NEGATIVE_SCALE,
            BLOCK_M,
            BLOCK_K,
        )
        w = tl.exp(z - lse) * scale
        if HAS_NEGATIVE_SCALE:
            w *= tl.load(negative_scale_ptr + offs_m.to(tl.int64) * R + j, mask=row_ok, other=0.0)
        w = tl.where(row_ok, w, 0.0)[:, None]
        negative_base = (offs_m[:, None].to(tl.int64) * R + j) * H + offs_k[None, :]
        for k in range(0, H, BLOCK_K):
            inside = row_ok[:, None] & (offs_k[None, :] < H - k)
            row = tl.load(rows_ptr + rows_base + k, mask=inside, other=0.0).to(tl.float32)
            negative = tl.load(negatives_ptr + negative_base + k, mask=inside, other=0.0).to(tl.float32)
            d_row = tl.load(d_rows_ptr + d_rows_base + k, mask=inside, other=0.0)
            tl.store(d_rows_ptr + d_rows_base + k, d_row + w * negative, mask=inside)
            tl.store(d_negatives_ptr + negative_base + k, w * row, mask=inside)


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
    arguments = dict(
        negatives_ptr=terms.negatives, negative_scale_ptr=terms.negative_scale, M=M, V=V, H=H,
        R=terms.num_negatives, stride_rows=rows.stride(0), stride_cols=cols.stride(0),
        HAS_NEGATIVES=terms.num_negatives > 0, HAS_NEGATIVE_SCALE=terms.negative_scale is not None,
        **_kernel_terms(terms, _row_groups(labels, terms)), **_launch_options(tiles),
    )  # fmt: skip
    # Split the columns over programs so that the waves of resident programs end together; partial results
    # combine exactly below.
    one_split = rows.new_empty((1, M), dtype=torch.float32)
    slots = common.resident_programs(
        _lse_kernel, rows.device, rows, cols, labels, part_lse_ptr=one_split, part_target_ptr=one_split, **arguments
    )
    splits = common.balanced_splits(row_tiles, col_tiles, slots)
    part_lse = rows.new_empty((splits, M), dtype=torch.float32)
    part_target = torch.empty_like(part_lse)
    _lse_kernel[(row_tiles, splits)](
        rows, cols, labels, part_lse_ptr=part_lse, part_target_ptr=part_target, **arguments
    )
    return torch.logsumexp(part_lse, dim=0), part_target.sum(dim=0)


NEGATIVES_BLOCK_M, NEGATIVES_BLOCK_K = 32, 128  # memory-bound row dots: small row tiles, many programs


def _triton_negatives_backward(rows, lse, grad_scale, terms: LogitTerms, d_rows, d_negatives) -> None:
    M, H = rows.shape
    _negatives_backward_kernel[(triton.cdiv(M, NEGATIVES_BLOCK_M),)](
        rows, terms.negatives, terms.row_scale, terms.negative_scale, lse, grad_scale, d_rows, d_negatives,
        M=M, H=H, R=terms.num_negatives, stride_rows=rows.stride(0), HAS_ROW_SCALE=terms.row_scale is not None,
        HAS_NEGATIVE_SCALE=terms.negative_scale is not None, BLOCK_M=NEGATIVES_BLOCK_M, BLOCK_K=NEGATIVES_BLOCK_K,
        num_warps=4,
    )  # fmt: skip


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
