"""The gRPC glue on an in-process server: status codes, fail-fast forwarding, health, limits."""
from __future__ import annotations

import socket
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.wire import messages
from common.errors import DownstreamError
from common.model.gates import ConstantGate
from common.serving.client import NextTierClient, wait_for_serving
from common.serving.server import TierServicer, create_server
from common.serving.options import grpc_options, message_limit
from common.wire.batch import Batch
from common.serving.runtime import TierRuntime
from proto import splitexit_pb2 as pb
from tests.conftest import infer
from tests.test_runtime import ToySegment, spec


class Exploding(torch.nn.Module):
    def forward(self, x):
        raise ValueError("boom")


@pytest.fixture
def serve(serve_runtime):
    def start(segment, is_last=True, forward=None, tier="cloud", model_id="m1"):
        runtime = TierRuntime(spec(tier=tier, is_last=is_last, model_id=model_id), segment, ConstantGate(False),
                              forward)
        return serve_runtime(runtime, tier)

    return start


def test_a_bug_in_the_runtime_is_internal_with_a_message(serve):
    address = serve(Exploding())
    with pytest.raises(grpc.RpcError) as err:
        infer(address, Batch("r", "m1", [1], torch.zeros(1, 2)))
    assert err.value.code() == grpc.StatusCode.INTERNAL and "ValueError: boom" in err.value.details()
    wait_for_serving(address, timeout_s=5)  # and the server is still up


def test_forwarding_to_a_dead_tier_fails_fast_as_unavailable():
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    client = NextTierClient(dead, timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(DownstreamError) as err:
        client(Batch("r", "m1", [1], torch.zeros(1, 2)))
    client.close()
    assert err.value.code == "UNAVAILABLE"
    assert time.monotonic() - t0 < 15  # did not sit out the 30 s timeout


def test_a_refusing_next_tier_is_a_failed_precondition_upstream(serve):
    cloud = serve(ToySegment(), model_id="another-export")
    client = NextTierClient(cloud, timeout_s=10)
    edge = serve(ToySegment(), is_last=False, forward=client, tier="edge")
    try:
        with pytest.raises(grpc.RpcError) as err:
            infer(edge, Batch("r", "m1", [1], torch.full((1, 2), -1.0)))  # declined at the edge, refused onward
    finally:
        client.close()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "next tier" in err.value.details() and "model id" in err.value.details()


def test_health_reports_serving_state(serve):
    address = serve(ToySegment())
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service="splitexit.v1.Tier"), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_busy_port_is_an_os_error(serve):
    address = serve(ToySegment())
    runtime = TierRuntime(spec(is_last=True), ToySegment(), ConstantGate(True))
    with pytest.raises(OSError, match="could not listen"):
        create_server(TierServicer(runtime, pb.TierDescription()), address)


def test_message_limits_are_set_once_for_both_sides():
    options = dict(grpc_options(10 << 20))
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 10 << 20
    assert options["grpc.per_rpc_retry_buffer_size"] == 10 << 20
    assert message_limit(3072, 65536, 512) > 512 * 65536


def test_time_queued_in_batchers_travels_with_the_request():
    sent = Batch("r", "m1", [1, 2], torch.zeros(2, 2), queued_s=0.0125)
    request = messages.request_from_batch(sent)
    assert request.queued_ms == pytest.approx(12.5)
    assert messages.batch_from_request(pb.InferRequest.FromString(request.SerializeToString())).queued_s == (
        pytest.approx(0.0125))
    assert messages.batch_from_request(messages.request_from_batch(Batch("r", "m1", [1], torch.zeros(1, 2)))
                                       ).queued_s == 0.0  # not batched upstream: nothing spent
