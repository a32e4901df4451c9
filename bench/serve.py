"""Serving load test on loopback: throughput and p50/p99 latency of `moca-fast serve` against the number of
concurrent clients and --max-wait-ms, bounded in requests and seconds per point.

The server runs in a child process (moca_fast.serve.app.serve, as `moca-fast serve` runs it) on random weights:
`--size tiny`, the tests' tiny Qwen2.5-VL, gives CPU figures, reported as such (they show the HTTP layer and the
batcher at work, not how fast a GPU embeds); `--size 3b`, the reference shape in bf16, needs a GPU. Closed-loop
clients (httpx) each send one request after another, alternating a text query (the text-to-image prompt) and an
image (a synthetic scene as a PNG data URL, the image-target prompt), one input per request, as a search front end
would (by default `--data realistic`: the queries and positives of the reference's 30 stage-2 subsets in their
mix, moca_fast/data/realistic.py); the server packs what is queued into forwards of --batch-tokens tokens. Inputs per
forward come from the
server's /metrics.

    python -m bench.serve --size tiny --out bench/results/serve-cpu.json     # CPU figures (the committed ones)
    python -m bench.serve --size 3b                                        # on an H100/H200: serve-3b-<gpu>.json

It needs the `serve` extra and httpx. A GPU machine without network takes them as wheels, installed the way
bench/run_gpu.sh installs .whl/ (python -m pip download -d .whl --python-version 3.12 --only-binary=:all: fastapi
uvicorn prometheus-client httpx).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import random
import socket
import time

import httpx
import numpy as np
import torch

from bench.report import RESULTS, device_slug, report, require_cuda, write_report
from bench.train import train_config
from moca_fast.data.image_patches import MAX_PIXELS, MIN_PIXELS
from moca_fast.data.processor import Processor
from moca_fast.data.realistic import realistic_inputs
from moca_fast.data.synthetic import random_scene, render
from moca_fast.data.tokenizer import tiny_tokenizer
from moca_fast.data.tokens import IMAGE_PLACEHOLDER
from moca_fast.embed import MocaEmbedder
from moca_fast.trainers.setup import build_model

MODEL = "moca-bench"
IMAGE_SIDE = {"tiny": 112, "3b": 448}  # the tiny model's budget gives 16 tokens per image; the reference's 256


def build_embedder(size: str, device: str, batch_tokens: int) -> MocaEmbedder:
    """Random weights: the tiny test model (fp32) or the 3B shape (bf16), with the matching pixel budget."""
    tokenizer = tiny_tokenizer()
    model = build_model(
        train_config("cl", "tiny" if size == "tiny" else f"random:{size}", "unused"), tokenizer, torch.device(device)
    ).eval()
    if size != "tiny":
        model = model.to(torch.bfloat16)
    pixels = (
        dict(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
        if size == "tiny"
        else dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    )
    return MocaEmbedder(model, Processor(tokenizer, **pixels), batch_tokens=batch_tokens)


def run_server(size: str, device: str, batch_tokens: int, max_wait_ms: float, port: int) -> None:
    """The child process: build the model, serve until SIGTERM."""
    from moca_fast.serve.app import serve
    from moca_fast.serve.settings import ServeSettings

    embedder = build_embedder(size, device, batch_tokens)
    serve(
        embedder,
        ServeSettings(model_name=MODEL, max_input_tokens=batch_tokens, max_wait_ms=max_wait_ms, max_queue_inputs=4096),
        port=port,
    )


def realistic_bodies(n: int, seed: int = 0) -> list[bytes]:
    """One input per request: the queries and positives of the reference's 30 stage-2 subsets in their mix
    (moca_fast/data/realistic.py), images as JPEG data URLs."""
    bodies = []
    for text, images in realistic_inputs(n, seed):
        item = {"text": text.replace(IMAGE_PLACEHOLDER, "")}
        if images:
            jpeg = io.BytesIO()
            images[0].save(jpeg, format="JPEG", quality=50)
            item["image"] = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()
        bodies.append(json.dumps({"model": MODEL, "input": [item if images else item["text"]]}).encode())
    return bodies


def request_bodies(size: str, n: int, seed: int = 0, data: str = "realistic") -> list[bytes]:
    if data == "realistic":
        return realistic_bodies(n, seed)
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        if i % 2 == 0:
            request = {"input": [random_scene(rng).caption], "prompt_name": "text_to_image"}
        else:
            side = IMAGE_SIDE[size]
            png = io.BytesIO()
            render(random_scene(rng), rng.getrandbits(32)).resize((side, side)).save(png, format="PNG")
            request = {
                "input": [{"image": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}],
                "input_type": "document",
            }
        bodies.append(json.dumps({"model": MODEL, **request}).encode())
    return bodies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError(f"the server exited with code {process.exitcode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout} s")


def batch_stats(url: str) -> tuple[float, float]:
    """(inputs, forwards) so far, from /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return float(values["moca_batch_inputs_sum"]), float(values["moca_batch_inputs_count"])


async def closed_loop(
    url: str, bodies: list[bytes], clients: int, requests: int, seconds: float, answers: list | None = None
) -> list[float]:
    """Latencies (s) of up to `requests` requests from `clients` clients sending back to back, for <= `seconds`;
    each (body index, parsed answer) is appended to `answers` when given."""
    latencies, numbers = [], itertools.count()
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients)) as client:

        async def one_client():
            while (i := next(numbers)) < requests and time.perf_counter() < deadline:
                start = time.perf_counter()
                response = await client.post(
                    "/v1/embeddings", content=bodies[i % len(bodies)], headers={"content-type": "application/json"}
                )
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)
                if answers is not None:
                    answers.append((i % len(bodies), response.json()))

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies


def measure(
    url: str, bodies: list[bytes], clients: int, requests: int, seconds: float, answers: list | None = None
) -> dict:
    """One point of the load test (`answers` as closed_loop's)."""
    inputs_before, forwards_before = batch_stats(url)
    start = time.perf_counter()
    latencies = asyncio.run(closed_loop(url, bodies, clients, requests, seconds, answers))
    elapsed = time.perf_counter() - start
    inputs, forwards = (a - b for a, b in zip(batch_stats(url), (inputs_before, forwards_before)))
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "inputs_per_forward": inputs / max(forwards, 1),
    }


@contextlib.contextmanager
def running_server(size: str, device: str, batch_tokens: int, max_wait_ms: float):
    """A server in a child process, ready; yields its URL and stops it gracefully (SIGTERM) at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = multiprocessing.get_context("spawn").Process(
        target=run_server, args=(size, device, batch_tokens, max_wait_ms, port)
    )
    server.start()
    try:
        wait_ready(url, server)
        yield url
    finally:
        server.terminate()  # SIGTERM: a graceful shutdown
        server.join(60)
        if server.is_alive():
            server.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "3b"], default="tiny")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per point")
    parser.add_argument("--max-wait-ms", type=float, nargs="+", default=[0, 5, 20], help="one server per value")
    parser.add_argument("--requests", type=int, default=500, help="requests per point (at most)")
    parser.add_argument("--seconds", type=float, default=30, help="seconds per point (at most)")
    parser.add_argument("--warmup", type=int, default=16, help="requests before each server's first point")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument(
        "--data",
        choices=["realistic", "uniform"],
        default="realistic",
        help="realistic: the reference's stage-2 inputs in their mix; uniform: text / scene, alternating",
    )
    parser.add_argument("--out", help="JSON path (default bench/results/serve-cpu.json, or serve-3b-<gpu>.json)")
    args = parser.parse_args(argv)
    if args.size == "tiny":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = str(require_cuda("serving at the 3B shape"))
    bodies = request_bodies(args.size, 64, data=args.data)
    results = []
    for max_wait in args.max_wait_ms:
        with running_server(args.size, device, args.batch_tokens, max_wait) as url:
            asyncio.run(closed_loop(url, bodies, 4, args.warmup, args.seconds))
            for clients in args.clients:
                point = {"max_wait_ms": max_wait, **measure(url, bodies, clients, args.requests, args.seconds)}
                results.append(point)
                print(
                    f"max wait {max_wait:5.1f} ms, {clients:3d} clients: {point['requests_per_s']:8.1f} req/s, "
                    f"p50 {point['p50_ms']:7.1f} ms, p99 {point['p99_ms']:7.1f} ms, "
                    f"{point['inputs_per_forward']:.2f} inputs per forward",
                    flush=True,
                )
    gpu = device.startswith("cuda")
    label = "GPU" if gpu else "CPU figures: the HTTP layer and the batcher, not embedding speed"
    out = args.out or RESULTS / (
        f"serve-{args.size}-{device_slug(torch.cuda.get_device_name())}.json" if gpu else "serve-cpu.json"
    )
    write_report(
        out,
        report(
            f"moca-fast serve on loopback, random-weight {args.size} model ({label})",
            device,
            shapes={
                "size": args.size,
                "dtype": "bfloat16" if args.size != "tiny" else "float32",
                "image_side": IMAGE_SIDE[args.size],
                "inputs_per_request": 1,
                "mix": "the reference's stage-2 inputs"
                if args.data == "realistic"
                else "text query / image, alternating",
                "batch_tokens": args.batch_tokens,
                "requests_per_point": args.requests,
                "seconds_per_point": args.seconds,
            },
            load_average=os.getloadavg()[1],
            results=results,
        ),
    )


if __name__ == "__main__":
    main()
