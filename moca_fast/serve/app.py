"""The HTTP layer: FastAPI routes over the batcher, admission control, and `serve`, which runs them under uvicorn.

POST /v1/embeddings   OpenAI's request and response (schemas.py; documented in /docs and /openapi.json)
GET  /v1/models       the one model served
GET  /health          200 while the batching worker lives (liveness; open without the API key, as in TEI and vLLM)
GET  /ready           200 when requests are being admitted; 503 while shutting down
GET  /metrics         Prometheus text format: the batcher's metrics and HTTP request metrics (the instrumentator)

Every error, FastAPI's own 404 / 405 / 422 included, is OpenAI's {"error": {"message", "type", "param", "code"}};
a validation error is a 400. With --api-key every route but /health wants "Authorization: Bearer KEY" (401);
with --cors-allow-origin, browsers from those origins may call it (preflight included). A request body is bounded
by FastAPI's max_body_size (413), validated, then prepared in a thread pool, then admitted only if the inputs in
flight stay within --max-queue (else 429; a request that could never fit is a 413 at parsing; 503 while shutting
down); it gets 504 past --request-timeout. Answers carry TEI's headers, times in whole milliseconds:
x-tokenization-time (images decoded and inputs encoded), x-queue-time (until its first forward began),
x-inference-time (first forward begun to last one done), x-total-time and x-compute-time (both the route's whole
time, as TEI sends them), x-compute-tokens and x-compute-characters. On SIGTERM or SIGINT the
server stops admitting, answers every admitted request, drains the batcher and exits.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.exceptions import HTTPException

from ..embed import MocaEmbedder
from .batcher import Batcher
from .encoding import response_body
from .inputs import Preparer
from .metrics import ServeMetrics
from .parsing import ParsedRequest, RequestError, error_body, parse_request
from .schemas import ERRORS, EmbeddingRequest, EmbeddingResponse, ModelCard, ModelList, Status
from .settings import ServeSettings

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health",)  # answered without the API key


class EmbeddingService:
    """What the routes share: the embedder, its batcher, the preprocessing pool, metrics and the admission count."""

    def __init__(self, embedder: MocaEmbedder, settings: ServeSettings):
        self.embedder, self.settings = embedder, settings
        self.metrics = ServeMetrics()
        self.preparer = Preparer.build(embedder.processor, settings)
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

    async def embed(self, request: EmbeddingRequest) -> tuple[bytes, dict[str, str]]:
        """A validated request in, the response body and its timing headers out (RequestError for a refusal)."""
        loop = asyncio.get_running_loop()
        parsed = parse_request(request, self.settings, self.embedder)
        count = len(parsed.inputs)
        self._admit(count)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                prepared = time.monotonic()
                sequences = await asyncio.gather(
                    *(
                        loop.run_in_executor(self.pool, self.preparer.prepare, item, parsed.truncate)
                        for item in parsed.inputs
                    ),
                    return_exceptions=True,
                )
                submitted = time.monotonic()
                errors = [s for s in sequences if isinstance(s, BaseException)]
                if errors:
                    raise errors[0]  # the first bad input of the request
                try:
                    tickets = self.batcher.submit(sequences, parsed.output)
                except RuntimeError:
                    raise RequestError(503, "the server is shutting down") from None
                rows = await asyncio.gather(*(asyncio.wrap_future(t.future) for t in tickets))
        except TimeoutError:
            raise RequestError(
                504,
                f"not answered within {self.settings.request_timeout_s:g} s (the server's "
                "--request-timeout); its inputs were dropped",
            ) from None
        finally:
            self.in_flight -= count
        tokens = sum(len(s) for s in sequences)
        started, finished = min(t.started for t in tickets), max(t.finished for t in tickets)
        characters = sum(len(item.text) for item in parsed.inputs)
        headers = {
            "x-tokenization-time": _ms(submitted - prepared),
            "x-queue-time": _ms(started - submitted),
            "x-inference-time": _ms(finished - started),
            "x-compute-tokens": str(tokens),
            "x-compute-characters": str(characters),
        }
        body = await loop.run_in_executor(self.pool, self._response, parsed, rows, tokens)
        return body, headers

    def _response(self, parsed: ParsedRequest, rows: list, tokens: int) -> bytes:
        return response_body(parsed, rows, self.settings.model_name, tokens)

    def _admit(self, count: int) -> None:
        if self.draining or not self.batcher.running:
            raise RequestError(503, "the server is shutting down")
        if self.in_flight + count > self.settings.max_queue_inputs:
            raise RequestError(
                429,
                f"the server is busy: {self.in_flight} inputs in flight and {count} more would "
                f"pass its limit of {self.settings.max_queue_inputs} (--max-queue); retry later",
            )
        self.in_flight += count


def _ms(seconds: float) -> str:
    return str(max(0, round(seconds * 1000)))


def _error(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def validation_message(error: dict) -> tuple[str, str | None]:
    """(message, param) of pydantic's first complaint, naming the field: our own item checks as they are written,
    pydantic's as "<field>: <what is wrong>"."""
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = location[0] if location else None
    if error.get("type") == "value_error" and "error" in error.get("ctx", {}):
        return str(error["ctx"]["error"]), param
    if error.get("type") == "extra_forbidden":
        return f"unknown field {'.'.join(location)!r}; see /docs for the request's fields", param
    if error.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')}", None
    if error.get("type") == "model_attributes_type":
        return f"{'.'.join(location) or 'the request body'} must be a JSON object", param
    return f"{'.'.join(location) or 'the request body'}: {error.get('msg', 'invalid')}", param


class BodyLimit:
    """413 in OpenAI's shape for a request body over `limit` bytes: at once when its content-length says so, else as
    soon as the bytes read pass it (an HTTPException from `receive`, which FastAPI's body reading lets through)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = _error(
                413, f"the request body is {int(length)} bytes, over the server's limit of {self.limit} (--max-body-mb)"
            )
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413)
            return message

        await self.app(scope, counted, send)


def create_app(service: EmbeddingService) -> FastAPI:
    settings = service.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.loop = asyncio.get_running_loop()
        service.batcher.start()
        yield
        service.begin_shutdown()
        await asyncio.to_thread(service.batcher.stop)
        service.pool.shutdown()
        log.info(
            "stopped: answered %d embedding requests, embedded %d inputs, %d left queued",
            service.answered,
            service.embedded,
            service.batcher.depth,
        )

    app = FastAPI(
        title="moca-fast", summary="MoCa multimodal embeddings in OpenAI's /v1/embeddings shape", lifespan=lifespan
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error.errors()[0])
        return _error(400, message, param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {
            404: f"no route {request.url.path}; see /docs",
            405: f"{request.method} is not allowed on {request.url.path}",
            413: f"the request body is over the server's limit of {settings.max_body_bytes} bytes (--max-body-mb)",
        }.get(error.status_code, str(error.detail))
        if error.status_code == 400 and isinstance(error.__cause__, RecursionError):
            message = "the request body is not valid JSON: nested too deep"
        return _error(error.status_code, message, headers=getattr(error, "headers", None))

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return _error(
            error.status,
            error.message,
            error.param,
            error.code,
            {"Retry-After": "1"} if error.status in (429, 503) else None,
        )

    if settings.api_key is not None:
        expected = f"Bearer {settings.api_key}".encode()

        @app.middleware("http")
        async def authenticate(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if request.url.path in OPEN_PATHS or hmac.compare_digest(given, expected):
                return await call_next(request)
            return _error(
                401,
                'invalid or missing API key: send "Authorization: Bearer <key>" (the server\'s --api-key)',
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_allow_origins:  # added last: outermost, so preflights and 401s get CORS headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_allow_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[
                "x-total-time",
                "x-tokenization-time",
                "x-queue-time",
                "x-inference-time",
                "x-compute-time",
            ],
        )
    Instrumentator(registry=service.metrics.registry, excluded_handlers=["/metrics"]).instrument(app)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
    async def embeddings(body: EmbeddingRequest) -> Response:
        start = time.perf_counter()
        try:
            content, headers = await service.embed(body)
            response = Response(content, media_type="application/json", headers=headers)
        except RequestError as error:
            response = _error(
                error.status,
                error.message,
                error.param,
                error.code,
                {"Retry-After": "1"} if error.status in (429, 503) else None,
            )
        except Exception as error:  # a failed forward: logged by the batcher
            log.exception("an embedding request failed")
            response = _error(500, f"internal error: {type(error).__name__}")
        service.answered += 1
        response.headers["x-total-time"] = response.headers["x-compute-time"] = _ms(time.perf_counter() - start)
        service.metrics.requests.labels(str(response.status_code)).inc()
        service.metrics.latency.observe(time.perf_counter() - start)
        return response

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_name)])

    @app.get("/health", response_model=Status, responses={503: {"model": Status}})
    async def health() -> JSONResponse:
        alive = service.batcher.running or service.draining
        return JSONResponse({"status": "ok" if alive else "batching worker stopped"}, status_code=200 if alive else 503)

    @app.get("/ready", response_model=Status, responses={503: {"model": Status}})
    async def ready() -> JSONResponse:
        if service.draining or not service.batcher.running:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ready", "model": settings.model_name})

    @app.get("/metrics", response_class=Response)
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
    config = uvicorn.Config(
        create_app(service),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    log.info(
        "serving %s on http://%s:%d (batch budget %d tokens, max wait %g ms, queue %d inputs, %d tokens per input)",
        settings.model_name,
        host,
        port,
        embedder.batch_tokens,
        settings.max_wait_ms,
        settings.max_queue_inputs,
        service.preparer.max_tokens,
    )
    _DrainingServer(config, service).run()
