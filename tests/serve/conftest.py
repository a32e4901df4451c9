"""The server tests' world: PNG images and real `moca-fast serve` processes on loopback (a free port each, ready
when /health answers, always stopped) of tests/conftest.py's tiny checkpoint, whose embedder is their oracle."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from ..eval.tiny import PIXELS

MODEL = "tiny-moca"
# uvicorn shuts down gracefully, then re-raises the signal it caught (older versions exit 0)
GRACEFUL_EXIT = (0, -signal.SIGTERM)
START_TIMEOUT_S = 180  # importing torch and loading the model on a busy 2-core machine


@pytest.fixture(scope="session")
def pngs():
    """Encoded PNG images of a few sizes (the server gets them as data URLs, encode as the same bytes)."""
    rng = np.random.default_rng(7)
    out = []
    for height, width in [(100, 150), (64, 90), (120, 80), (56, 56)]:
        data = io.BytesIO()
        Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(data, format="PNG")
        out.append(data.getvalue())
    return out


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def post(server, body, headers: dict | None = None, **kwargs) -> httpx.Response:
    """POST /v1/embeddings: `body` a dict (sent as JSON) or raw bytes."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        server.url + "/v1/embeddings",
        content=content,
        timeout=120,
        headers={"content-type": "application/json", **server.headers, **(headers or {})},
        **kwargs,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPOSITORY = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`python -m moca_fast.cli serve` (or another `entry` module taking its flags) in a child process, its output in
    a log file."""

    def __init__(
        self, checkpoint: Path, log_path: Path, *args: str, entry: tuple[str, ...] = ("moca_fast.cli", "serve")
    ):
        for _ in range(3):  # another process may take the free port between our probe and the server's bind
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.log_path = log_path
            with open(log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        *entry,
                        "--model",
                        str(checkpoint),
                        "--served-model-name",
                        MODEL,
                        "--port",
                        str(self.port),
                        *PIXELS,
                        *args,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPOSITORY,
                )
            self.headers = {}  # sent by get() and post(): an API key
            if self._wait_ready():
                return
            if "address already in use" not in self.output():
                break
        self.kill()
        raise RuntimeError(f"the server did not start:\n{self.output()[-4000:]}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        return False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """One unlabelled sample of /metrics."""
        for line in httpx.get(self.url + "/metrics", timeout=10, headers=self.headers).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def wait_for_metric(self, name: str, value: float, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} never reached {value}:\n{self.output()[-3000:]}"
            time.sleep(0.02)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a graceful shutdown) and the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


MAX_INPUTS, MAX_TOKENS, MAX_BODY_MB = 8, 200, 0.25


@pytest.fixture(scope="package")
def server(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    (folder / "images").mkdir()
    (folder / "secret.png").write_bytes(b"not for clients")
    (folder / "images" / "link.png").symlink_to(folder / "secret.png")
    process = ServerProcess(
        checkpoint,
        folder / "server.log",
        "--image-root",
        str(folder / "images"),
        "--max-request-inputs",
        str(MAX_INPUTS),
        "--max-input-tokens",
        str(MAX_TOKENS),
        "--max-body-mb",
        str(MAX_BODY_MB),
        "--max-wait-ms",
        "50",
    )
    process.images = folder / "images"
    yield process
    assert process.stop() in GRACEFUL_EXIT, process.output()[-3000:]
    assert "0 left queued" in process.output()


def client(server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture
def start_server(checkpoint, tmp_path):
    """start_server(*args) -> a ready ServerProcess; every one is stopped when the test ends."""
    started = []

    def start(*args: str, **kwargs) -> ServerProcess:
        started.append(ServerProcess(checkpoint, tmp_path / f"server-{len(started)}.log", *args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.kill()
