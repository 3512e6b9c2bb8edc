"""Deadlines, retries and degraded answers: the runtime's decision in process, the gRPC side on in-process servers."""
from __future__ import annotations

import json
import socket
import time
from concurrent import futures

import grpc
import pytest
import torch

from common.errors import DownstreamError
from common.model.gates import ConfidenceGate, ConstantGate
from common.emulation.report import RequestRecord, build_report
from common.serving.client import NextTierClient, channel_options, forward_timeout
from common.wire.batch import Batch
from common.serving.runtime import TierRuntime
from proto import splitexit_pb2 as pb
from tests.conftest import infer
from tests.test_runtime import ToySegment, batch, spec


class Failing:
    def __init__(self, code: str):
        self.code = code

    def __call__(self, b: Batch):
        raise DownstreamError(f"next tier failed ({self.code})", self.code)


def test_unreachable_next_tier_degrades_to_this_tiers_exit():
    rt = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), Failing("UNAVAILABLE"))
    answer = rt.process(batch([[5, 0], [-5, 0], [-1, 7]]))
    assert [p.sample_id for p in answer.predictions] == [10, 11, 12]
    assert [p.exit_tier for p in answer.predictions] == ["device"] * 3
    assert [p.degraded for p in answer.predictions] == [False, True, True]
    hop = answer.trace[0]
    assert (hop.samples_exited, hop.samples_degraded, hop.bytes_sent) == (1, 2, 0)
    assert "UNAVAILABLE" in hop.downstream_error
    report = build_report([RequestRecord(answer, 1.0, 10)], {10: 1, 11: 0, 12: 0}, ["device", "edge", "cloud"],
                          300.0, 1.0)
    assert report["degraded"] == 2 and report["exits"]["device"] == 3


def test_fail_mode_and_refusals_are_errors_not_degraded_answers():
    with pytest.raises(DownstreamError):
        TierRuntime(spec(), ToySegment(), ConstantGate(False), Failing("UNAVAILABLE"),
                    on_downstream_failure="fail").process(
            batch([[1, 2]]))
    with pytest.raises(DownstreamError) as err:  # a next tier that refuses our samples is a broken deployment
        TierRuntime(spec(), ToySegment(), ConstantGate(False), Failing("FAILED_PRECONDITION")).process(
            batch([[1, 2]]))
    assert err.value.code == "FAILED_PRECONDITION"
    with pytest.raises(ValueError):
        TierRuntime(spec(), ToySegment(), ConstantGate(False), Failing("UNAVAILABLE"), on_downstream_failure="shrug")


def test_forward_timeout_is_the_remaining_budget_less_a_margin():
    assert forward_timeout(None, 60.0, 100.0) == 60.0
    assert forward_timeout(110.0, 60.0, 100.0) == pytest.approx(9.5)  # margin capped at 0.5 s
    assert forward_timeout(101.0, 60.0, 100.0) == pytest.approx(0.9)  # 10 % of the budget
    assert forward_timeout(200.0, 5.0, 100.0) == 5.0  # never more than the tier's own cap
    assert forward_timeout(100.01, 5.0, 100.0) <= 0  # too late to forward at all


class Slow(torch.nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return ToySegment()(x)


class Recording(TierRuntime):
    """A runtime that remembers how much time its callers left it."""

    budgets: list[float | None] = []

    def process(self, b, bytes_received=0):
        Recording.budgets.append(None if b.deadline is None else b.deadline - time.monotonic())
        return super().process(b, bytes_received)


@pytest.fixture
def serve(serve_runtime):
    clients = []

    def start(segment, forward_to=None, tier="cloud", runtime_cls=TierRuntime, on_failure="degrade"):
        forward = None
        if forward_to:
            forward = NextTierClient(forward_to, timeout_s=30)
            clients.append(forward)
        runtime = runtime_cls(spec(tier=tier, is_last=forward is None), segment, ConstantGate(False), forward,
                              on_downstream_failure=on_failure)
        return serve_runtime(runtime, tier)

    yield start
    for client in clients:
        client.close()


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_a_tier_whose_next_tier_is_down_answers_degraded(serve):
    edge = serve(ToySegment(), forward_to=_dead_address(), tier="edge")
    t0 = time.monotonic()
    reply = infer(edge, batch([[1, 2], [3, 4]]))
    assert time.monotonic() - t0 < 5
    assert [(p.sample_id, p.exit_tier, p.degraded) for p in reply.predictions] == [(10, "edge", True),
                                                                                   (11, "edge", True)]
    assert reply.trace[0].samples_degraded == 2 and "UNAVAILABLE" in reply.trace[0].downstream_error
    failing = serve(ToySegment(), forward_to=_dead_address(), tier="edge", on_failure="fail")
    with pytest.raises(grpc.RpcError) as err:
        infer(failing, batch([[1, 2]]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "next tier" in err.value.details()


def test_a_slow_next_tier_is_cut_off_by_the_callers_deadline_and_answered_degraded(serve):
    cloud = serve(Slow(10.0))
    edge = serve(ToySegment(), forward_to=cloud, tier="edge")
    # The caller gives the whole chain three seconds; an answer at all (no DEADLINE_EXCEEDED) means it came in time.
    reply = infer(edge, batch([[1, 2]]), timeout=3.0)
    assert reply.predictions[0].degraded and reply.predictions[0].exit_tier == "edge"
    assert "DEADLINE_EXCEEDED" in reply.trace[0].downstream_error


def test_the_deadline_travels_downstream_less_a_margin(serve):
    Recording.budgets = []
    cloud = serve(ToySegment(), runtime_cls=Recording)
    edge = serve(ToySegment(), forward_to=cloud, tier="edge", runtime_cls=Recording)
    reply = infer(edge, batch([[1, 2]]), timeout=20.0)
    assert not reply.predictions[0].degraded and reply.predictions[0].exit_tier == "cloud"
    edge_budget, cloud_budget = Recording.budgets
    assert 10.0 < edge_budget <= 20.1  # gRPC measures the deadline on its own clock; generous for a loaded host
    assert cloud_budget < edge_budget - 0.4  # the edge kept a margin (0.5 s at this budget) for its own answer


def test_unavailable_is_retried_with_backoff():
    calls = []

    def flaky(request: bytes, context):
        calls.append(time.monotonic())
        if len(calls) < 3:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        reply = pb.InferReply(request_id="r1", predictions=[pb.Prediction(sample_id=10, label=1, exit_tier="cloud")])
        return reply.SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "splitexit.v1.Tier", {"Infer": grpc.unary_unary_rpc_method_handler(flaky)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = NextTierClient(f"127.0.0.1:{port}", timeout_s=10)
    try:
        forwarded = client(batch([[1, 2]], ids=[10]))
    finally:
        client.close()
        server.stop(0).wait()
    assert [p.sample_id for p in forwarded.answer.predictions] == [10]
    assert len(calls) == 3  # two UNAVAILABLE answers were retried transparently
    # gRPC draws each backoff at random from zero up to the current bound, so the gap between attempts is not
    # asserted; what the channel is told is.
    options = dict(channel_options())
    assert options["grpc.per_rpc_retry_buffer_size"] >= 64 << 20
    policy = json.loads(options["grpc.service_config"])["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"] and float(policy["initialBackoff"].rstrip("s")) > 0
