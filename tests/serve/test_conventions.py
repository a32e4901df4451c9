"""The server against TEI / vLLM / OpenAI conventions, through real clients and a real process: a documented schema,
OpenAI's error shape everywhere, truncation only on request, vLLM's chat-style `messages`, the checkpoint's prompt
names, TEI's timing headers, the output precisions; and, on a second server, the API key, CORS, a request larger
than the queue, Matryoshka truncation allowed by flag, auto-truncation and the HTTP request metrics."""

import base64

import httpx
import numpy as np
import openai
import pytest

from moca_fast.embed import MocaEmbedder
from moca_fast.inputs import as_input

from ..eval.tiny import SMALL_PIXELS
from .conftest import MAX_TOKENS, MODEL, ServerProcess, client, data_url, post

LONG_TEXT = " ".join(f"word{i % 50}" for i in range(400))  # ~800 tokens of the tiny tokenizer, words and spaces


def test_openapi_documents_the_embeddings_body_and_answer(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    route = spec["paths"]["/v1/embeddings"]["post"]
    body = route["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    fields = spec["components"]["schemas"][body]["properties"]
    assert {
        "model",
        "input",
        "messages",
        "encoding_format",
        "dimensions",
        "truncate",
        "output",
        "precision",
        "prompt_name",
        "input_type",
    } <= set(fields)
    assert spec["components"]["schemas"][body]["required"] == ["model"]
    answer = route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert set(spec["components"]["schemas"][answer]["properties"]) == {"object", "model", "data", "usage"}
    error = route["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert set(spec["components"]["schemas"][error]["properties"]) == {"error"}
    assert httpx.get(server.url + "/docs").status_code == 200


@pytest.mark.parametrize(
    "method, path, content, status, message",
    [
        ("GET", "/v1/nothing", None, 404, "no route /v1/nothing"),
        ("GET", "/v1/embeddings", None, 405, "GET is not allowed on /v1/embeddings"),
        ("POST", "/v1/embeddings", b'{"model": 5, "input": "x"}', 400, "model: Input should be a valid string"),
        ("POST", "/v1/embeddings", b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
        ("POST", "/v1/embeddings", b'{"model": "tiny-moca", "input": "x", "truncate": "maybe"}', 400, "truncate: "),
    ],
)
def test_every_error_is_in_openais_shape(server, method, path, content, status, message):
    response = httpx.request(
        method, server.url + path, content=content, timeout=60, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}, response.text
    error = response.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_an_over_long_input_is_refused_unless_the_request_asks_for_truncation(server, checkpoint):
    cut = MocaEmbedder.from_pretrained(checkpoint, max_length=MAX_TOKENS, **SMALL_PIXELS)  # encode cuts here
    refused = post(server, {"model": MODEL, "input": [LONG_TEXT]})
    assert refused.status_code == 413 and 'send "truncate": true' in refused.json()["error"]["message"]
    response = post(server, {"model": MODEL, "input": [LONG_TEXT, "short"], "truncate": True})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        [d["embedding"] for d in response.json()["data"]], cut.encode([LONG_TEXT, "short"]), atol=1e-6, rtol=0
    )
    assert response.json()["usage"]["prompt_tokens"] == MAX_TOKENS + cut.cost(as_input("short", "?"))


def test_a_huge_text_is_bounded_before_it_is_tokenised(server, checkpoint):
    """100k characters hold more tokens than the limit whatever they say: refused from their length alone, or, when
    truncating, only a prefix is tokenised (and the embedding is still that of the whole text cut)."""
    huge = LONG_TEXT * 40  # ~128k characters, ~32k tokens
    refused = post(server, {"model": MODEL, "input": huge})
    assert refused.status_code == 413, refused.text
    assert f"{len(huge)} characters, more than the limit of {MAX_TOKENS} tokens" in refused.json()["error"]["message"]
    response = post(server, {"model": MODEL, "input": huge, "truncate": True})
    assert response.status_code == 200, response.text
    cut = MocaEmbedder.from_pretrained(checkpoint, max_length=MAX_TOKENS, **SMALL_PIXELS)
    np.testing.assert_allclose(response.json()["data"][0]["embedding"], cut.encode(huge), atol=1e-6, rtol=0)


def test_vllm_chat_style_messages_are_one_interleaved_input(server, embedder, pngs):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(pngs[0])}},
                {"type": "text", "text": "What is shown?"},
            ],
        }
    ]
    response = post(server, {"model": MODEL, "messages": messages, "encoding_format": "float"})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1
    np.testing.assert_allclose(
        response.json()["data"][0]["embedding"],
        embedder.encode({"text": "What is shown?", "image": pngs[0]}),
        atol=1e-6,
        rtol=0,
    )
    plain = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "a red bus"}]})
    np.testing.assert_allclose(plain.json()["data"][0]["embedding"], embedder.encode("a red bus"), atol=1e-6, rtol=0)
    both = post(server, {"model": MODEL, "messages": messages, "input": "x"})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]


def test_prompt_names_query_and_document_are_the_roles(server, embedder, pngs):
    items = ["a red bus", {"image": pngs[0]}, {"text": "How many?", "image": pngs[1]}]
    wire = [
        {"image": data_url(x["image"]), **({"text": x["text"]} if "text" in x else {})} if isinstance(x, dict) else x
        for x in items
    ]
    for name, want in (("query", embedder.encode_query(items)), ("document", embedder.encode_document(items))):
        response = client(server).embeddings.create(model=MODEL, input=wire, extra_body={"prompt_name": name})
        np.testing.assert_allclose([d.embedding for d in response.data], want, atol=1e-6, rtol=0)
    assert not np.allclose(embedder.encode_query(items), embedder.encode_document(items))


def test_tei_timing_headers(server):
    response = post(server, {"model": MODEL, "input": ["time me", "and me"]})
    assert response.status_code == 200
    times = {
        name: int(response.headers[name])
        for name in ("x-total-time", "x-compute-time", "x-tokenization-time", "x-queue-time", "x-inference-time")
    }
    assert all(value >= 0 for value in times.values()) and times["x-total-time"] == times["x-compute-time"]
    assert times["x-total-time"] >= times["x-inference-time"]
    assert int(response.headers["x-compute-tokens"]) == response.json()["usage"]["total_tokens"]
    assert int(response.headers["x-compute-characters"]) == len("time me") + len("and me")


@pytest.mark.parametrize(
    "precision, dtype",
    [("float32", "<f4"), ("float16", "<f2"), ("int8", "i1"), ("uint8", "u1"), ("binary", "i1"), ("ubinary", "u1")],
)
def test_output_precisions_as_float_and_base64(server, embedder, precision, dtype):
    inputs = ["a red bus", "a blue square", "three green circles", "a page of text"]
    if precision == "float16":  # rounded to half precision (sentence-transformers has no such precision)
        want = embedder.encode(inputs).astype(np.float16)
    else:
        want = embedder.encode(inputs, precision=precision)
    as_float = post(server, {"model": MODEL, "input": inputs, "precision": precision})
    assert as_float.status_code == 200, as_float.text
    got = np.array([d["embedding"] for d in as_float.json()["data"]])
    np.testing.assert_array_equal(
        got.astype(want.dtype), want
    ) if precision != "float32" else np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    as_base64 = post(server, {"model": MODEL, "input": inputs, "precision": precision, "encoding_format": "base64"})
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype=dtype) for d in as_base64.json()["data"]])
    np.testing.assert_array_equal(decoded, want.astype(dtype))


@pytest.fixture(scope="module")
def guarded(checkpoint, tmp_path_factory):
    """A server with an API key, one CORS origin, a queue of 4 inputs, Matryoshka truncation allowed anyway, and
    auto-truncation at 50 tokens."""
    process = ServerProcess(
        checkpoint,
        tmp_path_factory.mktemp("guarded") / "server.log",
        "--api-key",
        "s3cret",
        "--cors-allow-origin",
        "https://app.example",
        "--max-queue",
        "4",
        "--allow-truncated-dimensions",
        "--auto-truncate",
        "--max-input-tokens",
        "50",
    )
    process.headers = {"authorization": "Bearer s3cret"}
    yield process
    process.stop()


def test_the_api_key_is_required_everywhere_but_health(guarded, embedder):
    for path in ("/v1/models", "/metrics", "/ready", "/openapi.json"):
        for headers in ({}, {"authorization": "Bearer wrong"}):
            response = httpx.get(guarded.url + path, headers=headers)
            assert response.status_code == 401, (path, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert post(guarded, {"model": MODEL, "input": "x"}, headers={"authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(guarded.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError, match="invalid or missing API key"):
        client(guarded, api_key="wrong").embeddings.create(model=MODEL, input="x")
    response = client(guarded, api_key="s3cret").embeddings.create(model=MODEL, input="a red bus")
    np.testing.assert_allclose(response.data[0].embedding, embedder.encode("a red bus"), atol=1e-6, rtol=0)


def test_cors_preflight_and_origin(guarded):
    preflight = httpx.options(
        guarded.url + "/v1/embeddings",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    other = httpx.options(
        guarded.url + "/v1/embeddings",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers
    answer = post(guarded, {"model": MODEL, "input": "x"}, headers={"origin": "https://app.example"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example"


def test_a_request_larger_than_the_queue_is_413_not_429(guarded):
    response = post(guarded, {"model": MODEL, "input": ["a", "b", "c", "d", "e"]})
    assert response.status_code == 413, response.text
    assert "5 items, more than the server ever holds at once (4, --max-queue)" in response.json()["error"]["message"]


def test_flags_allow_truncated_dimensions_and_auto_truncate(guarded, checkpoint, embedder):
    response = client(guarded, api_key="s3cret").embeddings.create(model=MODEL, input=["a red bus"], dimensions=16)
    np.testing.assert_allclose(
        response.data[0].embedding, embedder.encode(["a red bus"], truncate_dim=16)[0], atol=1e-6, rtol=0
    )
    cut = MocaEmbedder.from_pretrained(checkpoint, max_length=50, **SMALL_PIXELS)
    response = post(guarded, {"model": MODEL, "input": LONG_TEXT})
    assert response.status_code == 200 and response.json()["usage"]["total_tokens"] == 50
    np.testing.assert_allclose(response.json()["data"][0]["embedding"], cut.encode(LONG_TEXT), atol=1e-6, rtol=0)


def test_http_request_metrics_beside_the_batch_metrics(guarded):
    assert post(guarded, {"model": MODEL, "input": "count me"}).status_code == 200
    text = httpx.get(guarded.url + "/metrics", headers=guarded.headers).text
    assert 'http_requests_total{handler="/v1/embeddings",method="POST",status="2xx"}' in text
    assert "http_request_duration_seconds_bucket" in text and "moca_batch_tokens_bucket" in text


def test_a_streamed_body_over_the_limit_is_413_in_openais_shape(server):
    chunks = (b'{"model": "tiny-moca", "input": "' if i == 0 else b"x" * 65536 for i in range(8))  # no length given
    response = httpx.post(
        server.url + "/v1/embeddings", content=chunks, timeout=60, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413, response.text
    assert "over the server's limit of 262144 bytes (--max-body-mb)" in response.json()["error"]["message"]
