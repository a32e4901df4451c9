"""The reference path's attention, run as the public MoCa code runs it with attn_implementation="flash_attention_2".

With flash_attention_2, transformers drops the padding of each right-padded text batch (the 2D attention mask
gives the real tokens and their cu_seqlens), runs flash-attn's varlen kernel over the unpadded tokens and puts the
result back in the padded layout (zeros at padding), and the Qwen2.5-VL vision tower attends within every window
or image of a block through their cu_seqlens in one call. Under any other implementation (sdpa, eager) the text
attention runs over the padded [B, L, L] batch and the vision tower calls attention once per window in a Python
loop, which would make the reference slower than it is.

Where flash-attn serves (CUDA, installed) the reference path uses transformers' own flash_attention_2. Elsewhere
`use_varlen_attention` registers `varlen_attention_forward` in transformers' attention registry: the same calling
convention and the same unpadding, with the kernel moca_fast's dispatch picks (`moca_fast.model.attention`): torch's
varlen_attn (FlashAttention-2 inside torch) on CUDA, one SDPA call over the padded segments on the CPU. Attention
is bidirectional only: a module that asks for causal attention is refused, so a decoder that was not made
non-causal cannot run through it by mistake.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moca_fast.model.attention import Segments, varlen_attention

# transformers sends an implementation through flash_attention_2's varlen calling convention (cu_seqlens for the
# vision windows, the text padding mask kept as a 2D mask) when its name contains "flash", hence the prefix.
PREFIX = "flash_varlen_"


def implementation_name(backend: str) -> str:
    """The registered name of the varlen attention running on moca_fast's `backend` ('varlen', 'sdpa', ...)."""
    return PREFIX + backend


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    backend: str,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **_,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q [B, Hq, L, D], k/v [B, Hkv, L, D] -> ([B, L, Hq, D], None).

    Vision (cu_seq_lens_* given, B = 1): each window or image attends within itself, one call for all of them.
    Text: `attention_mask` is the [B, L] padding mask (None when no row is padded); the real tokens of each row
    attend to each other only, and padded positions come out as zeros."""
    if module.is_causal if is_causal is None else is_causal:
        raise ValueError(
            f"{type(module).__name__} asks for causal attention; the reference path's attention is "
            "bidirectional only (make the decoder non-causal first)"
        )
    if dropout or sliding_window is not None:
        raise ValueError(
            f"attention dropout ({dropout}) and sliding windows ({sliding_window}) are not supported "
            "(the reference has neither)"
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, L, H, D]
    if torch.is_autocast_enabled(q.device.type) and q.dtype == torch.float32:  # as flash_attention_2 does
        q, k, v = (x.to(torch.get_autocast_dtype(q.device.type)) for x in (q, k, v))
    batch, length = q.shape[:2]
    if cu_seq_lens_q is not None:
        if cu_seq_lens_k is None or not torch.equal(cu_seq_lens_q, cu_seq_lens_k) or batch != 1:
            raise ValueError("varlen attention takes one packed sequence with the same bounds for queries and keys")
        max_length = max_length_q if max_length_q is not None else int(cu_seq_lens_q.diff().max())
        segments = Segments.build(cu_seq_lens_q, max_length, length, backend)
        return varlen_attention(q[0], k[0], v[0], segments, scale).unsqueeze(0), None
    if (
        attention_mask is None
        and position_ids is not None
        and batch == 1
        and length > 1
        and bool((position_ids.reshape(-1).diff() != 1).any())
    ):
        raise ValueError("padding-free packed input given by position_ids is not supported: pass the padding mask")
    if attention_mask is not None and attention_mask.shape != (batch, length):
        raise ValueError(f"expected a [{batch}, {length}] padding mask, got {tuple(attention_mask.shape)}")
    real = (
        attention_mask.bool()
        if attention_mask is not None
        else torch.ones(batch, length, dtype=torch.bool, device=q.device)
    )
    lengths = real.sum(1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    rows = real.flatten().nonzero().squeeze(1)  # row-major: each row's real tokens stay together
    packed = [x.reshape(batch * length, *x.shape[2:])[rows] for x in (q, k, v)]
    segments = Segments.build(cu_seqlens, int(lengths.max()), rows.numel(), backend)  # a host sync, as flash's
    out = varlen_attention(*packed, segments, scale)
    padded = out.new_zeros(batch * length, *out.shape[1:]).index_copy(0, rows, out)
    return padded.view(batch, length, *out.shape[1:]), None


def register(backend: str) -> str:
    """Register the varlen attention on `backend` (and flash_attention_2's mask: the 2D padding mask, or None when
    nothing is padded) in transformers' registries; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    name = implementation_name(backend)

    def attention(*args, **kwargs):
        return varlen_attention_forward(*args, backend=backend, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def use_varlen_attention(hf_model, backend: str) -> str:
    """Switch a transformers Qwen2.5-VL (its text and vision configs) to the varlen attention on `backend`;
    returns the implementation's name. Set on the configs directly: `set_attn_implementation` would try to load a
    flash kernel for any name containing "flash"."""
    name = register(backend)
    hf_model.config._attn_implementation = name  # the setter also sets every sub-config (text, vision)
    for module_name, module in hf_model.named_modules():
        config = getattr(module, "config", None)
        if module_name.endswith("attn") and config is not None and config._attn_implementation != name:
            raise RuntimeError(f"{module_name} kept attention {config._attn_implementation!r} instead of {name!r}")
    return name
