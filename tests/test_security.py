"""TLS, mutual TLS and the bearer token, on in-process servers with a throwaway CA made by openssl."""
from __future__ import annotations

import shutil
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.wire import messages
from common.model.gates import ConstantGate
from common.serving.client import NextTierClient, open_channel
from tests.conftest import mark_serving
from common.serving.server import TierServicer, create_server
from common.serving.runtime import TierRuntime
from common.serving.security import Security
from proto import splitexit_pb2 as pb
from proto import splitexit_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.test_runtime import ToySegment, batch, spec
from tests.tls_for_tests import make_ca

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a CA")
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = make_ca(tmp_path_factory.mktemp("pki"))
    read = lambda name: (folder / name).read_bytes()  # noqa: E731
    server = Security(read("server.pem"), read("server.key"), read("ca.pem"), token=TOKEN)
    client = Security(read("client.pem"), read("client.key"), read("ca.pem"), token=TOKEN)
    return {"folder": folder, "server": server, "client": client, "ca": read("ca.pem")}


@pytest.fixture(scope="module")
def tiers(pki):
    """A cloud and an edge forwarding to it, both mutual TLS + token."""
    started, clients = [], []

    def start(tier, forward=None):
        runtime = TierRuntime(spec(tier=tier, is_last=forward is None), ToySegment(), ConstantGate(False), forward)
        server, port, health = create_server(TierServicer(runtime, pb.TierDescription(tier=tier)), "127.0.0.1:0",
                                             security=pki["server"])
        server.start()
        mark_serving(health)
        started.append(server)
        return f"127.0.0.1:{port}"

    cloud = start("cloud")
    onward = NextTierClient(cloud, timeout_s=10, security=pki["server"])  # the edge's own certificate as client
    clients.append(onward)
    edge = start("edge", onward)
    yield {"cloud": cloud, "edge": edge}
    for c in clients:
        c.close()
    for s in started:
        s.stop(0).wait()


def _infer(address, security, timeout=5):
    with open_channel(address, security) as channel:
        return pb_grpc.TierStub(channel).Infer(messages.request_from_batch(batch([[1, 2]])), timeout=timeout,
                                               metadata=security.metadata() if security else ())


def test_mutual_tls_with_token_answers_through_the_chain(tiers, pki):
    reply = _infer(tiers["edge"], pki["client"])
    p = reply.predictions[0]
    assert (p.exit_tier, p.degraded) == ("cloud", False)  # the edge reached the cloud over mutual TLS too


def test_what_is_refused(tiers, pki):
    c = pki["client"]
    cases = {
        "plaintext": (None, grpc.StatusCode.UNAVAILABLE),
        "no client certificate": (Security(ca=pki["ca"], token=TOKEN), grpc.StatusCode.UNAVAILABLE),
        "no token": (Security(c.cert, c.key, c.ca), grpc.StatusCode.UNAUTHENTICATED),
        "wrong token": (Security(c.cert, c.key, c.ca, token="guess"), grpc.StatusCode.UNAUTHENTICATED),
    }
    for name, (security, code) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            _infer(tiers["cloud"], security)
        assert err.value.code() == code, name


def test_health_needs_no_token(tiers, pki):
    c = pki["client"]
    with open_channel(tiers["cloud"], Security(c.cert, c.key, c.ca)) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_half_a_key_pair_is_a_one_line_error(pki):
    result = subprocess.run([sys.executable, "-m", "cloud", "--bundle", "/x", "--tls-cert",
                             str(pki["folder"] / "server.pem")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--tls-cert and --tls-key go together" in result.stderr.strip().splitlines()[-1]


@pytest.mark.e2e
def test_three_tier_processes_over_mutual_tls_with_a_token(tiny_bundle, test_slice, pki, tmp_path):
    from device.client import run_client
    from common.emulation.deployment import LocalDeployment

    folder = pki["folder"]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    flags = ["--tls-cert", str(folder / "server.pem"), "--tls-key", str(folder / "server.key"),
             "--tls-ca", str(folder / "ca.pem"), "--token-file", str(token_file)]
    extra = {t: flags for t in ("device", "edge", "cloud")}
    with LocalDeployment(tiny_bundle, extra_args=extra, security=pki["client"], startup_timeout_s=60) as dep:
        report = run_client(dep.device_address, test_slice.images[:64], test_slice.labels[:64], 16, tiny_bundle,
                            security=pki["client"])
        with pytest.raises(grpc.RpcError):  # and the same deployment refuses plaintext
            _infer(dep.device_address, None)
    assert report["samples"] == 64 and report["prediction_mismatches"] == 0 and report["degraded"] == 0
