"""Multi-vector and Matryoshka serving of a checkpoint declaring both heads (the tiny model with a 16-dimensional
multi-vector head, trained for Matryoshka 32 and 16): per-token vectors as float rows and as base64 float32 / float16
blocks with their shape,
through the OpenAI client and httpx, equal to the embedder's own; `dimensions` only at trained Matryoshka sizes."""

import base64

import numpy as np
import openai
import pytest

from .conftest import MODEL, ServerProcess, client, data_url, post

pytestmark = pytest.mark.slow  # a server process of its own


@pytest.fixture(scope="module")
def multi_server(multi_vector_checkpoint, tmp_path_factory):
    process = ServerProcess(
        multi_vector_checkpoint, tmp_path_factory.mktemp("multi") / "server.log", "--max-wait-ms", "50"
    )
    yield process
    process.stop()


def test_multi_vectors_as_rows_and_as_base64_blocks(multi_server, multi_vector_embedder, pngs):
    items = ["a red bus", {"text": "What is shown?", "image": pngs[0]}, {"image": pngs[1]}]
    wire = ["a red bus", {"text": "What is shown?", "image": data_url(pngs[0])}, {"image": data_url(pngs[1])}]
    want = multi_vector_embedder.encode(items, output="multi_vector", normalize_embeddings=True)
    rows = post(multi_server, {"model": MODEL, "input": wire, "output": "multi_vector"})
    assert rows.status_code == 200, rows.text
    for got, expected in zip(rows.json()["data"], want):
        assert got["shape"] == list(expected.shape) and expected.shape[1] == multi_vector_embedder.multi_vector_dim
        np.testing.assert_allclose(np.array(got["embedding"]), expected, atol=1e-6, rtol=0)
    for precision, dtype, atol in (("float32", "<f4", 1e-6), ("float16", "<f2", 5e-4)):  # 5e-4: half an fp16 ulp
        blocks = client(multi_server).embeddings.create(
            model=MODEL,
            input=wire,
            encoding_format="base64",
            extra_body={"output": "multi_vector", "precision": precision},
        )
        for got, expected in zip(blocks.data, want):
            values = np.frombuffer(base64.b64decode(got.embedding), dtype=dtype).reshape(got.shape)
            np.testing.assert_allclose(values, expected, atol=atol, rtol=0)


def test_pooled_vectors_still_come_by_default_and_share_the_server(multi_server, multi_vector_embedder):
    response = client(multi_server).embeddings.create(model=MODEL, input=["a red bus", "a blue square"])
    np.testing.assert_allclose(
        [d.embedding for d in response.data],
        multi_vector_embedder.encode(["a red bus", "a blue square"]),
        atol=1e-6,
        rtol=0,
    )


def test_dimensions_only_at_the_trained_matryoshka_sizes(multi_server, multi_vector_embedder):
    response = client(multi_server).embeddings.create(model=MODEL, input=["a red bus"], dimensions=16)
    np.testing.assert_allclose(
        response.data[0].embedding, multi_vector_embedder.encode(["a red bus"], truncate_dim=16)[0], atol=1e-6, rtol=0
    )
    with pytest.raises(
        openai.BadRequestError,
        match=r"dimensions: 24, not one the checkpoint was trained for; its "
        r"Matryoshka dimensions are \[32, 16\]",
    ):
        client(multi_server).embeddings.create(model=MODEL, input=["a red bus"], dimensions=24)
    for extra, message in (
        ({"precision": "int8"}, "multi-vectors come as float32 or float16"),
        ({"dimensions": 16}, "dimensions: applies to pooled vectors"),
    ):
        refused = post(multi_server, {"model": MODEL, "input": "x", "output": "multi_vector", **extra})
        assert refused.status_code == 400 and message in refused.json()["error"]["message"]
