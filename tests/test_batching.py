"""Dynamic batching: concurrent callers share batches, yet each gets exactly its own samples and its share."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from common.serving.batching import DynamicBatcher
from common.errors import DownstreamError, InvalidRequest
from common.model.gates import ConfidenceGate
from common.wire.batch import Batch, Hop
from common.serving.runtime import TierRuntime
from tests.test_runtime import FakeNext, ToySegment, spec


class TracedNext(FakeNext):
    """FakeNext whose answer also carries the next tier's hop, as a real tier's does."""

    def __call__(self, batch):
        forwarded = super().__call__(batch)
        n = len(batch.sample_ids)
        forwarded.answer.trace.append(Hop("cloud", n, n, 1.0, 1234, flops=50.0 * n))
        return forwarded


def _concurrently(target, args_list, timeout: float = 10.0) -> None:
    """Run ``target(*args)`` for every ``args`` in its own thread at once; wait for all (bounded)."""
    threads = [threading.Thread(target=target, args=args) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)


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

    _concurrently(caller, [(c,) for c in range(8)])
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

    _concurrently(caller, [(c,) for c in range(4)])
    batcher.close()
    assert len(errors) == 4


def _timed(batcher, results, key, values):
    t0 = time.monotonic()
    answer = batcher.process(Batch(key, "m1", list(range(len(values))), torch.tensor(values)))
    results[key] = (answer, time.monotonic() - t0)


def test_a_full_batch_leaves_at_once_whatever_the_delay():
    batcher = DynamicBatcher(_runtime(), max_batch=4, max_delay_s=30.0, workers=1)
    results = {}
    _concurrently(_timed, [(batcher, results, f"r{c}", [[1.0, 0.0]]) for c in range(4)], timeout=20)
    batcher.close()
    assert len(results) == 4 and max(s for _, s in results.values()) < 10  # not the 30 s window
    assert batcher.batch_sizes == {4: 1}


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_a_request_that_does_not_fit_sends_the_batch_collected_so_far():
    batcher = DynamicBatcher(_runtime(), max_batch=4, max_delay_s=30.0, workers=1)
    results = {}
    first = threading.Thread(target=_timed, args=(batcher, results, "three", [[1.0, 0.0]] * 3))
    first.start()
    _wait_until(lambda: batcher._wanted == 1)  # the worker holds "three" and waits for one more sample
    second = threading.Thread(target=_timed, args=(batcher, results, "two", [[1.0, 0.0]] * 2))
    second.start()  # 3 + 2 > 4: "three" must leave now instead of waiting out its window
    first.join(timeout=20)
    _wait_until(lambda: batcher._wanted == 2)  # the worker now holds "two" and waits for two more samples
    _timed(batcher, results, "fill", [[1.0, 0.0]] * 2)  # which fill its batch: it leaves at once too
    second.join(timeout=20)
    batcher.close()
    assert results["three"][1] < 15  # far from the 30 s window
    assert [len(a.predictions) for a, _ in (results["three"], results["two"], results["fill"])] == [3, 2, 2]
    assert batcher.batch_sizes == {3: 1, 4: 1}


def test_time_queued_at_earlier_tiers_shortens_the_window_and_is_carried_on():
    nxt = TracedNext()
    batcher = DynamicBatcher(_runtime(nxt), max_batch=16, max_delay_s=3.0, workers=1)
    t0 = time.monotonic()
    # Its samples already waited 2.9 s upstream: this tier holds it for what is left of its 3 s window at most.
    tired = batcher.process(Batch("tired", "m1", [0], -torch.ones(1, 2), queued_s=2.9))
    held = time.monotonic() - t0
    t0 = time.monotonic()
    fresh = batcher.process(Batch("fresh", "m1", [0], -torch.ones(1, 2)))
    fresh_held = time.monotonic() - t0
    spent = batcher.process(Batch("spent", "m1", [0], -torch.ones(1, 2), queued_s=5.0))
    batcher.close()
    assert held < 2.0 and fresh_held >= 2.9  # a lone request waits its whole window; the tired one far less
    assert [p.sample_id for p in tired.predictions + fresh.predictions + spent.predictions] == [0, 0, 0]
    sent = [b.queued_s for b in nxt.calls]  # what the next tier is told: upstream wait plus the wait here
    assert 2.9 <= sent[0] < 4.5 and 2.9 <= sent[1] < 4.5 and sent[2] >= 5.0
