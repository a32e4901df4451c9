"""Plain torch oracles of the fused losses: the whole matrix in memory, computed in the inputs' dtype.

Tests call them in fp64. Each returns an fp32 scalar; with no rows it returns 0.0 with zero gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_lm_ce_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits hidden [M, H] @ weight [V, H]ᵀ against labels [M]."""
    logits = hidden @ weight.T
    if labels.numel() == 0:
        return logits.sum().float()
    return F.cross_entropy(logits, labels).float()


def patch_reconstruction_reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean squared error of the predictions hidden [K, H] @ weight [N, H]ᵀ + bias against targets [K, N]."""
    predictions = hidden @ weight.T + bias
    if targets.numel() == 0:
        return predictions.sum().float()
    return F.mse_loss(predictions, targets.to(predictions.dtype)).float()


def info_nce_reference(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 0.03,
    normalize: bool = True,
    duplicate_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE: query i [B, D] against every positive [G, D] and its own negatives [B, r, D]; its positive is
    row targets[i]. Logits are cosines (dots when normalize=False) over an fp32 temperature. With duplicate_ids [G],
    positives that share the id of query i's positive (other than that positive) leave its denominator."""
    if normalize:
        queries, positives = F.normalize(queries, dim=-1), F.normalize(positives, dim=-1)
        negatives = None if negatives is None else F.normalize(negatives, dim=-1)
    logits = queries @ positives.T
    if duplicate_ids is not None:
        same = duplicate_ids[None, :] == duplicate_ids[targets][:, None]
        same[torch.arange(len(targets)), targets] = False
        logits = logits.masked_fill(same, float("-inf"))
    if negatives is not None:
        logits = torch.cat([logits, torch.einsum("bd,brd->br", queries, negatives)], dim=1)
    logits = logits / torch.tensor(temperature, dtype=torch.float32).to(logits.dtype)
    if targets.numel() == 0:
        return logits.sum().float()
    return F.cross_entropy(logits, targets).float()


def maxsim_scores_reference(q_tokens, q_cu_seqlens, d_tokens, d_cu_seqlens) -> torch.Tensor:
    """[Q, N] in the inputs' dtype: Σ over query i's tokens (rows q_cu_seqlens[i]:[i+1]) of the max over document
    j's tokens of the dot product, from the whole [Tq, Td] similarity matrix."""
    q_bounds, d_bounds = q_cu_seqlens.tolist(), d_cu_seqlens.tolist()
    similarity = q_tokens @ d_tokens.T
    token_max = torch.stack([similarity[:, a:b].max(dim=1).values for a, b in zip(d_bounds, d_bounds[1:])], dim=1)
    return torch.stack([token_max[a:b].sum(dim=0) for a, b in zip(q_bounds, q_bounds[1:])])


def maxsim_info_nce_reference(
    q_tokens: torch.Tensor,
    q_cu_seqlens: torch.Tensor,
    d_tokens: torch.Tensor,
    d_cu_seqlens: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    negatives: int | None = None,
    duplicate_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean late-interaction InfoNCE over maxsim_scores_reference's scores; logits = score / fp32 temperature. With
    negatives=r the last Q·r documents are hard negatives, r per query in query
    order, each in its own query's softmax only. duplicate_mask [Q, N] leaves documents (never the target) out."""
    scores = maxsim_scores_reference(q_tokens, q_cu_seqlens, d_tokens, d_cu_seqlens)
    Q, N = scores.shape
    left_out = torch.zeros((Q, N), dtype=torch.bool)
    if duplicate_mask is not None:
        left_out |= duplicate_mask.cpu()
    if negatives:
        for i in range(Q):
            for k in range(N - Q * negatives, N):
                left_out[i, k] |= (k - (N - Q * negatives)) // negatives != i
    left_out[torch.arange(Q), targets.cpu()] = False
    logits = scores.masked_fill(left_out.to(scores.device), float("-inf"))
    logits = logits / torch.tensor(temperature, dtype=torch.float32).to(logits.dtype)
    if targets.numel() == 0:
        return logits.sum().float()
    return F.cross_entropy(logits, targets).float()
