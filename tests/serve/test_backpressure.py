"""A real server under pressure: a full queue answers 429 (and admits again once there is room), remote images are
fetched only when allowed and never through a redirect, and a graceful shutdown answers every admitted request
exactly once."""

import functools
import http.server
import re
import signal
import threading

import httpx
import numpy as np
import pytest

from .conftest import GRACEFUL_EXIT, MODEL, data_url, post

pytestmark = pytest.mark.slow  # each test starts its own server process


def embed(server, inputs):
    return post(server, {"model": MODEL, "input": inputs})


def in_thread(fn, *args) -> tuple[threading.Thread, list]:
    out = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    return thread, out


@pytest.fixture
def image_site(tmp_path, pngs):
    """A plain HTTP server on loopback serving one PNG at /a.png."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "a.png").write_bytes(pngs[1])
    (tmp_path / "site" / "folder").mkdir()  # GET /folder answers 301 to /folder/
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_a_full_queue_answers_429_then_admits_again(start_server, embedder, pngs, image_site):
    # the first request waits 15 s for company: time enough on a loaded machine for the next two to arrive
    server = start_server("--max-queue", "4", "--max-wait-ms", "15000", "--allow-remote-images")
    first_inputs = ["one", {"image": data_url(pngs[0])}, "three"]
    first, first_out = in_thread(embed, server, first_inputs)
    server.wait_for_metric("moca_in_flight_inputs", 3)  # admitted, and waiting for company
    refused = embed(server, ["four", "five"])
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert (
        "busy: 3 inputs in flight and 2 more would pass its limit of 4 (--max-queue)"
        in refused.json()["error"]["message"]
    )
    remote = embed(server, [{"text": "fetched", "image": f"{image_site}/a.png"}])  # 3 + 1 fit: admitted
    first.join()
    assert first_out[0].status_code == 200 and remote.status_code == 200, (first_out[0].text, remote.text)
    np.testing.assert_allclose(
        [d["embedding"] for d in first_out[0].json()["data"]],
        embedder.encode(["one", pngs[0], "three"]),
        atol=1e-6,
        rtol=0,
    )
    np.testing.assert_allclose(
        remote.json()["data"][0]["embedding"], embedder.encode({"text": "fetched", "image": pngs[1]}), atol=1e-6, rtol=0
    )
    missing = embed(server, [{"image": f"{image_site}/missing.png"}])
    assert missing.status_code == 400 and "input[0]: cannot fetch" in missing.json()["error"]["message"]
    redirected = embed(server, [{"image": f"{image_site}/folder"}])  # a redirect could lead anywhere: refused
    assert redirected.status_code == 400
    assert "redirects (HTTP 301); redirects are not followed" in redirected.json()["error"]["message"]
    assert server.metric("moca_in_flight_inputs") == 0


def test_graceful_shutdown_answers_every_admitted_request_once(start_server, embedder, pngs):
    # the admitted requests wait in the queue when SIGTERM comes (which ends the waiting: no test time is spent)
    server = start_server("--max-wait-ms", "60000")
    requests = [[f"request {i}"] + ([{"image": pngs[i % len(pngs)]}] if i % 2 else []) for i in range(12)]
    wire = [[{"image": data_url(x["image"])} if isinstance(x, dict) else x for x in r] for r in requests]
    threads = [in_thread(embed, server, inputs) for inputs in wire]
    server.wait_for_metric("moca_in_flight_inputs", sum(map(len, requests)))
    server.process.send_signal(signal.SIGTERM)
    for thread, _ in threads:
        thread.join(timeout=120)
    try:
        late = embed(server, ["too late"]).status_code  # admission is over: refused, or no listener left
    except httpx.TransportError:
        late = None
    assert late in (None, 503)
    assert server.stop() in GRACEFUL_EXIT
    want = embedder.encode([x for r in requests for x in r])
    got = []
    for _, out in threads:
        assert len(out) == 1 and out[0].status_code == 200, out
        got += [d["embedding"] for d in out[0].json()["data"]]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    stopped = re.search(
        r"stopped: answered (\d+) embedding requests, embedded (\d+) inputs, (\d+) left queued", server.output()
    )
    assert stopped, server.output()[-3000:]
    assert stopped.groups() == (str(12 + (late is not None)), str(len(want)), "0")  # nothing lost or done twice
