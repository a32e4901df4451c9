"""Multi-vector checkpoints in the evaluation harnesses: blocked MaxSim scoring against per-pair loops, ViDoRe's
NDCG@5 by MaxSim against a hand computation, and mteb declaring and running the checkpoint as a late-interaction
model with the scores of our own harness."""

import json
import math

import numpy as np
import pytest

from moca_fast.eval import vidore
from moca_fast.eval.late_interaction import maxsim_scores
from moca_fast.eval.mteb import MtebEncoder, model_meta
from moca_fast.prompts import DOCUMENT_PAGE_INSTRUCTION

from .test_mteb import _pages_task
from .tiny import SMALL_PIXELS


def _by_hand(queries, documents):
    return np.array(
        [[sum(max(float(q_tok @ d_tok) for d_tok in d) for q_tok in q) for d in documents] for q in queries]
    )


def test_blocked_maxsim_equals_per_pair_loops_and_reads_padded_arrays():
    rng = np.random.default_rng(0)

    def unit(n):
        x = rng.standard_normal((n, 6)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    queries = [unit(n) for n in (3, 1, 5)]
    documents = [unit(n) for n in (4, 9, 1, 7, 2)]
    expected = _by_hand(queries, documents)
    for block in (1, 40, 1 << 24):  # a document per block, a few, all at once
        np.testing.assert_allclose(maxsim_scores(queries, documents, block_elements=block), expected, atol=1e-5)
    padded = MtebEncoder.padded(documents)
    assert padded.shape == (5, 9, 6)
    np.testing.assert_allclose(maxsim_scores(MtebEncoder.padded(queries), padded), expected, atol=1e-5)


def test_vidore_scores_a_multi_vector_checkpoint_by_maxsim(multi_vector_embedder, beir_data, tmp_path):
    report = vidore.evaluate_vidore(multi_vector_embedder, beir_data.parent, cache_dir=tmp_path / "cache")
    queries = [json.loads(line) for line in (beir_data / "queries.jsonl").read_text().splitlines()]
    corpus = [json.loads(line) for line in (beir_data / "corpus.jsonl").read_text().splitlines()]
    gold = dict(line.split("\t")[:2] for line in (beir_data / "qrels" / "test.tsv").read_text().splitlines()[1:])
    q = multi_vector_embedder.encode([row["text"] for row in queries], output="multi_vector")
    pages = multi_vector_embedder.encode(
        [{"text": DOCUMENT_PAGE_INSTRUCTION, "image": str(beir_data / row["image"])} for row in corpus],
        output="multi_vector",
    )
    scores = _by_hand(q, pages)
    expected = []
    for row, query_scores in zip(queries, scores):
        order = [corpus[j]["_id"] for j in np.argsort(-query_scores, kind="stable")]
        rank = order.index(gold[row["_id"]]) + 1
        expected.append(1 / math.log2(rank + 1) if rank <= 5 else 0.0)
    result = report["datasets"]["SynPages"]
    assert result["scoring"] == "MaxSim"
    assert result["ndcg@5"] == pytest.approx(100 * np.mean(expected), abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "cache" / "SynPages").iterdir()) == [
        "corpus.json",
        "corpus.npz",
        "queries.json",
        "queries.npz",
    ]
    again = vidore.evaluate_vidore(multi_vector_embedder, beir_data.parent, cache_dir=tmp_path / "cache")
    assert again["datasets"]["SynPages"]["ndcg@5"] == result["ndcg@5"]  # from the cache


def test_mteb_declares_and_runs_a_multi_vector_checkpoint_as_late_interaction(
    multi_vector_checkpoint, multi_vector_embedder, checkpoint, beir_data
):
    mteb = pytest.importorskip("mteb")
    meta = model_meta(multi_vector_checkpoint, name="local/tiny-moca-heads", **SMALL_PIXELS)
    assert meta.model_type == ["late-interaction"] and meta.similarity_fn_name == "MaxSim" and meta.embed_dim == 16
    plain = model_meta(checkpoint, name="local/tiny-moca")
    assert plain.model_type == ["dense"] and plain.similarity_fn_name == "cosine"
    model = meta.loader(meta.name, revision=meta.revision, device="cpu", **meta.loader_kwargs)
    model.mteb_model_meta = meta
    results = mteb.evaluate(model, [_pages_task(beir_data)], cache=None, show_progress_bar=False)
    scores = results.task_results[0].scores["test"][0]
    ours = vidore.evaluate_vidore(multi_vector_embedder, beir_data)["datasets"]["SynPages"]
    assert scores["ndcg_at_5"] * 100 == pytest.approx(ours["ndcg@5"], abs=1e-3)
