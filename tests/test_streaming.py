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


class Logged(torch.nn.Module):
    """A stage that notes in ``log`` that it ran, then multiplies by ``k``."""

    def __init__(self, name: str, log: list, k: float = 1.0):
        super().__init__()
        self.name, self.log, self.k = name, log, k

    def forward(self, x):
        self.log.append(self.name)
        return x * self.k


def _two_exits(log: list, k1: float = 1.0):
    """Two exits in one tier, reading the first feature: stage 0 (+1, logged), exit 0 sure above 3; stage 1 (+2,
    then x k1, logged), exit 1 sure above 4."""
    from common.model.split import Segment
    from tests.test_runtime import Add, SureAbove

    return Segment([[Add(1), Logged("stage 0", log)], [Add(2), Logged("stage 1", log, k1)]],
                   [SureAbove(3), SureAbove(4)])


def test_a_tier_with_two_exits_streams_the_first_exits_answers_before_the_second_runs():
    from tests.test_runtime import two_exit_spec

    log: list[str] = []
    rt = TierRuntime(two_exit_spec(), _two_exits(log), ConfidenceGate(0.9), forward_stream=StreamingNext())
    b = batch([[5, 0], [0, 0], [1.5, 0]])  # stage 0: 6 (exit 0), 1, 2.5; stage 1: 3 (sent on), 4.5 (exit 1)
    parts = rt.stream(b, bytes_received=50)
    first = next(parts)
    assert log == ["stage 0"]  # the easy sample is out before the second exit's stage has run
    assert [(p.sample_id, p.exit_index) for p in first.predictions] == [(10, 0)] and first.trace == []
    rest = list(parts)
    assert log == ["stage 0", "stage 1"]
    assert [(p.sample_id, p.exit_index) for p in rest[0].predictions] == [(12, 1)]
    hop = rest[0].trace[0]  # this tier's hop rides on its last answers, its computation complete
    assert (hop.tier, hop.samples_in, hop.samples_exited, hop.bytes_received) == ("device", 3, 2, 50)
    assert hop.flops == 10.0 * 3 + 20.0 * 2 + 5.0 * 1 and hop.compute_ms > 0
    unary = TierRuntime(two_exit_spec(), _two_exits([]), ConfidenceGate(0.9), FakeNext()).process(b, 50)
    merged = merge_answers(b.request_id, b.sample_ids, [first, *rest])
    assert [(p.sample_id, p.exit_tier, p.exit_index) for p in merged.predictions] == [
        (p.sample_id, p.exit_tier if p.exit_tier == "device" else "edge", p.exit_index if p.exit_tier == "device"
         else 1) for p in unary.predictions]
    assert (merged.trace[0].samples_exited, merged.trace[0].flops) == (unary.trace[0].samples_exited,
                                                                       unary.trace[0].flops)


def test_values_overflowing_a_later_exit_refuse_the_request_after_the_earlier_answers():
    from common.errors import InvalidRequest
    from tests.test_runtime import two_exit_spec

    nxt = StreamingNext()
    rt = TierRuntime(two_exit_spec(), _two_exits([], k1=1e36), ConfidenceGate(0.9), forward_stream=nxt)
    b = batch([[5, 0], [5, 0], [-10, 1e3]])  # rows 0 and 1 leave at exit 0; row 2's second value overflows stage 1
    parts = rt.stream(b)
    assert [p.sample_id for p in next(parts).predictions] == [10, 11]
    with pytest.raises(InvalidRequest, match="out of range"):
        next(parts)
    assert nxt.calls == []  # nothing was forwarded
    with pytest.raises(InvalidRequest, match="out of range"):  # unary: refused whole, no answers
        TierRuntime(two_exit_spec(), _two_exits([], k1=1e36), ConfidenceGate(0.9), FakeNext()).process(b)


def test_with_batching_a_request_overflowing_a_later_exit_fails_alone_and_nothing_is_answered_twice():
    """Two streaming callers share a merged batch in a two-exit tier; the second's last row overflows stage 1 after
    both callers' easy rows were answered at exit 0. The first still gets each of its samples exactly once."""
    from common.errors import InvalidRequest
    from tests.test_runtime import two_exit_spec

    rt = TierRuntime(two_exit_spec(max_batch=16), _two_exits([], k1=1e36), ConfidenceGate(0.9),
                     forward_stream=StreamingNext())
    runs: list[int] = []  # the sample count of every batch the runtime is given
    run = rt.stream_validated
    rt.stream_validated = lambda b, size=0: (runs.append(len(b.sample_ids)), run(b, size))[1]
    batcher = DynamicBatcher(rt, max_batch=4, max_delay_s=1.0, workers=1)
    good = Batch("good", "m1", [0, 1], torch.tensor([[5.0, 0.0], [-10.0, 0.0]]))  # exit 0; sent on, finite
    bad = Batch("bad", "m1", [0, 1], torch.tensor([[5.0, 0.0], [-10.0, 1e3]]))  # exit 0; overflows stage 1
    results: dict[str, list] = {}

    def caller(b: Batch) -> None:
        parts = []
        try:
            for part in batcher.stream(b):
                parts.append(part)
        except InvalidRequest as e:
            parts.append(e)
        results[b.request_id] = parts

    threads = [threading.Thread(target=caller, args=(b,)) for b in (good, bad)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        batcher.close()
    assert runs == [4, 2, 2]  # merged, then each on its own once the merged batch was refused
    ok = results["good"]
    assert not any(isinstance(p, Exception) for p in ok)
    merged = merge_answers("good", [0, 1], ok)  # raises on a sample answered twice or never
    assert [(p.sample_id, p.exit_tier) for p in merged.predictions] == [(0, "device"), (1, "edge")]
    refused = results["bad"]
    assert isinstance(refused[-1], InvalidRequest) and "out of range" in str(refused[-1])
    answered = [p.sample_id for part in refused[:-1] for p in part.predictions]
    assert answered == [0]  # its easy row, once


def test_a_stream_closed_after_the_first_exits_answers_runs_no_further_stage():
    """A caller gone after the device's first answers (a cancelled call closes the stream) costs no more compute."""
    from tests.test_runtime import two_exit_spec

    log: list[str] = []
    nxt = StreamingNext()
    rt = TierRuntime(two_exit_spec(), _two_exits(log), ConfidenceGate(0.9), forward_stream=nxt)
    parts = rt.stream(batch([[5, 0], [0, 0]]))
    assert [p.sample_id for p in next(parts).predictions] == [10]
    parts.close()
    assert log == ["stage 0"] and nxt.calls == []
