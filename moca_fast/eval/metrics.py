"""Retrieval metrics of the two benchmarks: precision@1 over candidate lists (MMEB), NDCG@k and recall@k (ViDoRe).

Conventions (those of the benchmarks' own evaluators): MMEB's gold candidate is candidate 0 and a tie goes to
the first candidate (numpy argmax); NDCG uses linear gains (the graded relevance itself) and the discount
1 / log2(rank + 1), as trec_eval / pytrec_eval do; documents with equal scores keep corpus order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def precision_at_1(candidate_scores: Sequence[np.ndarray]) -> float:
    """Fraction of queries whose best-scoring candidate is candidate 0; one score vector per query."""
    if not candidate_scores:
        raise ValueError("precision@1 of no queries")
    return float(np.mean([np.argmax(scores) == 0 for scores in candidate_scores]))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[Q, min(k, D)] document indices by decreasing score, ties in document order."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def ndcg_at_k(scores: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """Per-query NDCG@k [Q] from scores [Q, D] and graded relevance [Q, D] (0: not relevant); 0 where a query
    has no relevant document (callers leave such queries out, as BEIR does)."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    gains = np.take_along_axis(relevance, _top_k(scores, k), axis=1).astype(np.float64)
    dcg = (gains * discounts[: gains.shape[1]]).sum(axis=1)
    ideal = -np.sort(-relevance, axis=1)[:, :k].astype(np.float64)
    idcg = (ideal * discounts[: ideal.shape[1]]).sum(axis=1)
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def recall_at_k(scores: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """Per-query recall@k [Q]: the share of a query's relevant documents found in its top k; 0 without any."""
    relevant = relevance > 0
    found = np.take_along_axis(relevant, _top_k(scores, k), axis=1).sum(axis=1).astype(np.float64)
    total = relevant.sum(axis=1).astype(np.float64)
    return np.divide(found, total, out=np.zeros_like(found), where=total > 0)
