"""Streamed answers without processes: the runtime, the batcher, the link clock and a served pair of tiers."""
from __future__ import annotations

import threading

import grpc

import pytest
import torch

from common.errors import DownstreamError
from common.model.gates import ConfidenceGate
from common.serving.batching import DynamicBatcher
from common.serving.client import NextTierClient
from common.serving.runtime import Forwarded, TierRuntime
from common.wire.batch import Answer, Batch, Hop, Prediction, merge_answers
from common.wire.link import LinkModel, StreamLinkClock
from proto import splitexit_pb2 as pb
from tests.test_runtime import FakeNext, ToySegment, batch, spec

TIMEOUT = 10.0


class StreamingNext:
    """A next tier answering as a stream: one part per sample (label 2 from 'edge'), then a trace-only part.
    ``release`` (when given) must be set before the first part goes out; ``fail_after`` raises UNAVAILABLE after
    that many parts."""

    def __init__(self, release: threading.Event | None = None, fail_after: int | None = None):
        self.release, self.fail_after = release, fail_after
        self.calls: list[Batch] = []

    def __call__(self, b: Batch):
        self.calls.append(b)
        if self.release is not None:
            assert self.release.wait(TIMEOUT), "never released"
        for k, i in enumerate(b.sample_ids):
            if self.fail_after is not None and k == self.fail_after:
                raise DownstreamError("next tier gone", "UNAVAILABLE")
            yield Forwarded(Answer(b.request_id, [Prediction(i, 2, 0.5, "edge", 1)], []), 100 if k == 0 else 0,
                            link_ms=1.0)
        yield Forwarded(Answer(b.request_id, [], [Hop("edge", len(b.sample_ids), len(b.sample_ids), 2.0)]), 0)


def _parts(rt, b):
    return list(rt.stream(b))


def test_local_answers_go_out_before_anything_is_forwarded():
    events = []
    nxt = StreamingNext()

    def forward_stream(b):
        events.append("forwarded")
        yield from nxt(b)

    rt = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), forward_stream=forward_stream)
    parts = rt.stream(batch([[5, 0], [-5, 0], [3, 1], [-1, 7]]), bytes_received=99)
    first = next(parts)
    events.append("local answered")
    rest = list(parts)
    assert events == ["local answered", "forwarded"]
    assert [(p.sample_id, p.exit_tier) for p in first.predictions] == [(10, "device"), (12, "device")]
    assert [(h.tier, h.samples_in, h.samples_exited, h.bytes_received) for h in first.trace] == [
        ("device", 4, 2, 99)]
    assert [[p.sample_id for p in part.predictions] for part in rest] == [[11], [13], [], []]
    closing = rest[-1].trace[-1]  # this tier's forwarding figures come last
    assert (closing.tier, closing.samples_in, closing.bytes_sent, closing.link_ms) == ("device", 0, 100, 2.0)
    assert closing.forward_ms > 0


def test_stream_merges_into_the_unary_answer():
    b = batch([[5, 0], [-5, 0], [3, 1], [-1, 7]])
    unary = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), FakeNext()).process(b, bytes_received=7)
    parts = _parts(TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), FakeNext()), b)
    merged = merge_answers(b.request_id, b.sample_ids, parts)
    assert merged.predictions == unary.predictions
    assert len(merged.trace) == len(unary.trace) == 1
    a, u = merged.trace[0], unary.trace[0]
    assert (a.samples_in, a.samples_exited, a.bytes_sent, a.flops) == (u.samples_in, u.samples_exited, 1234, u.flops)


def test_nothing_exiting_sends_no_empty_part_first():
    rt = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), forward_stream=StreamingNext())
    parts = _parts(rt, batch([[-5, 0], [-1, 7]]))
    assert [[p.sample_id for p in part.predictions] for part in parts] == [[10], [11], [], []]
    assert [h.tier for h in parts[0].trace] == ["device"]  # the hop rides on the first relayed part


def test_a_next_tier_failing_mid_stream_degrades_only_what_it_had_not_answered():
    rt = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), forward_stream=StreamingNext(fail_after=1))
    b = batch([[5, 0], [-5, 0], [-3, 1], [-1, 7]])
    parts = _parts(rt, b)
    merged = merge_answers(b.request_id, b.sample_ids, parts)  # raises on a sample answered twice or never
    assert [(p.exit_tier, p.degraded) for p in merged.predictions] == [
        ("device", False), ("edge", False), ("device", True), ("device", True)]
    hop = merged.trace[0]
    assert (hop.samples_exited, hop.samples_degraded) == (1, 2) and "next tier gone" in hop.downstream_error
    failing = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), forward_stream=StreamingNext(fail_after=1),
                          on_downstream_failure="fail")
    with pytest.raises(DownstreamError):
        _parts(failing, b)


def test_batched_streams_get_their_own_samples_as_decided():
    """Four callers share one merged batch; each sees its device-answered sample while the next tier still holds
    the rest back, and in the end exactly its own samples under its own ids."""
    release = threading.Event()
    rt = TierRuntime(spec(max_batch=16), ToySegment(), ConfidenceGate(0.9), forward_stream=StreamingNext(release))
    batcher = DynamicBatcher(rt, max_batch=8, max_delay_s=1.0, workers=1)
    got_local = [threading.Event() for _ in range(4)]
    results: dict[int, list[Answer]] = {}

    def caller(c: int) -> None:
        x = torch.tensor([[float(c + 1), 0.0], [-float(c + 1), 0.0]])
        parts = []
        for part in batcher.stream(Batch(f"req-{c}", "m1", [0, 1], x)):
            parts.append(part)
            if any(p.exit_tier == "device" for p in part.predictions):
                got_local[c].set()
        results[c] = parts

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(4)]
    try:
        for t in threads:
            t.start()
        assert all(e.wait(TIMEOUT) for e in got_local)  # answered before the next tier answered anything
    finally:
        release.set()
        for t in threads:
            t.join(TIMEOUT)
        batcher.close()
    assert batcher.batch_sizes == {8: 1}
    for c, parts in results.items():
        merged = merge_answers(f"req-{c}", [0, 1], parts)
        assert [(p.sample_id, p.exit_tier) for p in merged.predictions] == [(0, "device"), (1, "edge")]
        assert [(h.tier, h.samples_in, h.samples_exited) for h in merged.trace] == [("device", 2, 1), ("edge", 1, 1)]


def test_stream_link_clock_shares_the_round_trip():
    now = [100.0]
    link = LinkModel(8e6, 0.020)  # a byte per microsecond
    clock = StreamLinkClock(link, monotonic=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    total = clock.send(1000)
    t_first = now[0]
    total += clock.receive(1000, received_at=now[0])
    assert total == pytest.approx(link.delay_s(1000, 1000) * 1e3)  # one reply: the unary model exactly
    assert now[0] - t_first == pytest.approx(0.011)
    clock.receive(1000, received_at=t_first)  # came in with the first, while that one was being delayed
    assert now[0] - t_first == pytest.approx(0.012)  # one more reply's bytes, not another round trip


def test_a_served_pair_streams_and_answers_as_the_unary_call(serve_runtime):
    cloud = TierRuntime(spec(tier="edge", is_last=True, exits=(1,)), ToySegment(), ConfidenceGate(0.9))
    cloud_address = serve_runtime(cloud, "edge")
    forward = NextTierClient(cloud_address, timeout_s=TIMEOUT)
    entry = None
    try:
        device = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), forward, forward_stream=forward.stream)
        entry = NextTierClient(serve_runtime(device, "device"), timeout_s=TIMEOUT)
        b = batch([[5, 0], [-5, 0], [3, 1], [-1, 7]])
        parts = [f.answer for f in entry.stream(b)]
        unary = entry(b).answer
    finally:
        forward.close()
        if entry is not None:
            entry.close()
    assert [[p.sample_id for p in part.predictions] for part in parts] == [[10, 12], [11, 13], []]
    assert [[h.tier for h in part.trace] for part in parts] == [["device"], ["edge"], ["device"]]
    merged = merge_answers(b.request_id, b.sample_ids, parts)
    assert merged.predictions == unary.predictions
    assert [h.tier for h in merged.trace] == [h.tier for h in unary.trace] == ["device", "edge"]
    assert merged.trace[0].bytes_sent == unary.trace[0].bytes_sent > 0


def test_draining_waits_for_an_open_stream():
    """A server stopping with a grace period lets a stream already answering finish: the local part is out, the
    next tier still holds the rest, and the stream still ends with every sample answered."""
    from common.serving.server import TierServicer, create_server
    from proto import splitexit_pb2 as pb
    from tests.conftest import mark_serving

    release = threading.Event()
    rt = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), forward_stream=StreamingNext(release))
    server, port, health = create_server(TierServicer(rt, pb.TierDescription(tier="device")), "127.0.0.1:0")
    server.start()
    mark_serving(health)  # callers balance on the replica health: a server that never reports it gets no calls
    client = NextTierClient(f"127.0.0.1:{port}", timeout_s=TIMEOUT)
    b = batch([[5, 0], [-5, 0]])
    stopped = None
    try:
        parts = client.stream(b)
        first = next(parts)
        assert [p.sample_id for p in first.answer.predictions] == [10]
        stopped = server.stop(grace=TIMEOUT)  # draining: the stream is in flight
        release.set()
        rest = [f.answer for f in parts]
        merged = merge_answers(b.request_id, b.sample_ids, [first.answer, *rest])
        assert [(p.exit_tier, p.degraded) for p in merged.predictions] == [("device", False), ("edge", False)]
    finally:
        release.set()
        client.close()
        (stopped or server.stop(0)).wait(TIMEOUT)


def test_bench_alternates_unary_and_streamed_calls():
    from scripts.bench_pipeline import alternate_calls

    seen = []

    def unary(b):
        seen.append(("unary", b.sample_ids[0]))
        return Forwarded(Answer(b.request_id, [Prediction(i, 0, 1.0, "device", 0) for i in b.sample_ids]), 10)

    def streamed(b):
        seen.append(("streamed", b.sample_ids[0]))
        for i in b.sample_ids:
            yield Forwarded(Answer(b.request_id, [Prediction(i, 0, 1.0, "device", 0)]), 10 if i == b.sample_ids[0]
                            else 0)

    images = torch.zeros(8, 3, 2, 2, dtype=torch.uint8)
    records, busy = alternate_calls({"unary": ("unary", unary), "streamed": ("stream", streamed)}, images, "m", 4, 2)
    assert seen == [("unary", 0), ("streamed", 0), ("unary", 4), ("streamed", 4),
                    ("streamed", 0), ("unary", 0), ("streamed", 4), ("unary", 4)]
    assert [len(r.sample_latency_ms) for r in records["streamed"]] == [4] * 4
    assert all(not r.sample_latency_ms for r in records["unary"]) and busy["unary"] >= 0
    assert all(r.request_bytes == 10 for rs in records.values() for r in rs)


def test_the_deadline_covers_the_whole_stream(serve_runtime):
    """A next tier slower than the caller's deadline: the local answers come first, the rest degraded in time."""
    from tests.test_deadlines import Slow

    slow_edge = TierRuntime(spec(tier="edge", is_last=True, exits=(1,)), Slow(3.0), ConfidenceGate(0.9))
    forward = NextTierClient(serve_runtime(slow_edge, "edge"), timeout_s=TIMEOUT)
    entry = None
    try:
        device = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), forward_stream=forward.stream)
        entry = NextTierClient(serve_runtime(device, "device"), timeout_s=1.0)  # the whole stream's deadline
        b = batch([[5, 0], [-5, 0]])
        parts = [f.answer for f in entry.stream(b)]
    finally:
        forward.close()
        if entry is not None:
            entry.close()
    assert [[(p.exit_tier, p.degraded) for p in part.predictions] for part in parts] == [
        [("device", False)], [("device", True)]]
    assert "DEADLINE_EXCEEDED" in parts[-1].trace[-1].downstream_error


class _RpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class _ScriptedStream:
    """Stands for the channel's InferStream: each call fails with the next scripted error, then answers."""

    def __init__(self, errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self, request, timeout=None, metadata=None):
        self.calls += 1
        error = self.errors.pop(0) if self.errors else None
        reply = pb.InferReply(request_id="r1", predictions=[pb.Prediction(sample_id=10, label=1, exit_tier="edge")])

        class Call:
            def __iter__(self):
                if error is not None:
                    raise error
                yield reply

            def cancel(self):
                pass

        return Call()


REFUSED = _RpcError(grpc.StatusCode.UNAVAILABLE, "Stream removed (RST_STREAM (Received RST_STREAM with error code 7))")


class _ScriptedUnary:
    """A stand-in for the ``Infer`` stub that raises the given errors on its first calls, then answers."""

    def __init__(self, errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self, request, timeout=None, metadata=None):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return pb.InferReply(request_id="r1", predictions=[pb.Prediction(sample_id=10, label=1, exit_tier="edge")])


@pytest.mark.parametrize("errors, calls, fails", [
    ([REFUSED, REFUSED], 3, False),  # refused unread: sent again
    ([REFUSED] * 4, 4, True),  # but not for ever
    ([_RpcError(grpc.StatusCode.UNAVAILABLE, "Connection reset")], 1, True),  # may have been read: not again
])
@pytest.mark.parametrize("streamed", [True, False])
def test_a_call_the_next_tier_refused_unread_is_sent_again(errors, calls, fails, streamed):
    client = NextTierClient("127.0.0.1:1", timeout_s=5)
    try:
        scripted = (_ScriptedStream if streamed else _ScriptedUnary)(errors)
        if streamed:
            client._infer_stream = scripted
        else:
            client._infer = scripted
        b = Batch("r1", "m1", [10], torch.zeros(1, 2))

        def answered():
            parts = list(client.stream(b)) if streamed else [client(b)]
            return [p.sample_id for part in parts for p in part.answer.predictions]

        if fails:
            with pytest.raises(DownstreamError, match="UNAVAILABLE"):
                answered()
        else:
            assert answered() == [10]
        assert scripted.calls == calls
    finally:
        client.close()
