"""Embeddings from final hidden states: the MoCa pooled vector (mean over every token of each packed sequence, then
L2 normalisation), its Matryoshka prefixes, and the multi-vector head's per-token vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Hidden [T, H] of S packed sequences -> per-sequence means [S, H] in fp32 (no host synchronisation)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=hidden.device), lengths, output_size=hidden.shape[0]
    )
    sums = torch.zeros(lengths.numel(), hidden.shape[1], device=hidden.device, dtype=torch.float32)
    sums = sums.index_add(0, seq, hidden.float())
    return sums / lengths.unsqueeze(1)


def embed_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean pooling + L2 normalisation: the reference's embedding of each sequence, fp32 [S, H]."""
    return F.normalize(mean_pool(hidden, cu_seqlens), dim=-1)


def matryoshka_prefix(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` dimensions of embeddings [S, H], L2-normalised again (what a Matryoshka-trained model serves)."""
    return F.normalize(embeddings[:, :dim], dim=-1)


def token_vectors(hidden: torch.Tensor, projection: torch.nn.Linear) -> torch.Tensor:
    """The multi-vector head: every token's hidden state [T, H] projected to [T, D] and L2-normalised per token, fp32.

    Every token of each packed sequence is kept, special tokens included, as colpali-engine's ColQwen2.5 keeps every
    token of its attention mask (packed sequences hold no padding, so nothing else is masked)."""
    return F.normalize(projection(hidden).float(), dim=-1)
