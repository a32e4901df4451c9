"""Multi-vector corpora: `moca-fast embed --output DIR --output-kind multi_vector` writes each input's token vectors as
a list of fp16 vectors per parquet row, with or without hierarchical token pooling, and load_corpus returns encode's
vectors; the pooling itself against clusters known by construction."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moca_fast.cli import main
from moca_fast.corpus import load_corpus
from moca_fast.embed_io import read_jsonl_inputs
from moca_fast.token_pooling import pool_tokens

from .eval.tiny import PIXELS

FP16 = 1e-3  # the stored values are fp16 (unit vectors: |error| <= 2^-11 per value)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, multi_vector_embedder):
    folder = tmp_path_factory.mktemp("mv-corpus")
    rng = np.random.default_rng(4)
    for i, (h, w) in enumerate([(70, 90), (120, 60)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    records = [
        {"text": "a short line", "id": "a"},
        {"image": "0.png"},
        {"text": "words " * 12, "id": 3},
        {"text": "a caption", "image": "1.png"},
        {"text": "x"},
    ]
    path = folder / "inputs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    inputs, _ = read_jsonl_inputs(path, folder)
    return path, multi_vector_embedder.encode(inputs, output="both")


def _embed(corpus, checkpoint, output, *extra):
    assert (
        main(
            [
                "embed",
                str(corpus[0]),
                "--output",
                str(output),
                "--model",
                str(checkpoint),
                *PIXELS,
                "--part-size",
                "2",
                *extra,
            ]
        )
        == 0
    )
    return load_corpus(output)


def test_multi_vectors_round_trip_through_parquet_parts(corpus, multi_vector_checkpoint, tmp_path):
    want = corpus[1]["multi_vector"]
    got, ids = _embed(corpus, multi_vector_checkpoint, tmp_path / "out", "--output-kind", "multi_vector")
    assert ids == ["a", None, "3", None, None] and len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == np.float32 and np.abs(a - b).max() <= FP16
    schema = pq.read_schema(tmp_path / "out" / "parts" / "part-00000.parquet")
    assert schema.field("multi_vector").type == pa.list_(pa.list_(pa.float16(), 16))
    assert "embedding" not in schema.names
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["output"] == "multi_vector" and manifest["pool_factor"] is None


def test_both_and_token_pooling(corpus, multi_vector_checkpoint, tmp_path):
    got, _ = _embed(corpus, multi_vector_checkpoint, tmp_path / "out", "--output-kind", "both", "--pool-factor", "3")
    np.testing.assert_allclose(got["pooled"], corpus[1]["pooled"], atol=1e-6, rtol=0)
    for a, b in zip(got["multi_vector"], corpus[1]["multi_vector"]):
        assert a.shape == (max(len(b) // 3, 1), 16)
        assert np.abs(a - pool_tokens(b, 3)).max() <= FP16
        assert np.allclose(np.linalg.norm(a, axis=-1), 1.0, atol=2e-3)
    assert json.loads((tmp_path / "out" / "index.json").read_text())["output"] == "both"


def test_a_file_output_or_a_checkpoint_without_the_head_refuses_multi_vectors(corpus, checkpoint, tmp_path, capsys):
    refusals = ((tmp_path / "e.npy", "go to a folder --output"), (tmp_path / "out", "no multi-vector head"))
    for output, message in refusals:
        with pytest.raises(SystemExit):
            main(
                [
                    "embed",
                    str(corpus[0]),
                    "--output",
                    str(output),
                    "--model",
                    str(checkpoint),
                    *PIXELS,
                    "--output-kind",
                    "multi_vector",
                ]
            )
        assert message in capsys.readouterr().err


def test_token_pooling_merges_clusters_known_by_construction():
    """Three tight groups of token vectors, pooled to three: each output is its group's normalised mean."""
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3]
    groups = [centre + 0.01 * rng.standard_normal((n, 8)) for centre, n in zip(centres, (4, 3, 2))]
    vectors = np.concatenate(groups)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(vectors))
    pooled = pool_tokens(vectors[order], 3)  # 9 // 3 = 3 clusters
    expected = [g.mean(0) / np.linalg.norm(g.mean(0)) for g in np.split(vectors, [4, 7])]
    assert pooled.shape == (3, 8)
    for row in expected:  # every group's mean is among the outputs (cluster order is scipy's)
        assert np.abs(pooled - row).max(axis=1).min() <= 1e-6
    assert np.array_equal(pool_tokens(vectors, 1), vectors.astype(np.float32))
    assert pool_tokens(vectors[:1], 4).shape == (1, 8)
