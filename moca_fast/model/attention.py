"""Bidirectional attention over packed variable-length sequences, dispatched to the best available backend.

flash-attn's varlen kernel when it is importable and the tensors are on CUDA; otherwise FlexAttention with a
document block mask on CUDA; otherwise (CPU, tests) one SDPA call over the documents padded into a
[S, max_len] batch with a key mask — the same arithmetic as a per-document loop, without the loop or a host
synchronisation. A `Segments` is built once per forward and per layout, then shared by every layer.
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
class Segments:
    """Bounds of packed segments (documents, images or vision windows) and what a backend precomputes."""

    cu_seqlens: torch.Tensor  # [S+1] int32 on the tensors' device
    max_seqlen: int
    total: int
    backend: str
    _prepared: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, max_seqlen: int, total: int, backend: str) -> "Segments":
        seg = cls(cu_seqlens.to(torch.int32), int(max_seqlen), int(total), backend)
        if backend == "sdpa":
            seg._prepared.update(_padded_indices(seg))
        elif backend == "flex":
            seg._prepared["block_mask"] = _document_block_mask(seg)
        return seg


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float
                     ) -> torch.Tensor:
    """Non-causal attention within each segment. q [T, Hq, D], k/v [T, Hkv, D] (Hq a multiple of Hkv)."""
    if segments.backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, segments.cu_seqlens, segments.cu_seqlens, segments.max_seqlen,
                                      segments.max_seqlen, softmax_scale=scale, causal=False)
    if segments.backend == "flex":
        out = _flex_attention()(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                v.transpose(0, 1).unsqueeze(0), block_mask=segments._prepared["block_mask"],
                                scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.squeeze(0).transpose(0, 1)
    return _padded_sdpa(q, k, v, segments, scale)


def _padded_indices(seg: Segments) -> dict:
    lengths = seg.cu_seqlens[1:] - seg.cu_seqlens[:-1]
    offsets = torch.arange(seg.max_seqlen, device=seg.cu_seqlens.device)
    valid = offsets.unsqueeze(0) < lengths.unsqueeze(1)  # [S, L]
    gather = (seg.cu_seqlens[:-1].unsqueeze(1).long() + offsets).clamp(max=max(seg.total - 1, 0))
    return {"gather": gather, "valid": valid}


def _padded_sdpa(q, k, v, seg: Segments, scale: float) -> torch.Tensor:
    gather, valid = seg._prepared["gather"], seg._prepared["valid"]
    # [S, L, H, D] -> [S, H, L, D]; padded query rows attend to their segment's keys and are dropped after.
    qb, kb, vb = (x[gather].transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=valid[:, None, None, :], scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)[valid]


def _document_block_mask(seg: Segments):
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = seg.cu_seqlens[1:] - seg.cu_seqlens[:-1]
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths.long(),
                                  output_size=seg.total)

    def same_document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    return create_block_mask(same_document, None, None, seg.total, seg.total, device=seg.cu_seqlens.device)


@functools.cache
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    if torch.cuda.is_available():
        return torch.compile(flex_attention, dynamic=True)
    return flex_attention
