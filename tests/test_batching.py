"""Dynamic batching: concurrent callers share batches, yet each gets exactly its own samples and its share."""
from __future__ import annotations

import threading

import pytest
import torch

from common.batching import DynamicBatcher
from common.errors import DownstreamError, InvalidRequest
from common.gates import ConfidenceGate
from common.runtime import Batch, Hop, TierRuntime
from tests.test_runtime import FakeNext, ToySegment, spec


class TracedNext(FakeNext):
    """FakeNext whose answer also carries the next tier's hop, as a real tier's does."""

    def __call__(self, batch):
        forwarded = super().__call__(batch)
        n = len(batch.sample_ids)
        forwarded.answer.trace.append(Hop("cloud", n, n, 1.0, 1234, flops=50.0 * n))
        return forwarded


def _runtime(next_=None):
    return TierRuntime(spec(max_batch=16), ToySegment(), ConfidenceGate(0.9), next_ or FakeNext())


def test_concurrent_callers_are_coalesced_and_each_gets_its_own_samples():
    nxt = TracedNext()
    batcher = DynamicBatcher(_runtime(nxt), max_batch=16, max_delay_s=0.05, workers=1)
    results: dict[int, object] = {}
    barrier = threading.Barrier(8)

    def caller(c: int) -> None:
        # Every caller uses the same sample ids; the sign of the value decides the exit (device or next tier).
        x = torch.tensor([[float(c + 1), 0.0], [-float(c + 1), 0.0]])
        barrier.wait()
        results[c] = batcher.process(Batch(f"req-{c}", "m1", [0, 1], x), bytes_received=100 + c)

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    batcher.close()
    assert sorted(results) == list(range(8))
    for c, answer in results.items():
        assert answer.request_id == f"req-{c}"
        assert [(p.sample_id, p.exit_tier, p.label) for p in answer.predictions] == [(0, "device", 1), (1, "cloud", 2)]
        hop = answer.trace[0]
        assert (hop.samples_in, hop.samples_exited, hop.bytes_received, hop.flops) == (2, 1, 100 + c, 200.0)
        assert (answer.trace[1].samples_in, answer.trace[1].flops) == (1, 50.0)  # its one forwarded sample
    assert len(nxt.calls) < 8  # fewer batches went onward than callers came in
    assert sum(n * k for n, k in batcher.batch_sizes.items()) == 16
    assert max(batcher.batch_sizes) > 2


def test_a_bad_request_fails_alone_and_errors_reach_every_caller_of_a_batch():
    batcher = DynamicBatcher(_runtime(), max_batch=16, max_delay_s=0.01)
    with pytest.raises(InvalidRequest, match="duplicate"):
        batcher.process(Batch("bad", "m1", [1, 1], torch.zeros(2, 2)))
    answer = batcher.process(Batch("good", "m1", [5], torch.ones(1, 2)))
    assert [p.sample_id for p in answer.predictions] == [5]
    batcher.close()

    def refuse(b):
        raise DownstreamError("refused", "FAILED_PRECONDITION")

    batcher = DynamicBatcher(_runtime(refuse), max_batch=16, max_delay_s=0.05, workers=1)
    errors = []

    def caller(c):
        try:
            batcher.process(Batch(f"r{c}", "m1", [0], -torch.ones(1, 2)))
        except DownstreamError as e:
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    batcher.close()
    assert len(errors) == 4
