"""bench/serve.py end to end on the tiny model, bounded to a few requests: a server process, the closed-loop
clients, the metrics it reads, every field of the report (so the script cannot rot between GPU runs)."""

import base64
import io
import json

import pytest
import torch
from PIL import Image

from bench import serve
from moca_fast.data.tokens import IMAGE_PLACEHOLDER


@pytest.mark.slow
def test_the_load_test_reports_every_point(tmp_path):
    out = tmp_path / "serve.json"
    serve.main(
        [
            "--clients",
            "1",
            "3",
            "--max-wait-ms",
            "5",
            "--requests",
            "6",
            "--seconds",
            "60",
            "--warmup",
            "2",
            "--out",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert "tiny" in data["benchmark"] and data["shapes"]["size"] == "tiny"
    assert [(p["max_wait_ms"], p["clients"], p["requests"]) for p in data["results"]] == [(5, 1, 6), (5, 3, 6)]
    for point in data["results"]:
        assert point["requests_per_s"] > 0 and 0 < point["p50_ms"] <= point["p99_ms"]
        assert point["inputs_per_forward"] >= 1


def served_input(item):
    """A request's input item as encode takes it: a text, or {"text", "image"} with the data URL decoded."""
    if isinstance(item, str):
        return item
    data = base64.b64decode(item["image"].partition(",")[2])
    return {"text": item["text"], "image": Image.open(io.BytesIO(data)).convert("RGB")}


@pytest.mark.slow
def test_served_embeddings_are_encodes_and_every_request_is_counted():
    """The load test's answers: one per request sent, each body's embedding what encode gives the same input, and
    its token count the processor's."""
    bodies = serve.request_bodies("tiny", 5)
    answers = []
    with serve.running_server("tiny", "cpu", 16384, 5) as url:
        point = serve.measure(url, bodies, 3, 10, 120, answers)
    assert point["requests"] == len(answers) == 10
    assert sorted(i for i, _ in answers) == sorted([*range(5)] * 2)
    inputs = [served_input(json.loads(body)["input"][0]) for body in bodies]
    assert any(isinstance(x, dict) for x in inputs) and any(isinstance(x, str) for x in inputs)
    embedder = serve.build_embedder("tiny", "cpu", 16384)
    expected = embedder.encode(inputs, convert_to_tensor=True)
    tokens = [
        len(embedder.processor.encode(x))
        if isinstance(x, str)
        else len(embedder.processor.encode(IMAGE_PLACEHOLDER + x["text"], [x["image"]]))
        for x in inputs
    ]
    for i, answer in answers:
        assert [row["index"] for row in answer["data"]] == [0]
        torch.testing.assert_close(
            torch.tensor(answer["data"][0]["embedding"]), expected[i].float(), rtol=1e-4, atol=1e-5
        )
        assert answer["usage"]["prompt_tokens"] == tokens[i]


def test_serve_results_become_rows(tmp_path):
    from bench import table
    from bench.report import report

    data = report(
        "moca-fast serve on loopback",
        "cpu",
        shapes={},
        load_average=3.25,
        results=[
            {
                "max_wait_ms": 5.0,
                "clients": 16,
                "requests": 500,
                "seconds": 2.0,
                "requests_per_s": 250.04,
                "p50_ms": 47.16,
                "p99_ms": 80.55,
                "inputs_per_forward": 6.9,
            }
        ],
    )
    (tmp_path / "serve-cpu.json").write_text(json.dumps(data))
    text = table.render(tmp_path)
    assert "| 5 | 16 | 250.0 | 47.2 | 80.5 | 6.90 |" in text and "load average 3.2 at the end" in text
    assert "serve-cpu.json" in text
