"""Stage 2's targets on a rank other than 0 point at that rank's own positives in the gathered list. Checked in
one process by standing in for rank 1 of 2 (the gather puts rank 0's positives first); the two-process test
checks the same through real collectives, slowly."""

import types

import torch

from moca_fast.kernels import info_nce_reference
from moca_fast.trainers import cl


def test_rank_ones_queries_target_rank_ones_positives(monkeypatch):
    torch.manual_seed(0)
    b, r, d = 4, 2, 16
    local = torch.nn.functional.normalize(torch.randn(b * (2 + r), d, dtype=torch.float64), dim=-1)
    rank0_positives = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
    rank0_duplicates = torch.arange(100, 100 + b)
    batch = types.SimpleNamespace(num_pairs=b, num_negatives=r, duplicate_ids=torch.arange(b))
    monkeypatch.setattr(cl, "rank", lambda: 1)
    monkeypatch.setattr(cl, "gather_with_grad", lambda x: torch.cat([rank0_positives, x]))
    monkeypatch.setattr(cl, "gather", lambda x: torch.cat([rank0_duplicates, x]))

    loss = cl.contrastive_loss(local, batch, temperature=0.05, mask_duplicates=True)

    queries, positives, negatives = local[:b], local[b : 2 * b], local[2 * b :].reshape(b, r, d)
    expected = info_nce_reference(
        queries,
        torch.cat([rank0_positives, positives]),
        negatives,
        torch.arange(b, 2 * b),
        temperature=0.05,
        normalize=False,
    )
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-6, atol=0)
