"""The batcher's decisions, with a stand-in model that records each forward: inputs of many submits share a forward
within the token budget, the oldest input always goes next, an input over the budget runs alone (never waits
forever), cancelled inputs are skipped, `stop` drains everything; and the service's 503 while shutting down and 504
past the request timeout."""

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from moca_fast.serve.batcher import Batcher


@dataclass
class Sequence:
    sample_id: str
    length: int

    def __len__(self) -> int:
        return self.length


class Recorder:
    """Collates to the list itself; a forward records the ids and returns each sequence's length as its embedding."""

    def __init__(self, gate: threading.Event | None = None):
        self.forwards, self.gate = [], gate

    def collator(self):
        return list

    def embed_packed(self, sequences):
        if self.gate is not None:
            self.gate.wait(30)
        self.forwards.append([s.sample_id for s in sequences])
        return torch.tensor([[float(len(s))] for s in sequences])


def results(tickets):
    return [t.future.result(timeout=30).item() for t in tickets]


def test_inputs_of_several_submits_share_a_forward_within_the_budget():
    model = Recorder()
    batcher = Batcher(model, budget=100, max_wait_s=0.5)
    batcher.start()
    a = batcher.submit([Sequence("a0", 10), Sequence("a1", 20)])
    b = batcher.submit([Sequence("b0", 30)])
    assert results(a) == [10, 20] and results(b) == [30]
    batcher.stop()
    assert [sorted(f) for f in model.forwards] == [["a0", "a1", "b0"]]


def test_a_full_budget_goes_at_once_and_the_oldest_input_is_never_passed_over():
    gate = threading.Event()
    model = Recorder(gate)
    batcher = Batcher(model, budget=50, max_wait_s=60)  # a full budget must not wait the minute
    oldest = batcher.submit([Sequence("small-oldest", 5)])
    rest = batcher.submit([Sequence(f"big{i}", 40) for i in range(3)] + [Sequence("tiny", 3)])
    batcher.start()
    gate.set()
    assert results(oldest) == [5]  # at once, though it could wait a minute for company
    assert "small-oldest" in model.forwards[0]  # cost-sorted packing alone would run a big one first
    batcher.stop()  # the last big one, under the budget alone, would wait out its minute: stop runs it now
    assert results(rest) == [40, 40, 40, 3]
    assert sorted(x for f in model.forwards for x in f) == sorted(["small-oldest", "big0", "big1", "big2", "tiny"])
    assert all(sum(40 for x in f if x.startswith("big")) <= 50 for f in model.forwards)


def test_an_input_over_the_budget_runs_alone_without_waiting():
    model = Recorder()
    batcher = Batcher(model, budget=50, max_wait_s=60)
    batcher.start()
    start = time.monotonic()
    assert results(batcher.submit([Sequence("huge", 500)])) == [500]
    assert time.monotonic() - start < 30
    batcher.stop()
    assert model.forwards == [["huge"]]


def test_cancelled_inputs_are_skipped_and_stop_drains_the_rest():
    model = Recorder()
    batcher = Batcher(model, budget=1000, max_wait_s=60)
    batcher.start()
    dropped = batcher.submit([Sequence("dropped", 5)])
    kept = batcher.submit([Sequence("kept", 7)])
    assert dropped[0].future.cancel()
    batcher.stop()  # without waiting out the minute
    assert results(kept) == [7] and model.forwards == [["kept"]] and batcher.depth == 0
    with pytest.raises(RuntimeError, match="stopping"):
        batcher.submit([Sequence("late", 1)])


def test_flush_ends_the_wait():
    model = Recorder()
    batcher = Batcher(model, budget=1000, max_wait_s=60)
    batcher.start()
    queued = batcher.submit([Sequence("queued", 5)])
    time.sleep(0.05)
    batcher.flush()
    assert results(queued) == [5]
    batcher.stop()


def test_a_failed_forward_fails_its_requests_and_the_worker_goes_on():
    class Flaky(Recorder):
        def embed_packed(self, sequences):
            if any(s.sample_id == "bad" for s in sequences):
                raise RuntimeError("out of memory")
            return super().embed_packed(sequences)

    batcher = Batcher(Flaky(), budget=1000, max_wait_s=0)
    batcher.start()
    with pytest.raises(RuntimeError, match="out of memory"):
        batcher.submit([Sequence("bad", 5)])[0].future.result(timeout=30)
    assert results(batcher.submit([Sequence("good", 3)])) == [3]
    batcher.stop()


@pytest.fixture
def service(embedder):
    from moca_fast.serve.app import EmbeddingService
    from moca_fast.serve.settings import ServeSettings

    def make(**settings):
        service = EmbeddingService(embedder, ServeSettings(model_name="m", max_input_tokens=1000, **settings))
        service.batcher.start()
        return service

    return make


def test_the_service_refuses_while_shutting_down_and_times_out(service):
    from moca_fast.serve.parsing import RequestError
    from moca_fast.serve.schemas import EmbeddingRequest

    body = EmbeddingRequest(model="m", input=["a", "b"])
    draining = service()
    draining.begin_shutdown()
    with pytest.raises(RequestError, match="shutting down") as refused:
        asyncio.run(draining.embed(body))
    assert refused.value.status == 503 and draining.in_flight == 0
    draining.batcher.stop()

    slow = service(max_wait_ms=60_000, request_timeout_s=0.2)
    with pytest.raises(RequestError, match=r"not answered within 0.2 s") as late:
        asyncio.run(slow.embed(body))
    assert late.value.status == 504 and slow.in_flight == 0
    slow.batcher.stop()
    assert slow.embedded == 0  # the timed-out inputs left the queue unembedded
