"""A CPU implementation of torch's varlen FlashAttention ops for tests: torch ships them for CUDA only.

`cpu_varlen_attention()` registers, for CPU tensors, the forward and backward of `torch_attn::_varlen_attn` (the
op behind torch.nn.attention.varlen.varlen_attn) as a per-segment fp64 softmax attention with the gradient written
out by hand, and checks the arguments a caller passes as the flash kernel would need them: int32 bounds, maxima
that equal the longest segments, full or causal (window (-1, 0)) attention, grouped K/V only with enable_gqa. So the
model's varlen path runs on the CPU through torch's own public function, its custom op and its autograd formula.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.attention.varlen


def _check_bounds(cu: torch.Tensor, maximum: int, total: int, what: str) -> list[int]:
    assert cu.dtype == torch.int32, f"{what}: cu_seqlens must be int32, got {cu.dtype}"
    bounds = cu.tolist()
    assert bounds[0] == 0 and bounds[-1] == total, f"{what}: bounds {bounds} do not cover {total} rows"
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    assert min(lengths) >= 0 and maximum == max(lengths, default=0), f"{what}: max {maximum} for lengths {lengths}"
    return bounds


def _causal(is_causal, window_size) -> bool:
    """Whether the op is asked for causal attention; full and causal are the only windows the model uses."""
    window = list(window_size or (-1, -1))
    assert window in ([-1, -1], [-1, 0]), f"window {window}: attention must be full or causal"
    assert is_causal == (window == [-1, 0]) or (is_causal and window == [-1, -1]), "is_causal disagrees with window"
    return bool(is_causal)


def _scores(q, k, scale, causal):
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:  # query i sees keys 0..i of its segment (self-attention: as many queries as keys)
        assert q.shape[0] == k.shape[0], "causal attention needs equal query and key segments"
        scores = scores.masked_fill(torch.ones(scores.shape[1:], dtype=torch.bool).triu(1), float("-inf"))
    return scores


def _segments(query, key, cu_q, cu_k, max_q, max_k, is_causal, window_size):
    q_bounds = _check_bounds(cu_q, max_q, query.shape[0], "queries")
    k_bounds = _check_bounds(cu_k, max_k, key.shape[0], "keys")
    assert len(q_bounds) == len(k_bounds), "queries and keys must have as many segments"
    return list(zip(q_bounds, q_bounds[1:], k_bounds, k_bounds[1:]))


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.double().repeat_interleave(heads // x.shape[1], dim=1)


def _forward(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    is_causal=False,
    scale=None,
    window_size=None,
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    assert seqused_k is None and block_table is None
    heads = query.shape[1]
    assert enable_gqa or key.shape[1] == heads, "grouped K/V passed without enable_gqa"
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    causal = _causal(is_causal, window_size)
    out = torch.zeros(query.shape, dtype=torch.float64)
    lse = torch.zeros(heads, query.shape[0], dtype=torch.float32)
    for q0, q1, k0, k1 in _segments(query, key, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, window_size):
        q, k, v = query[q0:q1].double(), _expand(key[k0:k1], heads), _expand(value[k0:k1], heads)
        scores = _scores(q, k, scale, causal)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        lse[:, q0:q1] = scores.logsumexp(-1).float()
    return out.to(query.dtype), lse, torch.zeros(2, dtype=torch.uint64)


def _backward(
    grad_out,
    query,
    key,
    value,
    out,
    lse,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    is_causal,
    rng_state,
    scale=None,
    window_size=None,
):
    heads, group = query.shape[1], query.shape[1] // key.shape[1]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    causal = _causal(is_causal, window_size)
    dq = torch.zeros(query.shape, dtype=torch.float64)
    dk = torch.zeros(key.shape, dtype=torch.float64)
    dv = torch.zeros(value.shape, dtype=torch.float64)
    for q0, q1, k0, k1 in _segments(query, key, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, window_size):
        q, k, v = query[q0:q1].double(), _expand(key[k0:k1], heads), _expand(value[k0:k1], heads)
        p = _scores(q, k, scale, causal).softmax(-1)
        d_out = grad_out[q0:q1].double()
        dp = torch.einsum("qhd,khd->hqk", d_out, v)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
        dq[q0:q1] = torch.einsum("hqk,khd->qhd", ds, k)
        # Each K/V head collects the gradients of its group of query heads.
        dk[k0:k1] = torch.einsum("hqk,qhd->khd", ds, q).unflatten(1, (-1, group)).sum(2)
        dv[k0:k1] = torch.einsum("hqk,qhd->khd", p, d_out).unflatten(1, (-1, group)).sum(2)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


@contextlib.contextmanager
def cpu_varlen_attention():
    """Within the block, torch's varlen_attn runs on CPU tensors (forward and backward) through this oracle."""
    library = torch.library.Library("torch_attn", "IMPL")
    try:
        library.impl("_varlen_attn", _forward, "CPU")
        library.impl("_varlen_attn_backward", _backward, "CPU")
        yield
    finally:
        library._destroy()
