"""bench/serve.py end to end on the tiny model, bounded to a few requests: a server process, the closed-loop
clients, the metrics it reads, every field of the report (so the script cannot rot between GPU runs)."""

import json

import pytest

from bench import serve


@pytest.mark.slow
def test_the_load_test_reports_every_point(tmp_path):
    out = tmp_path / "serve.json"
    serve.main(["--clients", "1", "3", "--max-wait-ms", "5", "--requests", "6", "--seconds", "60", "--warmup", "2",
                "--out", str(out)])
    data = json.loads(out.read_text())
    assert "tiny" in data["benchmark"] and data["shapes"]["size"] == "tiny"
    assert [(p["max_wait_ms"], p["clients"], p["requests"]) for p in data["results"]] == [(5, 1, 6), (5, 3, 6)]
    for point in data["results"]:
        assert point["requests_per_s"] > 0 and 0 < point["p50_ms"] <= point["p99_ms"]
        assert point["inputs_per_forward"] >= 1


def test_serve_results_become_rows(tmp_path):
    from bench.report import report

    from bench import table

    data = report("moca-fast serve on loopback", "cpu", shapes={}, load_average=3.25, results=[
        {"max_wait_ms": 5.0, "clients": 16, "requests": 500, "seconds": 2.0, "requests_per_s": 250.04,
         "p50_ms": 47.16, "p99_ms": 80.55, "inputs_per_forward": 6.9}])
    (tmp_path / "serve-cpu.json").write_text(json.dumps(data))
    text = table.render(tmp_path)
    assert "| 5 | 16 | 250.0 | 47.2 | 80.5 | 6.90 |" in text and "load average 3.2 at the end" in text
    assert "serve-cpu.json" in text
