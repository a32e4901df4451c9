"""Masked-LM loss: the LM head and cross-entropy fused over the gathered masked rows, logits never in memory.

`masked_lm_cross_entropy(hidden [M, H], weight [V, H], labels [M])` = mean over the M rows of
-log softmax(hidden @ weightᵀ)[label], in fp32 whatever the input dtype; gradients come back in the input
dtype. Under autocast the operands enter the kernels in autocast's dtype (bf16 tensor-core dots, fp32
accumulation), as a matmul's would. Any V (151936, 152064, ...), M = 0 (loss 0, zero gradients). The weight may
also be the embedding table (tied head): its gradient is an ordinary autograd contribution and adds to the
embedding's.
Labels must lie in [0, V); the rows are already the masked ones, so there is no ignore index.
"""

from __future__ import annotations

import torch

from . import _linear_ce
from ._common import autocast_off, autocast_operands, resolve_backend

_NO_TERMS = _linear_ce.LogitTerms()


def masked_lm_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Mean cross-entropy of the LM head over the masked rows (fp32 scalar).

    backend: 'auto' (Triton on CUDA, chunked torch otherwise), 'triton' or 'torch'."""
    hidden, weight = autocast_operands(hidden, weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        shapes = f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"hidden [M, H] and weight [V, H] expected, got {shapes}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [M] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    loss, _ = _masked_lm_ce(hidden, weight, labels, resolve_backend(backend, hidden))
    return loss


@torch.library.custom_op("moca_fast::masked_lm_ce", mutates_args=())
def _masked_lm_ce(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-row log-sum-exp kept for the backward)."""
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    with autocast_off(hidden):
        lse, target = _linear_ce.forward(hidden, weight, labels, _NO_TERMS, backend)
    return (lse - target).sum() / max(hidden.shape[0], 1), lse


@_masked_lm_ce.register_fake
def _(hidden, weight, labels, backend):
    return hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape[:1], dtype=torch.float32)


@torch.library.custom_op("moca_fast::masked_lm_ce_backward", mutates_args=())
def _masked_lm_ce_backward(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    grad_scale = grad.float() / max(hidden.shape[0], 1)
    with autocast_off(hidden):
        d_hidden, d_weight, _ = _linear_ce.backward(hidden, weight, labels, lse, grad_scale, _NO_TERMS, backend)
    return d_hidden.to(hidden.dtype), d_weight


@_masked_lm_ce_backward.register_fake
def _(grad, hidden, weight, labels, lse, backend):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, backend = inputs
    ctx.save_for_backward(hidden, weight, labels, output[1])
    ctx.backend = backend


def _backward(ctx, grad_loss, _grad_lse):
    hidden, weight, labels, lse = ctx.saved_tensors
    d_hidden, d_weight = _masked_lm_ce_backward(grad_loss, hidden, weight, labels, lse, ctx.backend)
    return d_hidden, d_weight, None, None


_masked_lm_ce.register_autograd(_backward, setup_context=_setup_context)
