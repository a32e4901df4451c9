"""Hierarchical token pooling of a document's multi-vectors: fewer vectors to store and score, as colpali-engine's
HierarchicalTokenPooler offers for ColPali/ColQwen indexes.

A document's n token vectors are clustered agglomeratively (Ward linkage, scipy) into max(n // pool_factor, 1)
clusters; each cluster becomes the mean of its vectors, L2-normalised again. Ward's criterion runs on the unit vectors
themselves: for unit vectors the Euclidean distance sqrt(2 - 2 cos) orders pairs as the cosine distance does
(colpali-engine instead gives Ward the rows of the 1 - cosine matrix as features). Clusters come out in scipy's label
order, which is deterministic for given vectors.
"""

from __future__ import annotations

import numpy as np


def pool_tokens(vectors: np.ndarray, pool_factor: int) -> np.ndarray:
    """Token vectors [n, dim] -> [max(n // pool_factor, 1), dim] cluster means, L2-normalised, float32."""
    if pool_factor < 1:
        raise ValueError(f"pool_factor must be at least 1, got {pool_factor}")
    vectors = np.asarray(vectors, dtype=np.float32)
    clusters = max(len(vectors) // pool_factor, 1)
    if pool_factor == 1 or len(vectors) <= 1:
        return vectors
    from scipy.cluster.hierarchy import fcluster, linkage

    labels = fcluster(linkage(vectors.astype(np.float64), method="ward"), t=clusters, criterion="maxclust")
    sums = np.zeros((labels.max(), vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, labels - 1, vectors)
    means = sums / np.bincount(labels - 1)[:, None]
    return (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)
