"""Bidirectional attention over packed variable-length sequences, dispatched to the best available backend.

flash-attn's varlen kernel when it is importable and the tensors are on CUDA; otherwise FlexAttention with a
document block mask on CUDA; otherwise (CPU, tests) one SDPA call over the documents padded into a
[S, max_len] batch with a key mask — the same arithmetic as a per-document loop, without the loop or a host
synchronisation. A `Segments` is built once per forward and per layout, then shared by every layer. Queries
and keys may have different bounds (the MAE layer: queries on masked rows only, keys on whole documents).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("flash", "flex", "sdpa")


@functools.cache
def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(requested: str, device: torch.device) -> str:
    """'auto' -> flash (if installed, CUDA) -> flex (CUDA) -> sdpa. The choice is logged once per device kind."""
    if requested == "auto":
        if device.type == "cuda":
            backend = "flash" if _flash_attn_available() else "flex"
        else:
            backend = "sdpa"
    elif requested in BACKENDS:
        backend = requested
    else:
        raise ValueError(f"unknown attention backend {requested!r}; choose 'auto' or one of {BACKENDS}")
    _log_choice(backend, device.type)
    return backend


@functools.cache
def _log_choice(backend: str, device_type: str) -> None:
    log.info("attention backend: %s on %s", backend, device_type)


@dataclass
class Bounds:
    """Cumulative bounds [S+1] (int32, on the tensors' device) of S packed segments, their max and total."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    total: int


@dataclass
class Segments:
    """Query and key segment bounds (documents, images, windows) and what the backend precomputes."""

    q: Bounds
    k: Bounds
    backend: str
    _prepared: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, max_seqlen: int, total: int, backend: str,
              q_bounds: Bounds | None = None) -> "Segments":
        """Self-attention within segments; with `q_bounds`, queries have their own bounds per segment."""
        k = Bounds(cu_seqlens.to(torch.int32), int(max_seqlen), int(total))
        seg = cls(q_bounds or k, k, backend)
        if backend == "sdpa":
            seg._prepared["q"] = _padded_indices(seg.q)
            seg._prepared["k"] = seg._prepared["q"] if q_bounds is None else _padded_indices(seg.k)
        elif backend == "flex":
            seg._prepared["block_mask"] = _document_block_mask(seg)
        return seg


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float
                     ) -> torch.Tensor:
    """Non-causal attention within each segment. q [Tq, Hq, D], k/v [Tk, Hkv, D] (Hq a multiple of Hkv)."""
    gqa = q.shape[1] != k.shape[1]
    if segments.backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, segments.q.cu_seqlens, segments.k.cu_seqlens, segments.q.max_seqlen,
                                      segments.k.max_seqlen, softmax_scale=scale, causal=False)
    if segments.backend == "flex":
        out = _flex_attention()(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                v.transpose(0, 1).unsqueeze(0), block_mask=segments._prepared["block_mask"],
                                scale=scale, enable_gqa=gqa)
        return out.squeeze(0).transpose(0, 1)
    (q_gather, q_valid), (k_gather, k_valid) = segments._prepared["q"], segments._prepared["k"]
    # [S, L, H, D] -> [S, H, L, D]; padded query rows attend to their segment's keys and are dropped after.
    out = F.scaled_dot_product_attention(q[q_gather].transpose(1, 2), k[k_gather].transpose(1, 2),
                                         v[k_gather].transpose(1, 2), attn_mask=k_valid[:, None, None, :],
                                         scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)[q_valid]


def _padded_indices(bounds: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
    cu = bounds.cu_seqlens
    lengths = cu[1:] - cu[:-1]
    offsets = torch.arange(max(bounds.max_seqlen, 1), device=cu.device)
    valid = offsets.unsqueeze(0) < lengths.unsqueeze(1)  # [S, L]
    gather = (cu[:-1].unsqueeze(1).long() + offsets).clamp(max=max(bounds.total - 1, 0))
    return gather, valid


def _segment_ids(bounds: Bounds) -> torch.Tensor:
    lengths = (bounds.cu_seqlens[1:] - bounds.cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                   output_size=bounds.total)


def _document_block_mask(seg: Segments):
    from torch.nn.attention.flex_attention import create_block_mask

    q_doc, k_doc = _segment_ids(seg.q), _segment_ids(seg.k)

    def same_document(b, h, q_idx, kv_idx):
        return q_doc[q_idx] == k_doc[kv_idx]

    return create_block_mask(same_document, None, None, seg.q.total, seg.k.total, device=seg.k.cu_seqlens.device)


@functools.cache
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    if torch.cuda.is_available():
        return torch.compile(flex_attention, dynamic=True)
    return flex_attention
