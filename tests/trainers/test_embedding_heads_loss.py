"""Stage 2 with both heads: the Matryoshka InfoNCE against per-prefix InfoNCE by hand, the late-interaction loss
(its fp64 torch reference, and the trainer's on a real batch) against per-query loops in fp64, GradCache with the
token vectors, and a resume that keeps the heads."""

import json

import pytest
import torch
import torch.nn.functional as F

from moca_fast.config import TrainConfig
from moca_fast.data.contrastive import ContrastiveBatch, ContrastiveCollator, EncodedPairs
from moca_fast.data.pairs import PairDataset
from moca_fast.kernels.reference import info_nce_reference, maxsim_info_nce_reference
from moca_fast.model.loading import load_pretrained
from moca_fast.trainers.cl import ContrastiveFinetuning, pair_subsets, pooled_loss
from moca_fast.trainers.run import run
from moca_fast.trainers.setup import build_model, build_processor, build_tokenizer

from .conftest import cl_config


def maxsim(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Sum over q's tokens of the max over d's tokens of the dot product (one pair)."""
    return (q @ d.T).max(dim=1).values.sum()


def late_interaction_oracle(queries, positives, negatives, targets, temperature, duplicate_ids=None):
    """Mean over queries of -log softmax of the target among MaxSim logits, one query at a time: every positive (its
    target's duplicates left out) and its own negatives."""
    losses = []
    for i, q in enumerate(queries):
        t = int(targets[i])
        kept = [
            j for j in range(len(positives)) if duplicate_ids is None or j == t or duplicate_ids[j] != duplicate_ids[t]
        ]
        logits = torch.stack([maxsim(q, positives[j]) for j in kept] + [maxsim(q, n) for n in negatives[i]])
        logits = logits / temperature
        losses.append(torch.logsumexp(logits, 0) - logits[kept.index(t)])
    return torch.stack(losses).mean()


def _packed(sequences):
    lengths = torch.tensor([len(s) for s in sequences])
    return torch.cat(sequences), F.pad(lengths.cumsum(0), (1, 0)).int()


def test_matryoshka_loss_equals_per_prefix_info_nce_by_hand():
    g = torch.Generator().manual_seed(0)
    b, r, h = 6, 2, 64
    embeddings = F.normalize(torch.randn(b * (2 + r), h, generator=g), dim=-1)
    duplicates = torch.tensor([0, 1, 1, 2, 3, 4])  # pairs 1 and 2 share a positive
    batch = ContrastiveBatch([], b, r, duplicates)
    config = TrainConfig(
        stage="cl",
        model="tiny",
        data="-",
        output_dir="-",
        temperature=0.05,
        matryoshka_dims=(64, 16, 4),
        matryoshka_weights=(1.0, 0.5, 0.25),
    )
    ours = pooled_loss(embeddings, batch, config)
    expected = 0.0
    for dim, weight in zip(config.matryoshka_dims, config.matryoshka_weights):
        prefix = embeddings.double()[:, :dim]
        prefix = prefix / prefix.norm(dim=-1, keepdim=True)
        q, p, n = prefix[:b], prefix[b : 2 * b], prefix[2 * b :].reshape(b, r, dim)
        expected += weight * info_nce_reference(
            q, p, n, torch.arange(b), 0.05, normalize=False, duplicate_ids=duplicates
        )
    assert abs(ours.item() - float(expected)) <= 1e-5 * float(expected)
    plain = pooled_loss(
        embeddings, batch, TrainConfig(stage="cl", model="tiny", data="-", output_dir="-", temperature=0.05)
    )
    assert abs(plain.item() - ours.item()) > 1e-3  # the prefixes really change the loss


def test_maxsim_info_nce_reference_equals_per_query_loops_forward_and_backward():
    g = torch.Generator().manual_seed(1)
    unit = lambda n: F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1)
    queries = [unit(n).requires_grad_() for n in (3, 5, 2)]
    positives = [unit(n).requires_grad_() for n in (4, 7, 1, 6)]  # 4 documents: one gathered from "another rank"
    negatives = [[unit(n).requires_grad_() for n in sizes] for sizes in ((2, 3), (5, 1), (4, 4))]
    targets, duplicates = torch.tensor([1, 0, 3]), torch.tensor([7, 8, 9, 8])  # documents 1 and 3 are the same
    flat_negatives = [n for row in negatives for n in row]
    mask = torch.zeros(3, len(positives) + len(flat_negatives), dtype=torch.bool)  # documents: positives, negatives
    mask[:, : len(positives)] = duplicates[None, :] == duplicates[targets][:, None]
    mask[torch.arange(3), targets] = False
    leaves = [*queries, *positives, *flat_negatives]
    ours = maxsim_info_nce_reference(
        *_packed(queries),
        *_packed(positives + flat_negatives),
        targets,
        temperature=0.25,
        negatives=2,
        duplicate_mask=mask,
    )
    ours_grads = torch.autograd.grad(ours, leaves)
    # 0.25: exact in fp32, in which the loss takes its temperature
    oracle = late_interaction_oracle(queries, positives, negatives, targets, 0.25, duplicates)
    oracle_grads = torch.autograd.grad(oracle, leaves)
    assert abs(ours.item() - oracle.item()) <= 1e-6 * oracle.item()
    for a, b in zip(ours_grads, oracle_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _stage(config):
    tokenizer = build_tokenizer(config)
    processor = build_processor(config, tokenizer)
    model = build_model(config, tokenizer, torch.device("cpu"))
    pairs = PairDataset(pair_subsets(config.data), negative_ratio=2)
    stage = ContrastiveFinetuning(config, model, processor, torch.device("cpu"), 0, 1, pairs=pairs)
    return stage, EncodedPairs(pairs, processor), processor


def test_the_trainers_late_interaction_loss_equals_per_query_loops_in_fp64(tmp_path, pair_folder):
    """One train step with the multi-vector head: its logged late-interaction loss, and the head's gradient (which
    only that loss reaches), equal an fp64 computation from the same hidden states, one query at a time."""
    config = cl_config(
        tmp_path, pair_folder, multi_vector_dim=16, multi_vector_weight=0.5, multi_vector_temperature=0.5
    )
    stage, encoded, processor = _stage(config)
    picked = [encoded[(0, i)] for i in range(6)]
    batch = ContrastiveCollator(processor)(picked)
    values = stage.train_step(batch)
    model = stage.model
    with torch.no_grad():
        hidden = model(batch.chunks[0]).double()
    weight = model.custom_text_proj.weight.detach().double().requires_grad_()
    bias = model.custom_text_proj.bias.detach().double()
    tokens = F.normalize(hidden @ weight.T + bias, dim=-1)
    sequences = list(tokens.split(batch.chunks[0].cu_seqlens.diff().tolist()))
    b, r = batch.num_pairs, batch.num_negatives
    negatives = [sequences[2 * b + i * r : 2 * b + (i + 1) * r] for i in range(b)]
    oracle = late_interaction_oracle(
        sequences[:b], sequences[b : 2 * b], negatives, torch.arange(b), 0.5, batch.duplicate_ids
    )
    assert abs(values["loss_multi_vector"] - oracle.item()) <= 1e-5 * oracle.item()
    assert values["loss"] == pytest.approx(values["loss_pooled"] + 0.5 * values["loss_multi_vector"], rel=1e-6)
    (0.5 * oracle).backward()
    grad = model.custom_text_proj.weight.grad.double()
    assert (grad - weight.grad).abs().max().item() <= 1e-5 * weight.grad.abs().max().item()


def test_grad_cache_with_both_heads_equals_the_direct_gradient(tmp_path, pair_folder):
    def gradients(grad_cache_tokens):
        torch.manual_seed(0)
        config = cl_config(
            tmp_path, pair_folder, grad_cache_tokens=grad_cache_tokens, multi_vector_dim=16, matryoshka_dims=(64, 16)
        )
        stage, encoded, processor = _stage(config)
        batch = ContrastiveCollator(processor, grad_cache_tokens)([encoded[(0, i)] for i in range(6)])
        values = stage.train_step(batch)
        return values, len(batch.chunks), {n: p.grad.clone() for n, p in stage.model.named_parameters()}

    direct_values, one, direct = gradients(None)
    cached_values, many, cached = gradients(96)
    assert one == 1 and many > 3
    for key in ("loss", "loss_pooled", "loss_multi_vector"):
        assert abs(direct_values[key] - cached_values[key]) <= 1e-5 * abs(direct_values[key]), key
    scale = max(g.abs().max().item() for g in direct.values())
    assert direct["custom_text_proj.weight"].abs().max() > 0
    for name, grad in direct.items():
        assert (grad - cached[name]).abs().max().item() <= 1e-5 * max(1.0, scale), name


def test_a_run_with_both_heads_resumes_exactly_and_its_final_checkpoint_declares_them(tmp_path, pair_folder):
    def config(out):
        return cl_config(
            out, pair_folder, max_steps=4, checkpoint_every=2, multi_vector_dim=16, matryoshka_dims=(64, 16)
        )

    full = [r["loss"] for r in run(config(tmp_path / "full"))]
    first = [r["loss"] for r in run(config(tmp_path / "cut"), stop_after=2)]
    rest = [r["loss"] for r in run(config(tmp_path / "cut"), resume=True)]
    assert first + rest == full
    declared = json.loads((tmp_path / "cut" / "final" / "config.json").read_text())["moca_fast_heads"]
    assert declared == {"multi_vector_dim": 16, "matryoshka_dims": [64, 16]}
    a, b = load_pretrained(tmp_path / "full" / "final"), load_pretrained(tmp_path / "cut" / "final")
    assert torch.equal(a.custom_text_proj.weight, b.custom_text_proj.weight)
