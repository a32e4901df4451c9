"""MaxSim scoring of multi-vector embeddings (late interaction, ColBERT/ColPali): score(q, d) = the sum over q's token
vectors of the max over d's token vectors of their dot product.

Documents are scored in blocks, so the query-token x document-token similarities held at once stay under
`block_elements` values whatever the corpus size; zero-padded arrays (mteb's form) are read as variable-length ones
(the head's vectors are unit vectors, so an all-zero row is padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

BLOCK_ELEMENTS = 1 << 24  # similarities held at once (64 MiB in fp32)


def unpadded(embeddings) -> list[torch.Tensor]:
    """A list of [n_i, dim] token vectors from a list of arrays/tensors or a zero-padded [N, L, dim] array (all-zero
    rows dropped)."""
    rows = [torch.as_tensor(np.asarray(e) if not torch.is_tensor(e) else e).float() for e in embeddings]
    return [row[row.abs().amax(dim=-1) > 0] for row in rows]


def maxsim_scores(queries: Sequence, documents: Sequence, block_elements: int = BLOCK_ELEMENTS) -> np.ndarray:
    """MaxSim scores [Q, N] (float32) of Q queries against N documents, each a [n_i, dim] set of token vectors (or a
    zero-padded [Q, L, dim] / [N, L, dim] array)."""
    queries, documents = unpadded(queries), unpadded(documents)
    scores = torch.zeros(len(queries), len(documents))
    if not queries or not documents:
        return scores.numpy()
    flat = torch.cat(queries)
    owner = torch.repeat_interleave(torch.arange(len(queries)), torch.tensor([len(q) for q in queries]))
    start = 0
    while start < len(documents):
        longest, stop = 1, start
        while stop < len(documents):  # as many documents as the budget allows, at least one
            longest_next = max(longest, len(documents[stop]))
            if stop > start and flat.shape[0] * (stop + 1 - start) * longest_next > block_elements:
                break
            longest, stop = longest_next, stop + 1
        block = torch.nn.utils.rnn.pad_sequence(documents[start:stop], batch_first=True)  # [n, L, dim]
        valid = torch.tensor([len(d) for d in documents[start:stop]])[:, None] > torch.arange(block.shape[1])
        sim = (flat @ block.reshape(-1, block.shape[-1]).T).reshape(flat.shape[0], *valid.shape)
        best = sim.masked_fill(~valid, float("-inf")).amax(dim=-1)  # [query tokens, n]
        scores[:, start:stop] = torch.zeros(len(queries), stop - start).index_add_(0, owner, best)
        start = stop
    return scores.numpy()
