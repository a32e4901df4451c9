"""Attention over packed variable-length sequences, dispatched to the best available backend.

Bidirectional (MoCa) unless a `Segments` is causal (a causally trained checkpoint such as colpali-engine's ColQwen2.5:
each token attends to itself and the tokens before it in its own sequence).

On CUDA in half precision: flash-attn's varlen kernel when it is installed, else torch's own variable-length
FlashAttention (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10). Both take the packed tokens and the
cumulative bounds as they are: no padding, no mask, nothing built per forward beyond the bounds. Otherwise
(CPU, tests, fp32 on CUDA): one SDPA call over the documents padded into a [S, max_len] batch with a key mask —
the same arithmetic as a per-document loop, without the loop or a host synchronisation; its gather/scatter
indices are integer tensors computed once per `Segments`, so a compiled layer has no data-dependent shapes.
A `Segments` is built once per forward and per layout, then shared by every layer. Queries and keys may have
different bounds (the MAE layer: queries on masked rows only, keys on whole documents).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("flash", "varlen", "sdpa")
_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """'auto': on CUDA with bf16/fp16 attention inputs flash-attn (if installed), else torch's varlen_attn;
    SDPA otherwise (CPU, fp32: the flash kernels take half precision only). The choice is logged once."""
    if requested == "auto":
        if device.type == "cuda" and dtype in _HALF and _flash_attn_available():
            backend = "flash"
        elif device.type == "cuda" and dtype in _HALF and _torch_varlen_available():
            backend = "varlen"
        else:
            backend = "sdpa"
    elif requested in BACKENDS:
        backend = requested
    else:
        raise ValueError(f"unknown attention backend {requested!r}; choose 'auto' or one of {BACKENDS}")
    _log_choice(backend, device.type, str(dtype))
    return backend


def backend_for(requested: str, x: torch.Tensor) -> str:
    """The backend for attention whose inputs are computed from `x`: in autocast's dtype when autocast is on
    for x's device, else in x's own dtype."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    return resolve_backend(requested, x.device, dtype)


@functools.cache
def _log_choice(backend: str, device_type: str, dtype: str) -> None:
    log.info("attention backend: %s on %s (%s)", backend, device_type, dtype)


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
    causal: bool = False
    _prepared: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        total: int,
        backend: str,
        q_bounds: Bounds | None = None,
        causal: bool = False,
    ) -> Segments:
        """Self-attention within segments (`causal`: each token attends to its own segment's tokens up to itself);
        with `q_bounds`, queries have their own bounds per segment (never causal)."""
        if causal and q_bounds is not None:
            raise ValueError("causal attention is self-attention: queries cannot have their own bounds")
        k = Bounds(cu_seqlens.to(torch.int32), int(max_seqlen), int(total))
        if q_bounds is not None:
            q_bounds = Bounds(q_bounds.cu_seqlens.to(torch.int32), int(q_bounds.max_seqlen), int(q_bounds.total))
        seg = cls(q_bounds or k, k, backend, causal)
        if backend == "sdpa":
            seg._prepared["q"] = _padded_indices(seg.q)
            seg._prepared["k"] = seg._prepared["q"] if q_bounds is None else _padded_indices(seg.k)
            valid = seg._prepared["k"][1][:, None, None, :]  # [S, 1, 1, L]: the key slots that hold a token
            if causal:
                slots = torch.arange(valid.shape[-1], device=valid.device)
                valid = valid & (slots[None, :] <= slots[:, None])  # [S, 1, L, L]: keys up to the query's slot
            seg._prepared["mask"] = valid
        return seg


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float
) -> torch.Tensor:
    """Attention within each segment, causal if `segments` is. q [Tq, Hq, D], k/v [Tk, Hkv, D] (Hq a multiple of
    Hkv)."""
    if q.shape[0] == 0:  # no queries (a pack without masked image rows for the MAE layer): an empty output, which
        # k and v still enter with weight zero, so every parameter takes part in the backward (FSDP needs it)
        return q + 0.0 * (k.sum() + v.sum())
    gqa = q.shape[1] != k.shape[1]
    qb, kb = segments.q, segments.k
    if segments.backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q,
            k,
            v,
            qb.cu_seqlens,
            kb.cu_seqlens,
            qb.max_seqlen,
            kb.max_seqlen,
            softmax_scale=scale,
            causal=segments.causal,
        )
    if segments.backend == "varlen":
        return torch_varlen_attention(q, k, v, qb, kb, scale, segments.causal)
    (q_gather, _, q_unpad), (k_gather, _, _) = segments._prepared["q"], segments._prepared["k"]
    # [S, L, H, D] -> [S, H, L, D]; padded query rows attend to their segment's keys and are dropped after.
    out = F.scaled_dot_product_attention(
        q[q_gather].transpose(1, 2),
        k[k_gather].transpose(1, 2),
        v[k_gather].transpose(1, 2),
        attn_mask=segments._prepared["mask"],
        scale=scale,
        enable_gqa=gqa,
    )
    return out.transpose(1, 2).flatten(0, 1)[q_unpad]


@functools.cache
def _varlen_options(causal: bool) -> tuple[dict, bool]:
    """The keyword arguments that make the installed torch's varlen_attn bidirectional (or causal), and whether it
    takes grouped-query K/V itself. torch 2.10 has `is_causal`; 2.11+ `window_size` ((-1, -1) = full, the default;
    (-1, 0) = causal); `enable_gqa` arrived later (detected, not assumed)."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        options = {"window_size": (-1, 0) if causal else (-1, -1)}
    elif "is_causal" in parameters:
        options = {"is_causal": causal}
    elif causal:
        raise RuntimeError("this torch's varlen_attn takes neither window_size nor is_causal: it cannot run causally")
    else:
        options = {}
    return options, "enable_gqa" in parameters


def torch_varlen_attention(
    q, k, v, q_bounds: Bounds, k_bounds: Bounds, scale: float, causal: bool = False
) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn over packed q [Tq, Hq, D] and k/v [Tk, Hkv, D] (`causal`: each query
    attends to the keys up to its own position); where the installed torch takes no grouped K/V, each K/V head is
    repeated for its group of query heads."""
    from torch.nn.attention.varlen import varlen_attn

    options, takes_gqa = _varlen_options(causal)
    if q.shape[1] != k.shape[1]:
        if takes_gqa:
            options = {**options, "enable_gqa": True}
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return varlen_attn(
        q,
        k,
        v,
        q_bounds.cu_seqlens,
        k_bounds.cu_seqlens,
        q_bounds.max_seqlen,
        k_bounds.max_seqlen,
        scale=scale,
        **options,
    )


def _padded_indices(bounds: Bounds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gather [S, L]: token index of each padded slot, valid [S, L]: whether the slot holds a token, unpad [T]:
    each token's slot in the flattened [S * L] layout)."""
    cu = bounds.cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    width = max(bounds.max_seqlen, 1)
    offsets = torch.arange(width, device=cu.device)
    valid = offsets.unsqueeze(0) < lengths.unsqueeze(1)  # [S, L]
    gather = (cu[:-1].unsqueeze(1) + offsets).clamp(max=max(bounds.total - 1, 0))
    segment = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu.device), lengths, output_size=bounds.total
    )
    unpad = segment * width + torch.arange(bounds.total, device=cu.device) - cu[segment]
    return gather, valid, unpad
