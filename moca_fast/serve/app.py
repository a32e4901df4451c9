"""The HTTP layer: FastAPI routes over the batcher, admission control, and `serve`, which runs them under uvicorn.

POST /v1/embeddings   OpenAI's request and response shape (see parsing.py for what the body may hold)
GET  /v1/models       the one model served
GET  /health          200 while the batching worker lives (liveness)
GET  /ready           200 when requests are being admitted; 503 while shutting down
GET  /metrics         Prometheus text format

A request is read (body size checked), parsed and prepared in a thread pool, then admitted only if the inputs in
flight stay within --max-queue (else 429; 503 while shutting down); it gets 504 past --request-timeout. On SIGTERM
or SIGINT the server stops admitting, answers every admitted request, drains the batcher and exits.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..embed import MocaEmbedder, finish_embeddings
from .batcher import Batcher
from .inputs import prepare
from .metrics import ServeMetrics
from .parsing import EmbeddingRequest, RequestError, parse_request
from .settings import ServeSettings

log = logging.getLogger(__name__)


class EmbeddingService:
    """What the routes share: the embedder, its batcher, the preprocessing pool, metrics and the admission count."""

    def __init__(self, embedder: MocaEmbedder, settings: ServeSettings):
        self.embedder, self.settings = embedder, settings
        self.metrics = ServeMetrics()
        self.batcher = Batcher(embedder, embedder.batch_tokens, settings.max_wait_ms / 1000, self._observe_batch)
        self.pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="moca-prepare")
        self.in_flight = 0  # inputs admitted and not answered; changed on the event loop only
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.answered = self.embedded = 0  # requests answered, inputs embedded
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        self.metrics.in_flight.set_function(lambda: self.in_flight)

    def begin_shutdown(self) -> None:
        """Admit nothing more and stop waiting to fill forwards; safe in a signal handler (nothing here locks)."""
        self.draining = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.batcher.flush)

    def _observe_batch(self, inputs: int, tokens: int, seconds: float) -> None:
        self.embedded += inputs
        self.metrics.observe_batch(inputs, tokens, seconds)

    async def embed(self, body: bytes) -> bytes:
        """A request body in, the response body out (RequestError for a refusal)."""
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(self.pool, parse_request, body, self.settings, self.embedder.dim)
        count = len(request.inputs)
        self._admit(count)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                sequences = await asyncio.gather(*(loop.run_in_executor(self.pool, prepare, item, self.embedder,
                                                                        self.settings) for item in request.inputs),
                                                 return_exceptions=True)
                errors = [s for s in sequences if isinstance(s, BaseException)]
                if errors:
                    raise errors[0]  # the first bad input of the request
                try:
                    futures = self.batcher.submit(sequences)
                except RuntimeError:
                    raise RequestError(503, "the server is shutting down") from None
                rows = await asyncio.gather(*map(asyncio.wrap_future, futures))
        except TimeoutError:
            raise RequestError(504, f"not answered within {self.settings.request_timeout_s:g} s (the server's "
                                    "--request-timeout); its inputs were dropped") from None
        finally:
            self.in_flight -= count
        tokens = sum(len(s) for s in sequences)
        return await loop.run_in_executor(self.pool, self._response_body, request, rows, tokens)

    def _admit(self, count: int) -> None:
        if self.draining or not self.batcher.running:
            raise RequestError(503, "the server is shutting down")
        if self.in_flight + count > self.settings.max_queue_inputs:
            raise RequestError(429, f"the server is busy: {self.in_flight} inputs in flight and {count} more would "
                                    f"pass its limit of {self.settings.max_queue_inputs} (--max-queue); retry later")
        self.in_flight += count

    def _response_body(self, request: EmbeddingRequest, rows: list[torch.Tensor], tokens: int) -> bytes:
        """The JSON answer (rendered in the pool: thousands of floats would hold up the event loop)."""
        embeddings = finish_embeddings(torch.stack(rows), request.dimensions).numpy()
        if request.encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
            values = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in embeddings]
        else:
            values = embeddings.tolist()
        return json.dumps({"object": "list", "model": self.settings.model_name,
                           "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)],
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, separators=(",", ":")).encode()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(413, f"the request body is {length} bytes, over the server's limit of {limit} "
                                "(--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request body is over the server's limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: EmbeddingService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.loop = asyncio.get_running_loop()
        service.batcher.start()
        yield
        service.begin_shutdown()
        await asyncio.to_thread(service.batcher.stop)
        service.pool.shutdown()
        log.info("stopped: answered %d embedding requests, embedded %d inputs, %d left queued", service.answered,
                 service.embedded, service.batcher.depth)

    app = FastAPI(title="moca-fast", lifespan=lifespan)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        start = time.perf_counter()
        try:
            body = await read_body(request, service.settings.max_body_bytes)
            response = Response(await service.embed(body), media_type="application/json")
        except RequestError as error:
            response = JSONResponse(error.body(), status_code=error.status,
                                    headers={"Retry-After": "1"} if error.status in (429, 503) else None)
        except Exception as error:  # a failed forward: logged by the batcher
            response = JSONResponse(RequestError(500, f"internal error: {error}").body(), status_code=500)
        service.answered += 1
        service.metrics.requests.labels(str(response.status_code)).inc()
        service.metrics.latency.observe(time.perf_counter() - start)
        return response

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "moca-fast"}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = service.batcher.running or service.draining
        return JSONResponse({"status": "ok" if alive else "batching worker stopped"}, status_code=200 if alive else 503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if service.draining or not service.batcher.running:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ready", "model": service.settings.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        content, media_type = service.metrics.exposition()
        return Response(content, media_type=media_type)

    return app


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, with admission stopped and the batcher flushed the moment a shutdown signal arrives (uvicorn
    then waits for the open requests, and the lifespan's end drains and stops the batcher)."""

    def __init__(self, config: uvicorn.Config, service: EmbeddingService):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.begin_shutdown()
        super().handle_exit(sig, frame)


def serve(embedder: MocaEmbedder, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGTERM / SIGINT, then shut down gracefully."""
    service = EmbeddingService(embedder, settings)
    config = uvicorn.Config(create_app(service), host=host, port=port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)
    log.info("serving %s on http://%s:%d (batch budget %d tokens, max wait %g ms, queue %d inputs)",
             settings.model_name, host, port, embedder.batch_tokens, settings.max_wait_ms, settings.max_queue_inputs)
    _DrainingServer(config, service).run()
