"""Shared fixtures: a tiny trained model, its bundles, and a slice of the synthetic test split (all made in code)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.model import ExitHeadSpec, ModelSpec, MultiExitNet  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from common.data.datasets import load  # noqa: E402


def tiny_spec(**overrides) -> ModelSpec:
    fields = dict(width=0.125, exit_points=(2, 4), exit_head=ExitHeadSpec(conv_channels=8, conv_stride=2))
    fields.update(overrides)
    return ModelSpec(**fields)


@pytest.fixture
def tiny_model() -> MultiExitNet:
    torch.manual_seed(0)
    model = MultiExitNet(tiny_spec())
    # Non-trivial BatchNorm statistics, so eval-mode equivalence is not a coincidence of identity norms.
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A model trained for a few batches on synthetic data and calibrated: seconds, yet with mixed routing.

    Calibrated with the default method (Learn-then-Test, ordered on the training split); 400 validation samples (200
    for the fitted policies) certify a 5-point drop target with early exits at every tier, where a 1-point target
    would only certify "never exit early"."""
    from training.train import train

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = TrainConfig(width=0.125, exit_conv_channels=8, epochs=1, max_batches=25, limit_train=3200,
                      limit_val=400, batch_size=128, target_drop=5.0)
    train(cfg, out)
    return out / "checkpoint.safetensors"


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    from training.export import export

    root = tmp_path_factory.mktemp("tiny-bundle")
    export(tiny_run, root)
    return root


@pytest.fixture(scope="session")
def test_slice():
    return load("synthetic:test", "test", limit=192)


@pytest.fixture(scope="session")
def mixed_gates(tiny_run, test_slice):
    """Thresholds at the median confidence of each exit on the test slice, so every tier answers a share."""
    from common.model.gates import ConfidenceGate
    from training import checkpoint
    from training.engine import collect_logits

    model, _ = checkpoint.load(tiny_run)
    logits = collect_logits(model, test_slice)
    conf0 = logits[0].softmax(1).max(1).values
    t0 = float(conf0.median())
    rest = conf0 < t0
    t1 = float(logits[1][rest].softmax(1).max(1).values.median())
    return {"device": ConfidenceGate(t0), "edge": ConfidenceGate(t1)}


@pytest.fixture
def serve_runtime():
    """Serve ``TierRuntime``s over gRPC on free loopback ports: ``start(runtime, tier)`` -> address; every server
    started is stopped afterwards."""
    from common.serving.server import TierServicer, create_server
    from proto import splitexit_pb2 as pb

    started = []

    def start(runtime, tier: str = "cloud") -> str:
        server, port, health = create_server(TierServicer(runtime, pb.TierDescription(tier=tier)), "127.0.0.1:0")
        server.start()
        mark_serving(health)
        started.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in started:
        server.stop(0).wait()


def mark_serving(health_servicer) -> None:
    """Report SERVING on a test server's health service, as a loaded last tier does."""
    from common.serving.health import TierHealth
    from common.serving.server import HEALTH_SERVICES

    TierHealth(health_servicer, HEALTH_SERVICES, has_next=False).update(loaded=True)


def infer(address: str, batch, timeout: float = 10.0):
    """One raw ``Infer`` call carrying ``batch`` (float32 link), with a bounded timeout."""
    import grpc

    from common.wire import messages
    from proto import splitexit_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        return pb_grpc.TierStub(channel).Infer(messages.request_from_batch(batch), timeout=timeout)
