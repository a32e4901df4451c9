"""Dynamic batching: the queue between request handlers and the model, and the one thread that runs the model.

Handlers submit encoded sequences and get a ticket per input (its future and its times). The worker waits until the
queued inputs fill the token budget or the oldest has waited `max_wait_s`, plans batches over the queued inputs
that want the oldest one's output (pooled or multi-vector: one forward gives one kind) with the embedder's own
cost-sorted packing (embed.plan_batches), and runs the batch holding the oldest input (so none starves), then the
next. Packing has no padding and attention never crosses sequences, so an input's embedding does not depend on
what it shares a forward with. `flush` ends the waiting for more (a shutdown has begun); `stop` drains the queue
before it returns: no admitted input is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..data.processor import EncodedSequence
from ..embed import MocaEmbedder, plan_batches

log = logging.getLogger(__name__)


@dataclass
class Ticket:
    """One queued input: its future (the raw pooled embedding [dim], or its multi-vectors [tokens, dim]) and when it
    arrived, entered its forward and left it (time.monotonic; started and finished stay 0 until then)."""

    sequence: EncodedSequence
    output: str = "pooled"  # or "multi_vector"
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    started: float = 0.0
    finished: float = 0.0


class Batcher:
    """Packs queued sequences into forwards of at most `budget` tokens (an input over it runs alone)."""

    def __init__(
        self,
        embedder: MocaEmbedder,
        budget: int,
        max_wait_s: float,
        on_batch: Callable[[int, int, float], None] | None = None,
    ):
        self.embedder, self.budget, self.max_wait_s = embedder, budget, max_wait_s
        self.on_batch = on_batch  # (inputs, tokens, seconds) of each forward
        self._collate = embedder.collator()
        self._queue: deque[Ticket] = deque()
        self._tokens = 0  # queued tokens
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="moca-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def depth(self) -> int:
        """Inputs queued, not yet in a forward."""
        return len(self._queue)

    def submit(self, sequences: list[EncodedSequence], output: str = "pooled") -> list[Ticket]:
        """Queue the sequences; each ticket's future gets its raw embedding [dim] (float32, CPU; for "multi_vector"
        its per-token vectors [tokens, dim], as the embedder's embed_packed gives them) or the forward's error.
        Cancelling a future before its forward starts takes the input out."""
        queued = [Ticket(sequence, output) for sequence in sequences]
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batcher is stopping")
            self._queue.extend(queued)
            self._tokens += sum(len(q.sequence) for q in queued)
            self._cond.notify()
        return queued

    def flush(self) -> None:
        """Run what is queued, and from now on whatever comes, without waiting for more (a shutdown has begun)."""
        with self._cond:
            self.max_wait_s = 0.0
            self._cond.notify()

    def stop(self) -> None:
        """Refuse new inputs, finish every queued one, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._forward(batch)

    def _next_batch(self) -> list[Ticket] | None:
        with self._cond:
            while True:
                self._drop_cancelled()
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                wait = self._queue[0].arrived + self.max_wait_s - time.monotonic()
                if self._stopping or self._tokens >= self.budget or wait <= 0:
                    break
                self._cond.wait(wait)
            kind = self._queue[0].output
            queued = [q for q in self._queue if q.output == kind]
            chosen = next(b for b in plan_batches([len(q.sequence) for q in queued], self.budget) if 0 in b)
            taken = {id(queued[i]) for i in chosen}
            self._queue = deque(q for q in self._queue if id(q) not in taken)
            batch = [queued[i] for i in chosen]
            self._tokens -= sum(len(q.sequence) for q in batch)
            return batch

    def _drop_cancelled(self) -> None:
        if any(q.future.cancelled() for q in self._queue):
            self._queue = deque(q for q in self._queue if not q.future.cancelled())
            self._tokens = sum(len(q.sequence) for q in self._queue)

    def _forward(self, batch: list[Ticket]) -> None:
        batch = [q for q in batch if q.future.set_running_or_notify_cancel()]
        if not batch:
            return
        start = time.perf_counter()
        for q in batch:
            q.started = time.monotonic()
        try:
            packed = self._collate([q.sequence for q in batch])
            if batch[0].output == "pooled":
                rows = self.embedder.embed_packed(packed)
            else:
                rows = self.embedder.embed_packed(packed, output=batch[0].output)
        except Exception as error:  # the requests fail (500); the server goes on
            log.exception("a forward of %d inputs failed", len(batch))
            for q in batch:
                q.future.set_exception(error)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), sum(len(q.sequence) for q in batch), time.perf_counter() - start)
        for q, row in zip(batch, rows):
            q.finished = time.monotonic()
            q.future.set_result(row)
