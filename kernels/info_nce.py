"""Contrastive loss over gathered embeddings: InfoNCE with hard negatives, never forming the [B, G] matrix.

`info_nce_loss(queries [B, D], positives [G, D], negatives [B, r, D] | None, targets [B])`: query i is scored
against all G gathered positives and its own r hard negatives; its positive is row targets[i]. Logits are
cosines (or dot products with normalize=False) times 1/temperature in fp32; the loss is the mean cross-entropy
over the B queries, in fp32. With duplicate_ids [G], a positive j other than targets[i] with
duplicate_ids[j] == duplicate_ids[targets[i]] leaves query i's denominator (the same content twice in the
gathered batch is not a negative).

Positives and each query's own negatives go through the shared blockwise cross-entropy engine (tiled online
log-sum-exp, recomputation in the backward; on CUDA the negatives are scored inside the same Triton pass and
their gradients formed by one kernel); L2 normalisation is folded in as per-row fp32 scales 1/‖x‖ rather than
normalised copies, and its backward is the projection dx = s·(ĝ - x̂ (x̂·ĝ)). Under autocast the embeddings enter in
autocast's dtype (bf16 tensor-core dots, fp32 accumulation), as a matmul's would. Memory is O((B + G + B·r)·D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _linear_ce
from ._common import autocast_off, autocast_operands, resolve_backend

_NORM_EPS = 1e-12  # as F.normalize


def info_nce_loss(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 0.03,
    normalize: bool = True,
    duplicate_ids: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean InfoNCE loss (fp32 scalar); gradients reach queries, positives and negatives in their dtypes.

    backend: 'auto' (Triton on CUDA, chunked torch otherwise), 'triton' or 'torch'."""
    B, D = queries.shape
    if negatives is None:
        negatives = queries.new_empty((B, 0, D))
    queries, positives, negatives = autocast_operands(queries, positives, negatives)
    if positives.dim() != 2 or positives.shape[1] != D or negatives.shape[::2] != (B, D) or negatives.dim() != 3:
        raise ValueError(
            f"queries [B, D], positives [G, D] and negatives [B, r, D] expected, got {tuple(queries.shape)}, "
            f"{tuple(positives.shape)} and {tuple(negatives.shape)}"
        )
    if targets.shape != (B,):
        raise ValueError(f"targets must be [B] = [{B}], got {tuple(targets.shape)}")
    if duplicate_ids is not None and duplicate_ids.shape != positives.shape[:1]:
        raise ValueError(f"duplicate_ids must be [G] = [{positives.shape[0]}], got {tuple(duplicate_ids.shape)}")
    if not queries.dtype == positives.dtype == negatives.dtype:
        raise ValueError(f"embeddings must share a dtype, got {queries.dtype}, {positives.dtype}, {negatives.dtype}")
    backend = resolve_backend(backend, queries)
    loss, _ = _info_nce(queries, positives, negatives, targets, float(temperature), normalize, duplicate_ids, backend)
    return loss


@dataclass(frozen=True)
class _Scales:
    """fp32 factors that turn raw dot products into logits: z_ij = query[i] · pos[j] · (q_inv[i] / t) · p_inv[j]."""

    query: torch.Tensor  # [B]: 1 / (‖q_i‖ temperature), or 1 / temperature
    positive: torch.Tensor | None  # [G]: 1 / ‖p_j‖ when normalising
    negative: torch.Tensor | None  # [B, r]: 1 / ‖n_ik‖ when normalising
    query_norm: torch.Tensor | None  # [B]: 1 / ‖q_i‖ when normalising

    @staticmethod
    def of(queries, positives, negatives, temperature: float, normalize: bool) -> _Scales:
        if not normalize:
            inverse_t = queries.new_full(queries.shape[:1], 1.0 / temperature, dtype=torch.float32)
            return _Scales(inverse_t, None, None, None)
        query_norm = _inverse_norm(queries)
        return _Scales(query_norm / temperature, _inverse_norm(positives), _inverse_norm(negatives), query_norm)

    def logit_terms(self, negatives, duplicate_ids) -> _linear_ce.LogitTerms:
        groups = None if duplicate_ids is None else duplicate_ids.contiguous()
        return _linear_ce.LogitTerms(
            row_scale=self.query,
            col_scale=self.positive,
            col_groups=groups,
            negatives=negatives if negatives.shape[1] else None,
            negative_scale=self.negative if negatives.shape[1] else None,
        )


def _inverse_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(_NORM_EPS).reciprocal()


def _through_normalization(x: torch.Tensor, inverse_norm: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
    """Gradient with respect to x from `grad`, the gradient with the norm held constant (the scale 1/‖x‖ is
    already in it): adds the norm's own dependence on x, grad - x (x·grad)/‖x‖², in fp32. No norm: `grad`."""
    if inverse_norm is None:
        return grad
    x, grad = x.float(), grad.float()
    return grad - x * (inverse_norm.square() * (x * grad).sum(-1))[..., None]


@torch.library.custom_op("moca_fast::info_nce", mutates_args=())
def _info_nce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    normalize: bool,
    duplicate_ids: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-query log-sum-exp over positives and own negatives, kept for the backward)."""
    queries, positives, negatives, targets = (t.contiguous() for t in (queries, positives, negatives, targets))
    with autocast_off(queries):
        scales = _Scales.of(queries, positives, negatives, temperature, normalize)
        terms = scales.logit_terms(negatives, duplicate_ids)
        lse, target = _linear_ce.forward(queries, positives, targets, terms, backend)
    return (lse - target).sum() / max(queries.shape[0], 1), lse


@_info_nce.register_fake
def _(queries, positives, negatives, targets, temperature, normalize, duplicate_ids, backend):
    return queries.new_empty((), dtype=torch.float32), queries.new_empty(queries.shape[:1], dtype=torch.float32)


@torch.library.custom_op("moca_fast::info_nce_backward", mutates_args=())
def _info_nce_backward(
    grad: torch.Tensor,
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    normalize: bool,
    duplicate_ids: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    queries, positives, negatives, targets = (t.contiguous() for t in (queries, positives, negatives, targets))
    with autocast_off(queries):
        scales = _Scales.of(queries, positives, negatives, temperature, normalize)
        grad_scale = grad.float() / max(queries.shape[0], 1)
        terms = scales.logit_terms(negatives, duplicate_ids)
        d_queries, d_positives, d_negatives = _linear_ce.backward(
            queries, positives, targets, lse, grad_scale, terms, backend
        )
        if d_negatives is None:
            d_negatives = torch.zeros_like(negatives)
        return (
            _through_normalization(queries, scales.query_norm, d_queries).to(queries.dtype),
            _through_normalization(positives, scales.positive, d_positives).to(positives.dtype),
            _through_normalization(negatives, scales.negative, d_negatives).to(negatives.dtype),
        )


@_info_nce_backward.register_fake
def _(grad, queries, positives, negatives, targets, lse, temperature, normalize, duplicate_ids, backend):
    return torch.empty_like(queries), torch.empty_like(positives), torch.empty_like(negatives)


def _setup_context(ctx, inputs, output):
    queries, positives, negatives, targets, temperature, normalize, duplicate_ids, backend = inputs
    ctx.save_for_backward(queries, positives, negatives, targets, output[1], duplicate_ids)
    ctx.options = (temperature, normalize, backend)


def _backward(ctx, grad_loss, _grad_lse):
    queries, positives, negatives, targets, lse, duplicate_ids = ctx.saved_tensors
    temperature, normalize, backend = ctx.options
    d_queries, d_positives, d_negatives = _info_nce_backward(
        grad_loss, queries, positives, negatives, targets, lse, temperature, normalize, duplicate_ids, backend
    )
    return d_queries, d_positives, d_negatives, None, None, None, None, None


_info_nce.register_autograd(_backward, setup_context=_setup_context)
