"""Any gRPC stack can be a device: the Node.js example client (examples/clients/node, @grpc/grpc-js with the contract
loaded at run time) checks health, reads Describe and sends raw images to three real tier processes, by the
streamed and the unary call, and gets exactly the in-process chain's predictions.

Its npm packages are installed into the example's own folder (``node_modules``, not committed) the first time; the
test is skipped, saying why, when node or npm is missing or the install cannot reach the registry."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from common.emulation.chain import evaluate_in_process
from common.emulation.deployment import LocalDeployment
from common.emulation.report import predictions_by_id

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "clients" / "node"
BATCH = 32


@pytest.fixture(scope="session")
def node_client():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to run the Node.js example client")
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        try:
            subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True, capture_output=True,
                           timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"could not install the example's npm packages: {e}")

    def run(target: str, images_file: Path, shape: tuple[int, ...], *flags: str) -> dict:
        out = subprocess.run(["node", str(EXAMPLE / "client.js"), "--target", target, "--images", str(images_file),
                              "--shape", ",".join(map(str, shape)), "--batch-size", str(BATCH), *flags],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    return run


def test_the_node_client_gets_the_in_process_predictions(node_client, tiny_bundle, mixed_gates, test_slice,
                                                         tmp_path):
    images = test_slice.images[:96].contiguous()
    images_file = tmp_path / "images.u8"
    images_file.write_bytes(images.numpy().tobytes())  # uint8, NCHW, C order: what the device tier takes
    _, records = evaluate_in_process(tiny_bundle, images, test_slice.labels[:96], BATCH, mixed_gates)
    expected = predictions_by_id(records)
    assert len({tier for _, tier, _ in expected.values()}) == 3  # every tier answers a share: the links are used
    with LocalDeployment(tiny_bundle, gates=mixed_gates, startup_timeout_s=60) as dep:
        streamed = node_client(dep.device_address, images_file, tuple(images.shape))
        unary = node_client(dep.device_address, images_file, tuple(images.shape), "--unary")
    for run, call in ((streamed, "InferStream"), (unary, "Infer")):
        assert run["call"] == call and run["health"] == "SERVING" and run["tiers"] == ["device", "edge", "cloud"]
        got = {p["sample_id"]: (p["label"], p["exit_tier"], p["exit_index"]) for p in run["predictions"]}
        assert len(run["predictions"]) == len(images) and got == expected
        assert not any(p["degraded"] for p in run["predictions"])
