"""A real `moca-fast serve` process on loopback, through real clients (the openai package, httpx): embeddings equal
MocaEmbedder.encode for text, image and image + text, alone and under 16 concurrent clients; bad requests get a 4xx
naming the item; health, readiness and metrics."""

import threading

import httpx
import numpy as np
import openai
import pytest

from moca_fast.inputs import as_input

from .conftest import MAX_BODY_MB, MAX_INPUTS, MAX_TOKENS, MODEL, client, data_url, post


def test_openai_client_gets_the_embeddings_of_encode(server, embedder, pngs):
    a, b = pngs[0], pngs[1]
    ours = ["a plain sentence", {"image": data_url(a)}, {"text": "What is shown?", "image": data_url(b)}]
    want = embedder.encode(["a plain sentence", a, {"text": "What is shown?", "image": b}])
    for encoding in (openai.omit, "float"):  # the client asks for base64 by default and decodes it
        response = client(server).embeddings.create(model=MODEL, input=ours, encoding_format=encoding)
        assert [d.index for d in response.data] == [0, 1, 2] and response.model == MODEL
        np.testing.assert_allclose(np.array([d.embedding for d in response.data]), want, atol=1e-6, rtol=0)
    tokens = sum(
        embedder.cost(as_input(x, "?")) for x in ["a plain sentence", a, {"text": "What is shown?", "image": b}]
    )
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    one = client(server).embeddings.create(model=MODEL, input="a plain sentence")
    np.testing.assert_allclose(one.data[0].embedding, want[0], atol=1e-6, rtol=0)
    with pytest.raises(openai.BadRequestError, match="this checkpoint was not trained for Matryoshka truncation"):
        client(server).embeddings.create(model=MODEL, input=["a plain sentence"], dimensions=16)
    full = client(server).embeddings.create(model=MODEL, input=["a plain sentence"], dimensions=embedder.dim)
    np.testing.assert_allclose(full.data[0].embedding, want[0], atol=1e-6, rtol=0)  # all of them: nothing cut
    assert [m.id for m in client(server).models.list()] == [MODEL]


def test_images_as_paths_under_the_image_root_never_as_bare_base64(server, embedder, pngs):
    """A path is a path, even when its name is valid base64 (no extension): it is read, not decoded."""
    (server.images / "page.png").write_bytes(pngs[2])
    (server.images / "aGVsbG8gd29ybGQh").write_bytes(pngs[3])  # base64 of "hello world!"
    response = post(
        server, {"model": MODEL, "input": [{"image": "aGVsbG8gd29ybGQh"}, {"text": "a caption", "image": "page.png"}]}
    )
    assert response.status_code == 200, response.text
    got = np.array([d["embedding"] for d in response.json()["data"]])
    want = embedder.encode([pngs[3], {"text": "a caption", "image": server.images / "page.png"}])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_the_reference_prompts_by_name_and_by_role(server, embedder, pngs):
    a = pngs[0]
    items = ["a red bus", {"text": "How many?", "image": data_url(a)}, {"image": data_url(a)}]
    plain = ["a red bus", {"text": "How many?", "image": a}, a]
    cases = [
        ({"input_type": "query"}, embedder.encode_query(plain)),
        ({"input_type": "document"}, embedder.encode_document(plain)),
        ({"prompt_name": "image_question"}, embedder.encode(plain, prompt_name="image_question")),
        ({"prompt": "query: "}, embedder.encode(plain, prompt="query: ")),
    ]
    for extra, want in cases:
        response = post(server, {"model": MODEL, "input": items, **extra})
        assert response.status_code == 200, response.text
        np.testing.assert_allclose([d["embedding"] for d in response.json()["data"]], want, atol=1e-6, rtol=0)
    assert not np.allclose(cases[0][1], cases[3][1])  # the prompts change the embeddings


def test_sixteen_concurrent_clients_get_the_embeddings_of_encode(server, embedder, pngs):
    """16 threads, each its own OpenAI client, 3 requests of mixed inputs each, all at once: inputs of many requests
    share forwards, and every answer equals encode's."""
    requests = []
    for c in range(16):
        for r in range(3):
            png = pngs[(c + r) % len(pngs)]
            kind = (c + r) % 3
            requests.append(
                [f"client {c} request {r}: " + "words " * (c % 5)]
                if kind == 0
                else [{"image": png}, f"text {c} {r}"]
                if kind == 1
                else [{"text": f"question {c} {r}?", "image": png}]
            )
    want = embedder.encode([x for request in requests for x in request])
    got, errors = [None] * len(requests), []
    start = threading.Barrier(16)
    batches_before = server.metric("moca_batch_inputs_count")

    def run(c):
        api = client(server)
        start.wait()
        for r in range(3):
            i = 3 * c + r
            ours = [{**x, "image": data_url(x["image"])} if isinstance(x, dict) else x for x in requests[i]]
            try:
                got[i] = [d.embedding for d in api.embeddings.create(model=MODEL, input=ours).data]
            except Exception as error:
                errors.append(error)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    np.testing.assert_allclose(np.array([e for request in got for e in request]), want, atol=1e-6, rtol=0)
    forwards = server.metric("moca_batch_inputs_count") - batches_before
    assert forwards < len(requests), "the requests were never batched together"


BAD_REQUESTS = [  # (body, status, message)
    (b"{not json", 400, "the request body is not valid JSON"),
    (b"[1, 2]", 400, "the request body must be a JSON object"),
    ({"model": MODEL, "input": "x", "temperature": 1}, 400, "unknown field 'temperature'"),
    ({"input": "x"}, 400, "model: Field required"),
    ({"model": "gpt-4", "input": "x"}, 404, "model 'gpt-4' is not served here; this server serves 'tiny-moca'"),
    ({"model": MODEL}, 400, "input: required"),
    ({"model": MODEL, "input": []}, 400, "input: an empty list"),
    ({"model": MODEL, "input": ["ok", ""]}, 400, "input[1]: empty string"),
    ({"model": MODEL, "input": ["ok", 5]}, 400, "input[1]: token-id inputs are not supported"),
    ({"model": MODEL, "input": ["ok", None]}, 400, "input[1]: expected a string or an object"),
    ({"model": MODEL, "input": ["ok", {"text": "x", "caption": "y"}]}, 400, "input[1]: unknown keys ['caption']"),
    ({"model": MODEL, "input": ["ok", {"image": 3}]}, 400, "input[1]: 'image' must be a string"),
    ({"model": MODEL, "input": ["ok", {}]}, 400, "input[1]: neither 'text' nor 'image'"),
    (
        {"model": MODEL, "input": ["ok", {"image": "data:image/png;base64,@@"}]},
        400,
        "input[1]: the data URL's data is not valid base64",
    ),
    ({"model": MODEL, "input": ["ok", {"image": "data:image/png,raw"}]}, 400, "input[1]: a data URL must read"),
    (
        {"model": MODEL, "input": ["ok", "ok", {"image": "data:image/png;base64,aGVsbG8gd29ybGQh"}]},
        400,
        "input[2]: cannot decode image bytes: not an image format Pillow reads",
    ),
    (
        {"model": MODEL, "input": ["ok", {"image": "../secret.png"}]},
        400,
        "input[1]: image path '../secret.png' is outside the server's --image-root",
    ),
    ({"model": MODEL, "input": ["ok", {"image": "link.png"}]}, 400, "input[1]: image path 'link.png' is outside"),
    ({"model": MODEL, "input": [{"image": "/etc/hostname"}]}, 400, "input[0]: image path '/etc/hostname' is outside"),
    (
        {"model": MODEL, "input": ["ok", {"image": "missing.png"}]},
        400,
        "input[1]: image file not found under the server's --image-root: missing.png",
    ),
    (
        {"model": MODEL, "input": ["ok", {"image": "http://127.0.0.1:9/a.png"}]},
        400,
        "input[1]: image URLs are not fetched",
    ),
    (
        {"model": MODEL, "input": ["x"] * (MAX_INPUTS + 1)},
        413,
        f"input: {MAX_INPUTS + 1} items, over the limit of {MAX_INPUTS} per request",
    ),
    (
        {"model": MODEL, "input": ["ok", "word " * 300]},
        413,
        f'tokens, over the limit of {MAX_TOKENS} tokens per input; send "truncate": true',
    ),
    ({"model": MODEL, "input": "x" * int(MAX_BODY_MB * 2**20)}, 413, "over the server's limit of"),
    ({"model": MODEL, "input": "x", "dimensions": 0}, 400, "dimensions: Input should be greater than or equal to 1"),
    ({"model": MODEL, "input": "x", "dimensions": 65}, 400, "dimensions: 65, more than the model's 64"),
    ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format: Input should be 'float' or"),
    ({"model": MODEL, "input": "x", "encoding_format": []}, 400, "encoding_format: Input should be 'float' or"),
    ({"model": MODEL, "input": "x", "precision": "int4"}, 400, "precision: Input should be 'float32'"),
    ({"model": MODEL, "input": "x", "prompt_name": "nope"}, 400, "unknown prompt_name 'nope'"),
    ({"model": MODEL, "input": "x", "output": "multi_vector"}, 400, "output: 'multi_vector' needs a checkpoint with"),
    ({"model": MODEL, "input": "x", "prompt": "a", "prompt_name": "image_target"}, 400, "not both"),
    ({"model": MODEL, "input": "x", "input_type": "passage"}, 400, "input_type: Input should be 'query' or"),
]


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_naming_the_item(server, body, status, message):
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_the_openai_client_raises_the_servers_message(server):
    with pytest.raises(openai.BadRequestError, match=r"input\[0\]: token-id inputs are not supported"):
        client(server).embeddings.create(model=MODEL, input=[[1, 2], [3]])
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client(server).embeddings.create(model="text-embedding-3-small", input="x")


def test_health_readiness_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready", "model": MODEL}
    assert post(server, {"model": MODEL, "input": ["count me", "and me"]}).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in (
        'moca_requests_total{status="200"}',
        "moca_inputs_total",
        "moca_tokens_total",
        "moca_batch_inputs_bucket",
        "moca_batch_tokens_bucket",
        "moca_batch_seconds_bucket",
        "moca_queue_inputs",
        "moca_in_flight_inputs",
        "moca_request_seconds_bucket",
    ):
        assert name in text, name
    assert server.metric("moca_inputs_total") >= 2 and server.metric("moca_in_flight_inputs") == 0
