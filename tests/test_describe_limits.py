"""Describe tells a client what it must respect, and server reflection answers both protocol versions."""
from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from common.model.bundle import find_tier_folders, read_manifest
from common.model.gates import ConfidenceGate
from common.serving.server import TierServicer, create_server, describe_tier
from common.wire.tensors import DEFAULT_LIMITS
from tests.conftest import mark_serving


def test_describe_names_limits_codecs_and_normalisation(tiny_bundle):
    device, edge = (read_manifest(f) for f in find_tier_folders(tiny_bundle)[:2])
    d = describe_tier(device, [ConfidenceGate(0.9)], "127.0.0.1:1", max_batch=64, max_message_bytes=12345)
    assert (d.max_batch, d.max_message_bytes) == (64, 12345)
    lim = d.tensor_limits
    assert (lim.max_rank, lim.max_dim, lim.max_elements, lim.max_decoded_bytes) == (
        DEFAULT_LIMITS.max_rank, DEFAULT_LIMITS.max_dim, DEFAULT_LIMITS.max_elements, DEFAULT_LIMITS.max_decoded_bytes)
    assert list(d.codecs) == ["raw", "float16", "int8"] and list(d.compressions) == ["zlib"]
    assert len(d.input_mean) == len(d.input_std) == 3 and all(s > 0 for s in d.input_std)
    assert (d.gate_kind, dict(d.gate_params)) == ("confidence", {"threshold": 0.9})
    assert [(x.index, x.gate_kind, x.block_flops, x.head_flops) for x in d.exits] == [
        (0, "confidence", device.block_flops[0], device.exit_head_flops[0])]
    e = describe_tier(edge, [ConfidenceGate(0.5)], "")
    assert list(e.input_mean) == [] and list(e.input_std) == []
    assert [x.index for x in e.exits] == [1] and e.history == edge.history


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_v1_and_v1alpha(version):
    server, port, health = create_server(TierServicer(None, None), "127.0.0.1:0")
    server.start()
    try:
        mark_serving(health)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                         request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                         response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol="splitexit.v1.Tier")]
            listed, files = list(call(iter(requests), timeout=10))
        names = {s.name for s in listed.list_services_response.service}
        assert {"splitexit.v1.Tier", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
        assert files.file_descriptor_response.file_descriptor_proto
    finally:
        server.stop(0).wait()
