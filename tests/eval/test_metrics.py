"""Metrics against hand-computed values and an independent, per-query dictionary implementation."""

import math

import numpy as np
import pytest

from moca_fast.eval.metrics import ndcg_at_k, precision_at_1, recall_at_k


def test_ndcg_at_5_by_hand():
    # Ranking by score: d2 (rel 0), d0 (rel 2), d4 (rel 0), d1 (rel 1), d3 (rel 0), d5 (rel 3, rank 6: cut off).
    scores = np.array([[0.9, 0.5, 0.95, 0.1, 0.7, 0.05]])
    relevance = np.array([[2, 1, 0, 0, 0, 3]])
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(scores, relevance, 5)[0] == pytest.approx(dcg / idcg, abs=1e-12)
    assert ndcg_at_k(scores, relevance, 5)[0] == pytest.approx(1.692540 / 4.761860, abs=1e-6)  # 0.35544
    # recall@5: d0 and d1 found, d5 missed.
    assert recall_at_k(scores, relevance, 5)[0] == pytest.approx(2 / 3)
    assert recall_at_k(scores, relevance, 1)[0] == 0.0


def test_ndcg_edge_cases():
    perfect = np.array([[3.0, 2.0, 1.0]])
    assert ndcg_at_k(perfect, np.array([[1, 1, 0]]), 5)[0] == pytest.approx(1.0)  # k beyond the corpus
    assert ndcg_at_k(perfect, np.array([[0, 0, 0]]), 5)[0] == 0.0  # no relevant document
    assert recall_at_k(perfect, np.array([[0, 0, 0]]), 5)[0] == 0.0


def test_precision_at_1_by_hand():
    scores = [
        np.array([0.9, 0.1, 0.3]),
        np.array([0.2, 0.8]),
        np.array([0.5, 0.5, 0.1]),
        np.array([0.7, 0.6, 0.69, 0.1]),
    ]
    # gold best; a distractor best; a tie with the gold (numpy argmax: first wins); gold best.
    assert precision_at_1(scores) == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        precision_at_1([])


def _ndcg_reference(ranked: list[str], qrels: dict[str, float], k: int) -> float:
    """NDCG@k written out plainly: ranks from 1, gain = relevance, discount log2(rank + 1)."""
    dcg = 0.0
    for rank, doc in enumerate(ranked[:k], start=1):
        dcg += qrels.get(doc, 0.0) / math.log2(rank + 1)
    ideal = sorted(qrels.values(), reverse=True)[:k]
    idcg = sum(rel / math.log2(rank + 1) for rank, rel in enumerate(ideal, start=1))
    return dcg / idcg


def _recall_reference(ranked: list[str], qrels: dict[str, float], k: int) -> float:
    relevant = {doc for doc, rel in qrels.items() if rel > 0}
    return len(relevant & set(ranked[:k])) / len(relevant)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_ndcg_and_recall_match_an_independent_implementation(k):
    rng = np.random.default_rng(3)
    n_queries, n_docs = 40, 30
    scores = rng.standard_normal((n_queries, n_docs))  # continuous: no ties
    relevance = np.zeros((n_queries, n_docs))
    docs = [f"d{j}" for j in range(n_docs)]
    expected_ndcg, expected_recall = [], []
    for q in range(n_queries):
        judged = rng.choice(n_docs, size=rng.integers(1, 5), replace=False)
        relevance[q, judged] = rng.integers(1, 4, size=judged.size)
        qrels = {docs[j]: float(relevance[q, j]) for j in judged}
        ranked = sorted(docs, key=lambda d: -scores[q, int(d[1:])])
        expected_ndcg.append(_ndcg_reference(ranked, qrels, k))
        expected_recall.append(_recall_reference(ranked, qrels, k))
    np.testing.assert_allclose(ndcg_at_k(scores, relevance, k), expected_ndcg, atol=1e-12)
    np.testing.assert_allclose(recall_at_k(scores, relevance, k), expected_recall, atol=1e-12)


def test_precision_at_1_matches_an_independent_implementation():
    rng = np.random.default_rng(4)
    lists = [rng.standard_normal(rng.integers(2, 12)) for _ in range(200)]
    expected = sum(all(s[0] > s[j] for j in range(1, len(s))) for s in lists) / len(lists)
    assert precision_at_1(lists) == pytest.approx(expected)
