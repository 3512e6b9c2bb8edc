"""End to end: three real tier processes on free loopback ports, driven over gRPC."""
from __future__ import annotations

import math

import grpc
import pytest
import torch

from common.wire import codecs
from common.model.bundle import read_manifest
from common.model.gates import ConstantGate
from common.wire.link import LinkModel
from common.wire.codecs import WireCodec, link_args
from common.emulation.report import format_summary
from common.serving.client import wait_for_serving
from device.client import run_client
from proto import splitexit_pb2 as pb
from proto import splitexit_pb2_grpc as pb_grpc
from common.emulation.deployment import LocalDeployment
from tests.grpc_tools_for_tests import CountingProxy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # every test here starts tier processes

TIMEOUT = 60


@pytest.fixture(scope="module")
def deployment(tiny_bundle, mixed_gates):
    proxies: dict[str, CountingProxy] = {}

    def via_proxy(tier: str, upstream: str) -> str:
        proxies[tier] = CountingProxy(upstream)
        return proxies[tier].address

    try:
        with LocalDeployment(tiny_bundle, gates=mixed_gates, link=via_proxy, startup_timeout_s=TIMEOUT) as dep:
            dep.proxies = proxies
            yield dep
    finally:
        for proxy in proxies.values():
            proxy.stop()


def test_distributed_predictions_equal_in_process(deployment, tiny_bundle, mixed_gates, test_slice):
    report = run_client(deployment.device_address, test_slice.images, test_slice.labels, 32, tiny_bundle,
                        mixed_gates)
    assert report["samples"] == len(test_slice)
    assert report["prediction_mismatches"] == 0
    assert report["accuracy"] == report["in_process_accuracy"]
    assert all(report["exits"][t] > 0 for t in ("device", "edge", "cloud")), report["exits"]
    assert sum(report["exits"].values()) == len(test_slice)
    assert 0 < report["flops"]["saved_fraction"] < 1


def test_reported_bytes_equal_bytes_on_the_wire(deployment, test_slice):
    for proxy in deployment.proxies.values():
        proxy.sizes.clear()
    report = run_client(deployment.device_address, test_slice.images, test_slice.labels, 48)
    assert report["bytes"]["device_to_edge"] == sum(deployment.proxies["device"].sizes) > 0
    assert report["bytes"]["edge_to_cloud"] == sum(deployment.proxies["edge"].sizes) > 0
    # Each forwarded sample carries its float32 feature map: the link bytes are at least those.
    with grpc.insecure_channel(deployment.addresses["edge"]) as channel:
        edge_input = pb_grpc.TierStub(channel).Describe(pb.DescribeRequest(), timeout=TIMEOUT).input_shape
    forwarded = report["exits"]["edge"] + report["exits"]["cloud"]
    assert report["bytes"]["device_to_edge"] >= forwarded * 4 * math.prod(edge_input)


def test_lossy_codecs_emulated_links_and_compute_profiles_keep_parity(tiny_bundle, mixed_gates, test_slice):
    """int8 and float16+zlib links, a 5 ms link and a stretched edge: still exactly the in-process predictions."""
    wires = {"device": WireCodec("int8"), "edge": WireCodec("float16", "zlib")}
    extra = {t: link_args(w, LinkModel(1e9, 0.005)) for t, w in wires.items()}
    extra["edge"] += ["--compute-scale", "2"]
    with LocalDeployment(tiny_bundle, gates=mixed_gates, extra_args=extra, startup_timeout_s=TIMEOUT) as dep:
        report = run_client(dep.device_address, test_slice.images, test_slice.labels, 32, tiny_bundle, mixed_gates,
                            wires=wires)
    assert report["prediction_mismatches"] == 0
    assert report["accuracy"] == report["in_process_accuracy"]
    forwarded = report["exits"]["edge"] + report["exits"]["cloud"]
    float32_bytes = forwarded * 4 * math.prod(read_manifest(tiny_bundle / "edge").input_shape)
    assert 0 < report["bytes"]["device_to_edge"] < float32_bytes / 3.5
    parts = report["latency_breakdown_ms"]
    assert parts["link"]["p50"] >= 5.0 and parts["compute_edge"]["mean"] > 0 and parts["encode"]["mean"] > 0
    assert parts["total"]["mean"] >= parts["link"]["mean"] + parts["compute_device"]["mean"]


ALWAYS, NEVER = ConstantGate(True), ConstantGate(False)


@pytest.mark.parametrize("gates, tier, batch", [
    ({"device": ALWAYS}, "device", 16),
    ({"device": NEVER, "edge": ALWAYS}, "edge", 16),
    # One request of 192 samples: the device->edge message is over gRPC's 4 MiB default receive limit.
    ({"device": NEVER, "edge": NEVER}, "cloud", 192),
])
def test_accept_all_or_nothing_routes_every_sample_to_one_tier(tiny_bundle, test_slice, gates, tier, batch):
    with LocalDeployment(tiny_bundle, gates=gates, startup_timeout_s=TIMEOUT) as dep:
        report = run_client(dep.device_address, test_slice.images, test_slice.labels, batch)
    assert report["exits"][tier] == len(test_slice)
    if tier == "device":
        assert report["bytes"]["device_to_edge"] == 0 and report["bytes"]["edge_to_cloud"] == 0
    if tier == "cloud":
        assert report["bytes"]["device_to_edge"] > 4 << 20
        assert report["flops"]["saved_fraction"] < 0  # exits that never fire only cost their heads


@pytest.fixture
def stub_for():
    channels = []

    def make(address: str) -> pb_grpc.TierStub:
        channels.append(grpc.insecure_channel(address))
        return pb_grpc.TierStub(channels[-1])

    yield make
    for channel in channels:
        channel.close()


def _request(model_id: str, images: torch.Tensor, ids=None) -> pb.InferRequest:
    ids = list(range(len(images))) if ids is None else ids
    return pb.InferRequest(request_id="t", model_id=model_id, sample_ids=ids, tensor=codecs.encode(images))


def test_bad_requests_get_clear_status_codes_and_the_tier_keeps_serving(deployment, test_slice, stub_for):
    stub = stub_for(deployment.device_address)
    info = stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT)
    images = test_slice.images[:4]

    def expect(request, code, words):
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(request, timeout=TIMEOUT)
        assert err.value.code() == code
        assert words in err.value.details()

    expect(_request("not-my-model", images), grpc.StatusCode.FAILED_PRECONDITION, "model id")
    bad = _request(info.model_id, images)
    bad.tensor.data = bad.tensor.data[:-5]
    expect(bad, grpc.StatusCode.INVALID_ARGUMENT, "bytes")
    bad = _request(info.model_id, images)
    bad.tensor.dtype = "pickle"
    expect(bad, grpc.StatusCode.INVALID_ARGUMENT, "dtype")
    expect(_request(info.model_id, images.float()), grpc.StatusCode.FAILED_PRECONDITION, "uint8")
    expect(_request(info.model_id, images[:, :, :16]), grpc.StatusCode.FAILED_PRECONDITION, "shape")
    expect(_request(info.model_id, images, ids=[1, 1, 2, 3]), grpc.StatusCode.INVALID_ARGUMENT, "duplicate")
    expect(pb.InferRequest(model_id=info.model_id, sample_ids=[0]), grpc.StatusCode.INVALID_ARGUMENT, "no tensor")
    # The edge refuses raw images: it takes the device's features.
    edge = stub_for(deployment.addresses["edge"])
    with pytest.raises(grpc.RpcError) as err:
        edge.Infer(_request(info.model_id, images), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    reply = stub.Infer(_request(info.model_id, images), timeout=TIMEOUT)
    assert [p.sample_id for p in reply.predictions] == [0, 1, 2, 3]
    wait_for_serving(deployment.device_address, timeout_s=5)


def test_describe(deployment, stub_for):
    infos = {t: stub_for(a).Describe(pb.DescribeRequest(), timeout=TIMEOUT) for t, a in deployment.addresses.items()}
    assert list(infos["device"].tiers) == ["device", "edge", "cloud"]
    assert len({i.model_id for i in infos.values()}) == 1
    assert infos["device"].input_dtype == "uint8" and list(infos["device"].input_shape) == [3, 32, 32]
    assert list(infos["device"].stages) == ["stem", "layer1"]
    assert infos["device"].gate_kind == "confidence" and "threshold" in infos["device"].gate_params
    assert infos["cloud"].gate_kind == "always" and infos["cloud"].next_tier == ""
    assert infos["edge"].input_dtype == "float32"


def test_stopping_leaves_no_process_behind(tiny_bundle):
    dep = LocalDeployment(tiny_bundle, startup_timeout_s=TIMEOUT)
    with dep:
        procs = [p.process for p in dep.processes]
        assert all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)
    assert [p.returncode for p in procs] == [0, 0, 0]  # SIGTERM -> drain -> clean exit


@pytest.mark.parametrize("policy", ["mlp", "cost"])
def test_learned_policies_served_by_the_tiers_match_in_process(tiny_bundle, test_slice, policy, stub_for):
    with LocalDeployment(tiny_bundle, policy=policy, startup_timeout_s=TIMEOUT) as dep:
        kinds = [stub_for(dep.addresses[t]).Describe(pb.DescribeRequest(), timeout=TIMEOUT).gate_kind
                 for t in ("device", "edge")]
        report = run_client(dep.device_address, test_slice.images, test_slice.labels, 32, tiny_bundle,
                            policy=policy)
    assert kinds == [policy, policy]
    assert report["prediction_mismatches"] == 0
    assert report["accuracy"] == report["in_process_accuracy"]
    assert sum(1 for n in report["exits"].values() if n) >= 2, report["exits"]  # the learned gates did decide
    # The report says which policy served and how its thresholds were certified (the bundle's record).
    cal = report["calibration"]
    assert (cal["policy"], cal["method"], cal["objective"], cal["target"], cal["delta"]) == (
        policy, "ltt", "target_drop", 5.0, 0.1)
    assert cal["certified"] >= 1 and 0 <= cal["p_value"] <= 0.1
    assert "Learn-then-Test" in format_summary(report)
