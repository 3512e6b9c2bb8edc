"""Starvation: callers that open calls and never send the body, or many well-behaved callers at once, must not stop
a tier from answering valid calls and health checks. A raw HTTP/2 client (``h2``) opens the body-less streams."""
from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.model.gates import ConfidenceGate
from common.serving.runtime import TierRuntime
from common.serving.security import Security
from common.serving.server import TierServicer, create_server
from common.wire import messages
from common.wire.batch import Batch
from proto import splitexit_pb2 as pb
from tests.conftest import mark_serving
from tests.test_runtime import FakeNext, ToySegment, spec

h2_connection = pytest.importorskip("h2.connection", reason="the h2 package (test extra) opens raw HTTP/2 streams")
import h2.config  # noqa: E402

INFER = "/splitexit.v1.Tier/Infer"
TOKEN = "s3cret"


class BodylessStreams:
    """One plaintext HTTP/2 connection that opens ``n`` gRPC calls to ``path`` (HEADERS only, never a body) and
    keeps them open, answering the server's settings and pings, until closed."""

    def __init__(self, port: int, n: int, path: str = INFER, metadata: tuple = ()) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.conn = h2_connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.opened = 0
        for _ in range(n):
            sid = self.conn.get_next_available_stream_id()
            try:
                self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                             (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
                                             ("te", "trailers"), *metadata])
                self.opened += 1
            except Exception:  # the server's stream limit, once known: stop opening
                break
        self.sock.sendall(self.conn.data_to_send())
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        self.sock.settimeout(0.2)
        while not self.closed.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.conn.receive_data(data)
                out = self.conn.data_to_send()
            if out:
                try:
                    self.sock.sendall(out)
                except OSError:
                    return

    def close(self) -> None:
        self.closed.set()
        self.reader.join(timeout=5)
        self.sock.close()


@pytest.fixture
def tier(request):
    """An in-process tier at default limits (8 workers); ``request.param`` = bearer token or None."""
    token = getattr(request, "param", None)
    runtime = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), FakeNext())
    server, port, health = create_server(TierServicer(runtime, pb.TierDescription(tier="device")), "127.0.0.1:0",
                                         security=Security(token=token))
    server.start()
    mark_serving(health)
    yield port, token
    server.stop(0).wait()


def _valid_request(i: int = 0) -> bytes:
    return messages.encode_request(Batch(f"ok-{i}", "m1", [1, 2], torch.tensor([[5.0, 0.0], [-5.0, 1.0]])))


def _answered(port: int, token: str | None, timeout: float = 5.0) -> None:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = channel.unary_unary(INFER, response_deserializer=pb.InferReply.FromString)(
            _valid_request(), timeout=timeout, metadata=metadata)
        assert len(reply.predictions) == 2
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("tier, with_token", [(None, False), (TOKEN, False), (TOKEN, True)], indirect=["tier"],
                         ids=["plaintext", "token-attacker-without-token", "token-attacker-with-token"])
def test_bodyless_streams_do_not_starve_valid_calls_or_health(tier, with_token):
    port, token = tier
    metadata = (("authorization", f"Bearer {token}"),) if with_token else ()
    attack = BodylessStreams(port, 32, metadata=metadata)
    try:
        for _ in range(3):
            _answered(port, token)
    finally:
        attack.close()


def test_one_call_in_flight_per_client_is_never_refused(tier):
    port, _ = tier
    clients, calls = 16, 150
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            infer = channel.unary_unary(INFER, response_deserializer=pb.InferReply.FromString)
            for _ in range(calls):
                try:
                    infer(_valid_request(i), timeout=10)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    codes[code] = codes.get(code, 0) + 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    assert codes == {"OK": clients * calls}, codes
