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


def _padded(tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed tokens [T, D] with bounds cu_seqlens [S+1] -> zero-padded [S, L, D] and its validity mask [S, L]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    padded = torch.nn.utils.rnn.pad_sequence(list(tokens.split(lengths)), batch_first=True)
    positions = torch.arange(padded.shape[1], device=tokens.device)
    valid = positions[None, :] < torch.tensor(lengths, device=tokens.device)[:, None]
    return padded, valid


def maxsim_reference(q: torch.Tensor, q_valid: torch.Tensor, d: torch.Tensor, d_valid: torch.Tensor,
                     pairs: str) -> torch.Tensor:
    """MaxSim of padded queries q [Q, Lq, D] against padded documents: every query against every document
    (d [N, Ld, D], pairs="all" -> [Q, N]) or against its own (d [Q, r, Ld, D], pairs="own" -> [Q, r])."""
    if pairs == "all":
        sim = torch.einsum("qid,njd->qnij", q, d).masked_fill(~d_valid[None, :, None, :], float("-inf"))
        return (sim.amax(dim=-1) * q_valid[:, None, :]).sum(dim=-1)
    sim = torch.einsum("qid,qrjd->qrij", q, d).masked_fill(~d_valid[:, :, None, :], float("-inf"))
    return (sim.amax(dim=-1) * q_valid[:, None, :]).sum(dim=-1)


def maxsim_info_nce_reference(
    q_tokens: torch.Tensor,
    q_cu_seqlens: torch.Tensor,
    d_tokens: torch.Tensor,
    d_cu_seqlens: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
    duplicate_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean late-interaction InfoNCE: score(q, d) = sum over q's tokens of the max over d's tokens of their dot
    product, for the Q packed queries (q_tokens [Tq, D], bounds q_cu_seqlens [Q+1]) against every one of the N
    packed documents (d_tokens [Td, D], d_cu_seqlens [N+1]) and, with `negatives` = (tokens [Tn, D], bounds
    [Q*r+1]), against its own r hard negatives (query i's are sequences i*r .. i*r+r-1); query i's positive is
    document targets[i]; logits = score / temperature; duplicate_mask [Q, N] True drops a document from a query's
    denominator. Every query-token x document-token similarity is materialised (the oracle)."""
    q, q_valid = _padded(q_tokens, q_cu_seqlens)
    d, d_valid = _padded(d_tokens, d_cu_seqlens)
    logits = maxsim_reference(q, q_valid, d, d_valid, "all")
    if duplicate_mask is not None:
        logits = logits.masked_fill(duplicate_mask, float("-inf"))
    if negatives is not None:
        n, n_valid = _padded(*negatives)
        r = n.shape[0] // max(q.shape[0], 1)
        own = maxsim_reference(q, q_valid, n.reshape(q.shape[0], r, *n.shape[1:]), n_valid.reshape(q.shape[0], r, -1),
                               "own")
        logits = torch.cat([logits, own], dim=1)
    logits = logits / torch.tensor(temperature, dtype=torch.float32).to(logits.dtype)
    if targets.numel() == 0:
        return logits.sum().float()
    return F.cross_entropy(logits, targets).float()
