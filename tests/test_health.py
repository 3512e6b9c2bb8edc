"""Health: NOT_SERVING while loading, while draining and while the next tier is down; back when it returns."""
from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.model.gates import ConstantGate
from common.serving.health import NextTierWatcher, TierHealth
from tests.conftest import mark_serving
from common.serving.server import HEALTH_SERVICES, TierServicer, create_server
from common.serving.runtime import TierRuntime
from proto import splitexit_pb2 as pb
from tests.test_runtime import ToySegment, spec

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(servicer: health.HealthServicer, service: str = "") -> int:
    return servicer.Check(health_pb2.HealthCheckRequest(service=service), None).status


def _wait_for(predicate, timeout_s: float = 5.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_serving_needs_loaded_not_draining_and_the_next_tier_up():
    servicer = health.HealthServicer()
    h = TierHealth(servicer, HEALTH_SERVICES, has_next=True)
    assert _status(servicer) == NOT_SERVING  # loading
    h.update(loaded=True)
    assert _status(servicer) == NOT_SERVING  # next tier not seen yet
    h.update(next_up=True)
    assert _status(servicer) == _status(servicer, "splitexit.v1.Tier") == SERVING
    h.update(next_up=False)
    assert _status(servicer) == NOT_SERVING
    h.update(next_up=True, draining=True)
    assert _status(servicer) == NOT_SERVING
    last = TierHealth(health.HealthServicer(), HEALTH_SERVICES, has_next=False)
    last.update(loaded=True)
    assert _status(last.servicer) == SERVING


def _start_cloud(address: str):
    runtime = TierRuntime(spec(tier="cloud", is_last=True), ToySegment(), ConstantGate(True))
    server, port, hs = create_server(TierServicer(runtime, pb.TierDescription(tier="cloud")), address)
    server.start()
    mark_serving(hs)
    return server, port


def test_the_watcher_follows_the_next_tier_down_and_back_up():
    cloud, port = _start_cloud("127.0.0.1:0")
    servicer = health.HealthServicer()
    h = TierHealth(servicer, HEALTH_SERVICES, has_next=True)
    h.update(loaded=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    states = []
    watcher = NextTierWatcher(channel, lambda state: (states.append(state), h.update(next_up=state == "serving")),
                              interval_s=0.1).start()
    try:
        _wait_for(lambda: _status(servicer) == SERVING)
        cloud.stop(0).wait()
        _wait_for(lambda: _status(servicer) == NOT_SERVING)
        cloud, _ = _start_cloud(f"127.0.0.1:{port}")  # restarted on the same address
        assert _wait_for(lambda: _status(servicer) == SERVING) < 4.0
        assert states == ["serving", "unreachable", "serving"]
    finally:
        watcher.stop()
        channel.close()
        cloud.stop(0).wait()


def test_an_unloaded_tier_answers_unavailable():
    server, port, _ = create_server(TierServicer(None, None), "127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            hs = health_pb2_grpc.HealthStub(channel)
            assert hs.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING
            stub = pb.DESCRIPTOR.services_by_name["Tier"]  # the service exists but refuses until loaded
            try:
                channel.unary_unary(f"/{stub.full_name}/Describe")(b"", timeout=5)
                raise AssertionError("Describe answered before loading")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.details()
    finally:
        server.stop(0).wait()
