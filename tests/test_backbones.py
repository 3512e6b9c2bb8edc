"""The contract every registered backbone keeps, at tiny widths and inputs so that all of them run in seconds:

(a) split at its default exit points, with every gate declining, the tiers give exactly the whole network's answer;
(b) exported and served by three gRPC tier servers (in this process, on loopback ports), the distributed predictions
    equal the in-process ones, with samples answered at every tier.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from training.export import export_bundles
from common.model.bundle import find_tier_folders, load_tier_bundle
from common.model.gates import ConfidenceGate, ConstantGate
from common.emulation.chain import load_local_chain
from common.model import ExitHeadSpec, ModelSpec, MultiExitNet, backbone_info, list_backbones
from common.serving.client import NextTierClient
from tests.conftest import mark_serving
from common.serving.server import TierServicer, create_server, describe_tier
from common.wire.batch import Batch
from common.serving.runtime import TierRuntime, TierSpec
from common.model.split import split_model
from device.client import run_client

NAMES = list_backbones()
WIDTH = 0.0625  # 64 channels -> 4: every network keeps its shape and costs almost nothing
INPUTS = {"lenet": (1, 28, 28)}  # the rest at 32 x 32 (VGG's five max-pools and DenseNet's pools need that much)
SAMPLES = 24
TIMEOUT = 30


def spec_for(name: str) -> ModelSpec:
    shape = INPUTS.get(name, (3, 32, 32))
    return ModelSpec(architecture=name, num_classes=5, width=WIDTH, input_shape=shape,
                     exit_points=backbone_info(name).exit_points, exit_head=ExitHeadSpec(),
                     mean=(0.5,) * shape[0], std=(0.25,) * shape[0])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy 2-core machine the second thread's
    waits make every new layer shape cost milliseconds (measured: densenet121 forward 3 s vs 35 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=NAMES)
def exported(request, tmp_path_factory):
    """A model of the backbone with settled BatchNorm statistics, its bundles, and a batch of images."""
    torch.manual_seed(0)
    spec = spec_for(request.param)
    model = MultiExitNet(spec)
    images = torch.randint(0, 256, (SAMPLES, *spec.input_shape), dtype=torch.uint8)
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()
    root = tmp_path_factory.mktemp(request.param)
    never = [ConstantGate(False)] * (model.num_exits - 1)
    export_bundles(model, never, root, [f"c{i}" for i in range(spec.num_classes)])
    return request.param, model, root, images


def test_every_backbone_is_registered_with_three_tier_defaults():
    assert {"resnet18_cifar", "resnet34", "resnet34_cifar", "resnet50", "resnet50_cifar", "vgg11", "vgg19",
            "densenet121", "mobilenet_v2", "lenet", "tiny"} <= set(NAMES)
    for name in NAMES:
        assert len(backbone_info(name).exit_points) == 2


def test_declining_gates_give_the_whole_network(exported):
    name, model, root, images = exported
    with torch.no_grad():
        whole = model.backbone(model.normalize(images))  # the backbone alone, no exit heads involved
        h = images
        for segment in split_model(model):
            h, logits = segment(h)
    assert torch.equal(logits[-1], whole), name

    # The exported bundles, chained in process with every early gate forced to continue: all answers from the
    # cloud, each the whole network's class and confidence.
    first, _ = load_local_chain(root, gates={"device": ConstantGate(False), "edge": ConstantGate(False)})
    answer = first.process(Batch("r", first.spec.model_id, list(range(len(images))), images))
    probs = whole.softmax(1)
    assert [p.exit_tier for p in answer.predictions] == ["cloud"] * len(images)
    assert [p.label for p in answer.predictions] == probs.argmax(1).tolist()
    assert torch.allclose(torch.tensor([p.confidence for p in answer.predictions]), probs.max(1).values,
                          rtol=0, atol=1e-6)


def _median_gates(model: MultiExitNet, images: torch.Tensor) -> dict[str, ConfidenceGate]:
    """Thresholds at the median confidence of each early exit, so every tier answers a share of the batch."""
    with torch.no_grad():
        outs = model(images)
    conf0 = outs[0].softmax(1).max(1).values
    t0 = float(conf0.median())
    rest = conf0 < t0
    t1 = float(outs[1][rest].softmax(1).max(1).values.median())
    return {"device": ConfidenceGate(t0), "edge": ConfidenceGate(t1)}


def _serve_in_threads(root: Path, gates: dict, stack: ExitStack) -> str:
    """Start the tiers of ``root`` as gRPC servers in this process, last first; return the device's address."""
    next_address = None
    for folder in reversed(find_tier_folders(root)):
        bundle = load_tier_bundle(folder)
        spec = TierSpec.from_manifest(bundle.manifest)
        forward = None
        if next_address is not None:
            forward = NextTierClient(next_address, timeout_s=TIMEOUT)
            stack.callback(forward.close)
        runtime = TierRuntime(spec, bundle.segment, bundle.select_gates(gates.get(spec.tier)), forward)
        description = describe_tier(bundle.manifest, runtime.gates, next_address or "")
        server, port, health = create_server(TierServicer(runtime, description), "127.0.0.1:0", max_workers=2)
        server.start()
        stack.callback(lambda s=server: s.stop(None))
        mark_serving(health)
        next_address = f"127.0.0.1:{port}"
    return next_address


def test_three_grpc_tiers_answer_as_the_in_process_chain(exported):
    name, model, root, images = exported
    gates = _median_gates(model, images)
    labels = torch.zeros(len(images), dtype=torch.int64)
    with ExitStack() as stack:
        device = _serve_in_threads(root, gates, stack)
        report = run_client(device, images, labels, batch_size=8, bundle=root, gates=gates, timeout_s=TIMEOUT)
    assert report["samples"] == len(images)
    assert report["prediction_mismatches"] == 0, name
    assert all(report["exits"][t] > 0 for t in ("device", "edge", "cloud")), (name, report["exits"])
    assert report["bytes"]["device_to_edge"] > 0 and report["bytes"]["edge_to_cloud"] > 0
