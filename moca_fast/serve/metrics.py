"""The server's Prometheus metrics (prometheus-client, a registry of its own): requests by status, inputs and tokens
embedded, batch sizes in inputs and tokens, forward time, queue depth, inputs in flight, request latency."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_POWERS_OF_TWO = tuple(2.0**i for i in range(17))


class ServeMetrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "moca_requests", "Embedding requests answered, by HTTP status", ["status"], registry=registry
        )
        self.inputs = Counter("moca_inputs", "Inputs embedded", registry=registry)
        self.tokens = Counter("moca_tokens", "Tokens embedded", registry=registry)
        self.batch_inputs = Histogram(
            "moca_batch_inputs", "Inputs per forward", buckets=_POWERS_OF_TWO[:11], registry=registry
        )
        self.batch_tokens = Histogram(
            "moca_batch_tokens", "Tokens per forward", buckets=_POWERS_OF_TWO, registry=registry
        )
        self.batch_seconds = Histogram(
            "moca_batch_seconds", "Seconds per forward (collation included)", registry=registry
        )
        self.queue_depth = Gauge("moca_queue_inputs", "Inputs queued for a forward", registry=registry)
        self.in_flight = Gauge(
            "moca_in_flight_inputs", "Inputs admitted and not yet answered (bounded by --max-queue)", registry=registry
        )
        self.latency = Histogram(
            "moca_request_seconds",
            "Embedding request latency, body read to answer",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )

    def observe_batch(self, inputs: int, tokens: int, seconds: float) -> None:
        self.inputs.inc(inputs)
        self.tokens.inc(tokens)
        self.batch_inputs.observe(inputs)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
