"""Prometheus metrics of a tier and its JSON log lines."""
from __future__ import annotations

import json
import logging
import urllib.request

import grpc

from common.wire import messages
from common.model.gates import ConfidenceGate
from common.serving.metrics import JsonFormatter, TierMetrics
from tests.conftest import mark_serving
from common.serving.server import TierServicer, create_server
from common.serving.runtime import TierRuntime
from proto import splitexit_pb2 as pb
from proto import splitexit_pb2_grpc as pb_grpc
from tests.test_deadlines import Failing
from tests.test_runtime import ToySegment, batch, spec


def test_metrics_count_requests_samples_bytes_and_errors():
    metrics = TierMetrics("device")
    runtime = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), Failing("UNAVAILABLE"))
    server, port, health = create_server(TierServicer(runtime, pb.TierDescription(), metrics), "127.0.0.1:0")
    server.start()
    mark_serving(health)
    http = metrics.serve(0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TierStub(channel)
            request = messages.request_from_batch(batch([[5, 0], [-5, 0], [-1, 7]]))
            stub.Infer(request, timeout=5)  # one exits, two are degraded (the next tier "failed")
            try:
                stub.Infer(pb.InferRequest(model_id="m1"), timeout=5)
            except grpc.RpcError:
                pass
        text = urllib.request.urlopen(f"http://127.0.0.1:{http.server_port}/metrics", timeout=5).read().decode()
    finally:
        http.shutdown()
        server.stop(0).wait()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['splitexit_requests_total{code="OK",tier="device"}']) == 1
    assert float(lines['splitexit_requests_total{code="INVALID_ARGUMENT",tier="device"}']) == 1
    assert float(lines['splitexit_samples_total{outcome="exited",tier="device"}']) == 1
    assert float(lines['splitexit_samples_total{outcome="degraded",tier="device"}']) == 2
    assert float(lines['splitexit_bytes_received_total{tier="device"}']) == request.ByteSize()
    assert float(lines['splitexit_batch_samples_count{tier="device"}']) == 1
    assert float(lines['splitexit_request_seconds_count{tier="device"}']) == 2


def test_json_log_lines_carry_the_request_id():
    record = logging.LogRecord("splitexit.rpc", logging.WARNING, __file__, 1, "request %s degraded", ("r-7",), None)
    record.request_id, record.tier = "r-7", "edge"
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["request_id"], entry["tier"], entry["level"], entry["message"]) == (
        "r-7", "edge", "WARNING", "request r-7 degraded")
