"""Late-interaction (MaxSim) InfoNCE over packed token vectors, never forming the query-token x document-token matrix.

    maxsim_info_nce(q_tokens, q_cu_seqlens, d_tokens, d_cu_seqlens, targets, *, temperature, negatives=None,
                    duplicate_mask=None) -> fp32 scalar, the mean over queries

- q_tokens [Tq, D]: every query's token vectors, concatenated; q_cu_seqlens [Q+1] int offsets (query i is rows
  q_cu_seqlens[i]:q_cu_seqlens[i+1]). The caller L2-normalises each token and leaves out padding and special tokens.
- d_tokens [Td, D], d_cu_seqlens [N+1]: the documents, the same way: first the positives gathered from every rank,
  then, with `negatives=r`, every query's own r hard negatives (the last Q·r documents; query i owns documents
  N - Q·r + i·r ... N - Q·r + i·r + r - 1).
- targets [Q]: the index of each query's positive among the documents.
- score(q, d) = Σ over q's tokens of max over d's tokens of <q_t, d_s>; logits = score / temperature (fp32);
  loss = mean cross-entropy of each query's logits against its target.

Hard negatives follow kernels/info_nce.py: a query is scored against every gathered positive and only its own hard
negatives (another query's negatives never enter its softmax; the kernels skip those pairs, not just mask them).
duplicate_mask [Q, N] bool: True leaves that document out of the query's denominator (the same content twice in
the gathered batch is not a negative); the target itself is never left out. Gradients reach q_tokens and d_tokens
exactly (the gradient of a max goes to its first maximal document token); the gradient of gathered positives
returns to their ranks through the caller's gather with gradient, as in stage 2.

Computation. Triton on CUDA: program (query-token tile, document) runs over the document's tokens in tiles, one
tensor-core dot [128 query tokens x BLOCK_N document tokens x D] each, keeping a running per-token max and its
argmax; it writes the per-(query token, document) max and argmax ([Tq, N], the argmax kept for the backward), a
second small kernel sums the maxima over each query's tokens into the [Q, N] score matrix, and the InfoNCE over that
matrix is plain torch. Backward: g = dloss/dscore [Q, N]; dq_t = Σ_d g[q(t), d] · d_tokens[argmax(t, d)] by
gathering rows; dd (one program per document-token tile) = Σ over query-token tiles of Pᵀ @ q_tile with
P[t, s] = g[q(t), d] where s = argmax(t, d), a tensor-core dot. Operands enter the dots in the inputs' dtype (bf16
under autocast), accumulation is fp32; in bf16, P's weights are rounded to bf16 as a matmul's gradient would be.
Memory O((Tq + Td)·D + Q·N + Tq·N). Elsewhere a chunked torch path in fp32: bands of whole documents whose
similarity block [query tokens x band tokens] holds at most common.CHUNK_ELEMENTS elements; the backward
recomputes each band's argmax instead of keeping it, so its memory is O((Tq + Td)·D + Q·N + CHUNK_ELEMENTS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common as common
from ._common import autocast_off, autocast_operands, resolve_backend

MAX_TRITON_DIM = 256  # the Triton kernels hold a whole token vector in one tile


def maxsim_info_nce(
    q_tokens: torch.Tensor,
    q_cu_seqlens: torch.Tensor,
    d_tokens: torch.Tensor,
    d_cu_seqlens: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    negatives: int | None = None,
    duplicate_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean late-interaction InfoNCE (fp32 scalar); gradients reach q_tokens and d_tokens in their dtypes.

    backend: 'auto' (Triton on CUDA, chunked torch otherwise), 'triton' or 'torch'."""
    q_tokens, d_tokens = autocast_operands(q_tokens, d_tokens)
    # Only shapes here (no host reads), so torch.compile traces this as one op; the op checks the offsets.
    Q, N, r = q_cu_seqlens.shape[0] - 1, d_cu_seqlens.shape[0] - 1, negatives or 0
    if q_tokens.dim() != 2 or d_tokens.dim() != 2 or q_tokens.shape[1] != d_tokens.shape[1]:
        raise ValueError(
            f"q_tokens [Tq, D] and d_tokens [Td, D] expected, got {tuple(q_tokens.shape)} and {tuple(d_tokens.shape)}"
        )
    if targets.shape != (Q,):
        raise ValueError(f"targets must be [Q] = [{Q}] (one per query of q_cu_seqlens), got {tuple(targets.shape)}")
    if r < 0 or N < Q * r:
        raise ValueError(
            f"negatives={r} per query needs {Q} x {r} hard negative documents at the end of the {N} documents"
        )
    if duplicate_mask is not None and (duplicate_mask.shape != (Q, N) or duplicate_mask.dtype != torch.bool):
        raise ValueError(
            f"duplicate_mask must be a bool [Q, N] = [{Q}, {N}] tensor, got {duplicate_mask.dtype} "
            f"{tuple(duplicate_mask.shape)}"
        )
    backend = resolve_backend(backend, q_tokens)
    if backend == "triton" and q_tokens.shape[1] > MAX_TRITON_DIM:
        raise ValueError(
            f"the Triton MaxSim kernels take token vectors of at most {MAX_TRITON_DIM} dims, got {q_tokens.shape[1]}"
        )
    excluded = left_out(targets, N, r, duplicate_mask)
    loss, _, _ = _maxsim_info_nce(
        q_tokens, q_cu_seqlens, d_tokens, d_cu_seqlens, targets, excluded, float(temperature), r, backend
    )
    return loss


def left_out(targets: torch.Tensor, num_docs: int, negatives: int, duplicate_mask: torch.Tensor | None) -> torch.Tensor:
    """[Q, N] bool: the documents left out of each query's softmax: its duplicates and the other queries' hard
    negatives (the last Q·negatives documents, `negatives` per query), never its target."""
    Q, device = targets.shape[0], targets.device
    first = num_docs - Q * negatives
    excluded = torch.zeros((Q, num_docs), dtype=torch.bool, device=device)
    if duplicate_mask is not None:
        excluded |= duplicate_mask.to(device)
    if negatives:
        owner = torch.arange(num_docs - first, device=device) // negatives
        excluded[:, first:] |= owner[None, :] != torch.arange(Q, device=device)[:, None]
    if num_docs:  # (a target out of range is the op's one-line error, not an IndexError here)
        excluded[torch.arange(Q, device=device), targets.clamp(0, num_docs - 1)] = False
    return excluded


@dataclass(frozen=True)
class Layout:
    """Where every query and document lies in the packed token matrices (host integers)."""

    q_offsets: list[int]  # [Q + 1]
    d_offsets: list[int]  # [N + 1]
    negatives: int  # own hard negatives per query, the last Q·negatives documents

    @property
    def num_queries(self) -> int:
        return len(self.q_offsets) - 1

    @property
    def num_docs(self) -> int:
        return len(self.d_offsets) - 1

    @property
    def first_negative(self) -> int:
        return self.num_docs - self.num_queries * self.negatives

    @staticmethod
    def of(q_tokens, q_cu_seqlens, d_tokens, d_cu_seqlens, negatives: int, targets: torch.Tensor) -> Layout:
        """Checks the packed inputs and targets (one line naming the first bad query or document) and reads the
        offsets."""
        if q_tokens.dtype != d_tokens.dtype:
            raise ValueError(f"q_tokens and d_tokens must share a dtype, got {q_tokens.dtype} and {d_tokens.dtype}")
        offsets = {}
        for name, cu, tokens, what in (
            ("q_cu_seqlens", q_cu_seqlens, q_tokens, "query"),
            ("d_cu_seqlens", d_cu_seqlens, d_tokens, "document"),
        ):
            if cu.dim() != 1 or cu.numel() < 1 or cu.dtype.is_floating_point:
                raise ValueError(f"{name} must be a 1-D integer tensor of offsets, got {cu.dtype} {tuple(cu.shape)}")
            values = cu.tolist()
            if values[0] != 0 or values[-1] != tokens.shape[0]:
                raise ValueError(
                    f"{name} must run from 0 to {tokens.shape[0]} (the token rows), got {values[0]} .. {values[-1]}"
                )
            for i, (start, end) in enumerate(zip(values, values[1:])):
                if end <= start:
                    raise ValueError(f"{what} {i} has no tokens ({name}[{i}:{i + 2}] = {start}, {end})")
            offsets[name] = values
        layout = Layout(offsets["q_cu_seqlens"], offsets["d_cu_seqlens"], negatives)
        for i, target in enumerate(targets.tolist()):
            if not 0 <= target < layout.first_negative:
                raise ValueError(
                    f"query {i}: target {target} is not one of the {layout.first_negative} positive documents"
                )
        return layout

    def blocks(self) -> list[tuple[int, int, int, int]]:
        """(first query, end query, first document, end document) of the pairs that are scored: every query
        against every positive, and each query against its own hard negatives."""
        Q, first, r = self.num_queries, self.first_negative, self.negatives
        own = [(i, i + 1, first + i * r, first + (i + 1) * r) for i in range(Q)] if r else []
        return ([(0, Q, 0, first)] if first else []) + own


# --------------------------------------------------------------------------------------------------- the op


@torch.library.custom_op("moca_fast::maxsim_info_nce", mutates_args=())
def _maxsim_info_nce(
    q_tokens: torch.Tensor,
    q_cu_seqlens: torch.Tensor,
    d_tokens: torch.Tensor,
    d_cu_seqlens: torch.Tensor,
    targets: torch.Tensor,
    excluded: torch.Tensor,
    temperature: float,
    negatives: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, scores [Q, N] fp32, argmax [Tq, N] int32 on the Triton path (empty on the torch path, whose
    backward recomputes it)), kept for the backward."""
    q_tokens, d_tokens = q_tokens.contiguous(), d_tokens.contiguous()
    layout = Layout.of(q_tokens, q_cu_seqlens, d_tokens, d_cu_seqlens, negatives, targets)
    with autocast_off(q_tokens):
        if backend == "triton":
            scores, argmax = _triton_scores(q_tokens, d_tokens, layout, *_device_offsets(layout, q_tokens.device))
        else:
            scores, argmax = _torch_scores(q_tokens, d_tokens, layout), q_tokens.new_empty(0, dtype=torch.int32)
        logits = _logits(scores, excluded, temperature)
        loss = F.cross_entropy(logits, targets, reduction="sum") / max(layout.num_queries, 1)
    return loss, scores, argmax


@_maxsim_info_nce.register_fake
def _(q_tokens, q_cu_seqlens, d_tokens, d_cu_seqlens, targets, excluded, temperature, negatives, backend):
    argmax_shape = (q_tokens.shape[0], excluded.shape[1]) if backend == "triton" else (0,)
    return (
        q_tokens.new_empty((), dtype=torch.float32),
        q_tokens.new_empty(excluded.shape, dtype=torch.float32),
        q_tokens.new_empty(argmax_shape, dtype=torch.int32),
    )


def _logits(scores: torch.Tensor, excluded: torch.Tensor, temperature: float) -> torch.Tensor:
    temperature = torch.tensor(temperature, dtype=torch.float32, device=scores.device)
    return (scores / temperature).masked_fill(excluded, float("-inf"))


def _score_gradient(grad, scores, targets, excluded, temperature: float) -> torch.Tensor:
    """d loss / d score [Q, N] fp32: (softmax - onehot) · grad / (Q · temperature); 0 where excluded."""
    Q = scores.shape[0]
    g = torch.softmax(_logits(scores, excluded, temperature), dim=1)
    g[torch.arange(Q, device=g.device), targets] -= 1.0
    return g * (grad.float() / (max(Q, 1) * torch.tensor(temperature, dtype=torch.float32, device=g.device)))


@torch.library.custom_op("moca_fast::maxsim_info_nce_backward", mutates_args=())
def _maxsim_info_nce_backward(
    grad: torch.Tensor,
    q_tokens: torch.Tensor,
    q_cu_seqlens: torch.Tensor,
    d_tokens: torch.Tensor,
    d_cu_seqlens: torch.Tensor,
    targets: torch.Tensor,
    excluded: torch.Tensor,
    scores: torch.Tensor,
    argmax: torch.Tensor,
    temperature: float,
    negatives: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    q_tokens, d_tokens = q_tokens.contiguous(), d_tokens.contiguous()
    layout = Layout(q_cu_seqlens.tolist(), d_cu_seqlens.tolist(), negatives)  # checked by the forward
    with autocast_off(q_tokens):
        g = _score_gradient(grad, scores, targets, excluded, temperature)
        if backend == "triton":
            return _triton_backward(q_tokens, d_tokens, layout, g, argmax, *_device_offsets(layout, q_tokens.device))
        return _torch_backward(q_tokens, d_tokens, layout, g)


@_maxsim_info_nce_backward.register_fake
def _(
    grad,
    q_tokens,
    q_cu_seqlens,
    d_tokens,
    d_cu_seqlens,
    targets,
    excluded,
    scores,
    argmax,
    temperature,
    negatives,
    backend,
):
    return torch.empty_like(q_tokens), torch.empty_like(d_tokens)


def _setup_context(ctx, inputs, output):
    q_tokens, q_cu_seqlens, d_tokens, d_cu_seqlens, targets, excluded, temperature, negatives, backend = inputs
    ctx.save_for_backward(q_tokens, q_cu_seqlens, d_tokens, d_cu_seqlens, targets, excluded, output[1], output[2])
    ctx.options = (temperature, negatives, backend)


def _backward(ctx, grad_loss, _grad_scores, _grad_argmax):
    d_q, d_d = _maxsim_info_nce_backward(grad_loss, *ctx.saved_tensors, *ctx.options)
    return d_q, None, d_d, None, None, None, None, None, None


_maxsim_info_nce.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- torch path


def _bands(layout: Layout, block: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """The block's documents in consecutive bands whose padded similarity (its query tokens x band documents x
    the band's longest document) holds at most CHUNK_ELEMENTS elements (at least one document a band)."""
    q0, q1, d0, d1 = block
    rows = layout.q_offsets[q1] - layout.q_offsets[q0]
    lengths = [layout.d_offsets[d + 1] - layout.d_offsets[d] for d in range(d0, d1)]
    bands, start, longest = [], d0, 0
    for d, length in zip(range(d0, d1), lengths):
        wider = max(longest, length)
        if d > start and rows * (d + 1 - start) * wider > common.CHUNK_ELEMENTS:
            bands.append((start, d))
            start, wider = d, length
        longest = wider
    return bands + [(start, d1)] if d1 > d0 else bands


def _band_max(q32: torch.Tensor, d_tokens: torch.Tensor, layout: Layout, d0: int, d1: int):
    """(max over each document's tokens [rows, d1 - d0] fp32, its index among d_tokens' rows [rows, d1 - d0]) of
    the query tokens q32 against documents d0:d1, through one padded similarity block."""
    device = q32.device
    starts = torch.tensor(layout.d_offsets[d0:d1], device=device)
    lengths = torch.tensor(layout.d_offsets[d0 + 1 : d1 + 1], device=device) - starts
    position = torch.arange(int(lengths.max()), device=device)
    padding = position[None, :] >= lengths[:, None]  # [n, L]
    rows = torch.where(padding, starts[:, None], starts[:, None] + position[None, :])
    band = d_tokens[rows.flatten()].float()  # [n·L, D]
    similarity = (q32 @ band.T).view(q32.shape[0], *padding.shape).masked_fill_(padding, float("-inf"))
    best, index = similarity.max(dim=2)
    return best, index + starts


def _query_of_token(layout: Layout, q0: int, q1: int, device) -> torch.Tensor:
    lengths = torch.tensor(layout.q_offsets[q0 + 1 : q1 + 1], dtype=torch.long) - torch.tensor(
        layout.q_offsets[q0:q1], dtype=torch.long
    )
    return torch.repeat_interleave(torch.arange(q1 - q0), lengths).to(device)


def _torch_scores(q_tokens, d_tokens, layout: Layout) -> torch.Tensor:
    Q, N = layout.num_queries, layout.num_docs
    scores = q_tokens.new_full((Q, N), float("-inf"), dtype=torch.float32)  # pairs never scored stay -inf
    q32 = q_tokens.float()
    for q0, q1, d0, d1 in layout.blocks():
        rows = slice(layout.q_offsets[q0], layout.q_offsets[q1])
        query = _query_of_token(layout, q0, q1, q_tokens.device)
        for b0, b1 in _bands(layout, (q0, q1, d0, d1)):
            best, _ = _band_max(q32[rows], d_tokens, layout, b0, b1)
            scores[q0:q1, b0:b1] = best.new_zeros((q1 - q0, b1 - b0)).index_add_(0, query, best)
    return scores


def _torch_backward(q_tokens, d_tokens, layout: Layout, g: torch.Tensor):
    q32 = q_tokens.float()
    d_q = torch.zeros_like(q32)
    d_d = torch.zeros_like(d_tokens)  # each document's rows are written by the one band that holds it
    for q0, q1, d0, d1 in layout.blocks():
        rows = slice(layout.q_offsets[q0], layout.q_offsets[q1])
        query = _query_of_token(layout, q0, q1, q_tokens.device)
        for b0, b1 in _bands(layout, (q0, q1, d0, d1)):
            _, index = _band_max(q32[rows], d_tokens, layout, b0, b1)
            weights = g[q0:q1, b0:b1][query]  # [rows, n]: d loss / d (token max)
            for j, d in enumerate(range(b0, b1)):
                start, end = layout.d_offsets[d], layout.d_offsets[d + 1]
                w = weights[:, j, None]
                d_q[rows] += w * d_tokens[index[:, j]].float()
                d_doc = q32.new_zeros((end - start, q32.shape[1])).index_add_(0, index[:, j] - start, w * q32[rows])
                d_d[start:end] = d_doc
    return d_q.to(q_tokens.dtype), d_d


# ----------------------------------------------------------------------------------------------- Triton path


def _device_offsets(layout: Layout, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q offsets, d offsets, query of each query token) as int32 device tensors."""
    q_offsets = torch.tensor(layout.q_offsets, dtype=torch.int32)
    lengths = q_offsets[1:] - q_offsets[:-1]
    query = torch.repeat_interleave(torch.arange(layout.num_queries, dtype=torch.int32), lengths)
    return (q_offsets.to(device), torch.tensor(layout.d_offsets, dtype=torch.int32).to(device), query.to(device))


@dataclass(frozen=True)
class MaxsimTiles:
    block_m: int  # query tokens a tile
    block_n: int  # document tokens a tile
    block_d: int  # the token dimension, padded to a power of two
    upcast: bool

    @staticmethod
    def of(layout: Layout, dim: int, dtype: torch.dtype) -> MaxsimTiles:
        # Document tiles no longer than the longest document (down to tl.dot's 16): short text documents waste
        # less of each tile. 128 x 128 tiles keep Hopper's tensor cores busy on page-image documents.
        longest = max((b - a for a, b in zip(layout.d_offsets, layout.d_offsets[1:])), default=1)
        block_n = min(128, max(16, triton.next_power_of_2(longest)))
        block_d = max(16, triton.next_power_of_2(dim))
        return MaxsimTiles(128, block_n, block_d, upcast=common.interpreting() and dtype == torch.bfloat16)


FORWARD_WARPS, FORWARD_STAGES = 8, 3
GRAD_BLOCK_M = 32  # dq: memory-bound row gathers, many small programs
DOC_GRAD_BLOCK_N, DOC_GRAD_BLOCK_M, DOC_GRAD_WARPS = 64, 64, 4


@triton.jit
def _maxsim_forward_kernel(
    q_ptr, d_ptr, d_offsets_ptr, query_ptr, token_max_ptr, argmax_ptr,
    Tq, N, D, first_negative, R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program (m, d): query tokens [m·BLOCK_M, +BLOCK_M) against document d: each token's max dot product over
    d's tokens and the first token reaching it. A hard negative none of the tile's queries owns is skipped (max 0,
    argmax its first token: never read, its score weight is 0)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    doc = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    d_start = tl.load(d_offsets_ptr + doc)
    d_end = tl.load(d_offsets_ptr + doc + 1)
    owner = (doc - first_negative) // R
    first_query = tl.load(query_ptr + tl.program_id(0) * BLOCK_M)
    last_query = tl.load(query_ptr + tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, Tq) - 1)
    not_owned = (doc >= first_negative) & ((owner < first_query) | (owner > last_query))
    d_end = tl.where(not_owned, d_start, d_end)
    q = tl.load(
        q_ptr + offs_m[:, None].to(tl.int64) * D + offs_k[None, :],
        mask=row_ok[:, None] & (offs_k[None, :] < D),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_M,), dtype=tl.int32) + d_start
    for n0 in range(d_start, d_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < d_end
        doc_tile = tl.load(
            d_ptr + offs_n[:, None].to(tl.int64) * D + offs_k[None, :],
            mask=col_ok[:, None] & (offs_k[None, :] < D),
            other=0.0,
        )
        if UPCAST:
            doc_tile = doc_tile.to(tl.float32)
        s = tl.dot(q, tl.trans(doc_tile), input_precision="ieee")
        s = tl.where(col_ok[None, :], s, float("-inf"))
        tile_best, tile_index = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best
        best_index = tl.where(better, n0 + tile_index, best_index)
        best = tl.where(better, tile_best, best)
    best = tl.where(best == float("-inf"), 0.0, best)
    out = offs_m.to(tl.int64) * N + doc
    tl.store(token_max_ptr + out, best, mask=row_ok)
    tl.store(argmax_ptr + out, best_index, mask=row_ok)


@triton.jit
def _segment_sum_kernel(token_max_ptr, q_offsets_ptr, scores_ptr, N, BLOCK_C: tl.constexpr):
    """scores[i, cols] = Σ over query i's tokens of token_max[t, cols], in token order (deterministic)."""
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(tl.load(q_offsets_ptr + i).to(tl.int64), tl.load(q_offsets_ptr + i + 1).to(tl.int64)):
        acc += tl.load(token_max_ptr + t * N + cols, mask=col_ok, other=0.0)
    tl.store(scores_ptr + i.to(tl.int64) * N + cols, acc, mask=col_ok)


@triton.jit
def _gathered_row(d_ptr, argmax_ptr, g_ptr, query, offs_m, offs_k, row_ok, k_ok, c, N, D):
    """fp32 [BLOCK_M, BLOCK_D]: g[q(t), c] · d_tokens[argmax(t, c)] for the tile's tokens t (rows of weight 0 are
    not read)."""
    index = tl.load(argmax_ptr + offs_m.to(tl.int64) * N + c, mask=row_ok, other=0)
    w = tl.load(g_ptr + query.to(tl.int64) * N + c, mask=row_ok, other=0.0)
    rows = tl.load(
        d_ptr + index[:, None].to(tl.int64) * D + offs_k[None, :], mask=(row_ok & (w != 0.0))[:, None] & k_ok, other=0.0
    )
    return w[:, None] * rows.to(tl.float32)


@triton.jit
def _query_grad_kernel(
    d_ptr, argmax_ptr, g_ptr, query_ptr, d_q_ptr,
    Tq, N, D, first_negative, R,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dq[t] = Σ_d g[q(t), d] · d_tokens[argmax(t, d)] for the tokens of one tile, over every positive and the
    tile's queries' own negatives; fp32, rows gathered in their dtype."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    k_ok = offs_k[None, :] < D
    query = tl.load(query_ptr + offs_m, mask=row_ok, other=0)
    first_query = tl.load(query_ptr + tl.program_id(0) * BLOCK_M)
    last_query = tl.load(query_ptr + tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, Tq) - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c in range(0, first_negative):
        acc += _gathered_row(d_ptr, argmax_ptr, g_ptr, query, offs_m, offs_k, row_ok, k_ok, c, N, D)
    # Hard negatives: only those of the tile's own queries have a nonzero weight.
    for c in range(first_negative + first_query * R, tl.minimum(first_negative + (last_query + 1) * R, N)):
        acc += _gathered_row(d_ptr, argmax_ptr, g_ptr, query, offs_m, offs_k, row_ok, k_ok, c, N, D)
    tl.store(
        d_q_ptr + offs_m[:, None].to(tl.int64) * D + offs_k[None, :],
        acc.to(d_q_ptr.dtype.element_ty),
        mask=row_ok[:, None] & k_ok,
    )


@triton.jit
def _doc_grad_kernel(
    q_ptr, argmax_ptr, g_ptr, query_ptr, q_offsets_ptr, d_offsets_ptr, tile_doc_ptr, tile_start_ptr, d_d_ptr,
    Tq, N, D, first_negative, R,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Program p: document tokens [tile_start[p], +BLOCK_N) of document tile_doc[p]:
    dd[s] = Σ_t [argmax(t, d) = s] · g[q(t), d] · q_t over the query tokens that score d (all for a positive,
    the owner's for a hard negative), as tensor-core dots Pᵀ @ q_tile."""
    doc = tl.load(tile_doc_ptr + tl.program_id(0))
    offs_n = tl.load(tile_start_ptr + tl.program_id(0)) + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_D)
    k_ok = offs_k[None, :] < D
    col_ok = offs_n < tl.load(d_offsets_ptr + doc + 1)
    negative = doc >= first_negative
    owner = tl.where(negative, (doc - first_negative) // R, 0)
    m_start = tl.where(negative, tl.load(q_offsets_ptr + owner), 0)
    m_end = tl.where(negative, tl.load(q_offsets_ptr + owner + 1), Tq)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < m_end
        index = tl.load(argmax_ptr + offs_m.to(tl.int64) * N + doc, mask=row_ok, other=-1)
        query = tl.load(query_ptr + offs_m, mask=row_ok, other=0)
        w = tl.load(g_ptr + query.to(tl.int64) * N + doc, mask=row_ok, other=0.0)
        p = tl.where(offs_n[:, None] == index[None, :], w[None, :], 0.0)
        q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * D + offs_k[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        acc = tl.dot(p.to(q.dtype), q, acc, input_precision="ieee")
    tl.store(
        d_d_ptr + offs_n[:, None].to(tl.int64) * D + offs_k[None, :],
        acc.to(d_d_ptr.dtype.element_ty),
        mask=col_ok[:, None] & k_ok,
    )


def _triton_scores(q_tokens, d_tokens, layout: Layout, q_offsets, d_offsets, query):
    """(scores [Q, N] fp32, argmax [Tq, N] int32)."""
    (Tq, D), N = q_tokens.shape, layout.num_docs
    tiles = MaxsimTiles.of(layout, D, q_tokens.dtype)
    token_max = q_tokens.new_empty((Tq, N), dtype=torch.float32)
    argmax = q_tokens.new_empty((Tq, N), dtype=torch.int32)
    scores = q_tokens.new_empty((layout.num_queries, N), dtype=torch.float32)
    if Tq == 0 or N == 0:
        return scores.fill_(float("-inf")), argmax
    _maxsim_forward_kernel[(triton.cdiv(Tq, tiles.block_m), N)](
        q_tokens, d_tokens, d_offsets, query, token_max, argmax, Tq, N, D, layout.first_negative,
        max(layout.negatives, 1), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
        UPCAST=tiles.upcast, num_warps=FORWARD_WARPS, num_stages=FORWARD_STAGES,
    )  # fmt: skip
    block_c = 128
    _segment_sum_kernel[(layout.num_queries, triton.cdiv(N, block_c))](
        token_max, q_offsets, scores, N, BLOCK_C=block_c, num_warps=4
    )
    return scores, argmax


def _doc_tiles(layout: Layout, block_n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(document, first token) of every document-token tile: tiles never straddle two documents."""
    docs, starts = [], []
    for d, (start, end) in enumerate(zip(layout.d_offsets, layout.d_offsets[1:])):
        for s in range(start, end, block_n):
            docs.append(d)
            starts.append(s)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32).to(device)
    return as_tensor(docs), as_tensor(starts)


def _triton_backward(q_tokens, d_tokens, layout: Layout, g, argmax, q_offsets, d_offsets, query):
    (Tq, D), N = q_tokens.shape, layout.num_docs
    tiles = MaxsimTiles.of(layout, D, q_tokens.dtype)
    d_q = torch.empty_like(q_tokens)
    d_d = torch.empty_like(d_tokens)
    if Tq == 0 or N == 0:
        return d_q.zero_(), d_d.zero_()
    shared = dict(
        Tq=Tq, N=N, D=D, first_negative=layout.first_negative, R=max(layout.negatives, 1), BLOCK_D=tiles.block_d
    )
    _query_grad_kernel[(triton.cdiv(Tq, GRAD_BLOCK_M),)](
        d_tokens, argmax, g, query, d_q, BLOCK_M=GRAD_BLOCK_M, num_warps=4, **shared
    )
    tile_doc, tile_start = _doc_tiles(layout, DOC_GRAD_BLOCK_N, q_tokens.device)
    _doc_grad_kernel[(tile_doc.shape[0],)](
        q_tokens, argmax, g, query, q_offsets, d_offsets, tile_doc, tile_start, d_d, BLOCK_N=DOC_GRAD_BLOCK_N,
        BLOCK_M=DOC_GRAD_BLOCK_M, UPCAST=tiles.upcast, num_warps=DOC_GRAD_WARPS, num_stages=FORWARD_STAGES, **shared,
    )  # fmt: skip
    return d_q, d_d
