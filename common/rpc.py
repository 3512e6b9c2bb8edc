"""The only gRPC glue: a servicer adapting ``TierRuntime``, ``create_server``, ``NextTierClient`` and health waits.

Servicers only adapt: they decode the request, hand a ``Batch`` to the runtime, map ``RequestError``s to status codes
and encode the answer. Message-size limits are set once, here, for servers and channels alike.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import messages
from common.errors import DownstreamError, RequestError
from common.link import LinkModel
from common.runtime import Batch, Forwarded, TierRuntime
from common.tensor_codecs import FLOAT32, WireCodec
from proto import splitexit_pb2 as pb
from proto import splitexit_pb2_grpc as pb_grpc

log = logging.getLogger("splitexit.rpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tier"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel and server options: one place for message limits (gRPC's default receive limit is 4 MiB)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Retries replay the request from a buffer that defaults to 256 KiB; activations are larger.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
    ]


def message_limit(input_bytes_per_sample: int, output_bytes_per_sample: int, max_batch: int) -> int:
    """A message limit that admits the largest legitimate request of a tier, with room for ids and framing."""
    per_sample = max(input_bytes_per_sample, output_bytes_per_sample) + 16
    return int(per_sample * max_batch * 1.1) + (1 << 20)


_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}
# What a failed call to the next tier means for the caller: the next tier being unreachable or slow is retryable;
# the next tier refusing our request means the deployment itself is inconsistent (e.g. tiers from two exports).
_DOWNSTREAM = {
    grpc.StatusCode.UNAVAILABLE: "UNAVAILABLE",
    grpc.StatusCode.DEADLINE_EXCEEDED: "UNAVAILABLE",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "UNAVAILABLE",
    grpc.StatusCode.INVALID_ARGUMENT: "FAILED_PRECONDITION",
    grpc.StatusCode.FAILED_PRECONDITION: "FAILED_PRECONDITION",
}


class TierServicer(pb_grpc.TierServicer):
    """Adapts a ``TierRuntime`` to the ``Tier`` service."""

    def __init__(self, runtime: TierRuntime, description: pb.TierDescription) -> None:
        self.runtime = runtime
        self.description = description

    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferReply:
        try:
            answer = messages.answer_request(self.runtime, request)
        except RequestError as e:
            context.abort(_CODES.get(e.code, grpc.StatusCode.INTERNAL), str(e))
        except Exception as e:  # a bug, not a bad request: say so instead of gRPC's bare UNKNOWN
            log.exception("request %s failed", request.request_id)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        return messages.reply_from_answer(answer)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.TierDescription:
        return self.description


def describe_tier(manifest: dict, gate_kind: str, gate_params: dict[str, float], next_tier: str,
                  policy: str = "", calibration: dict | None = None) -> pb.TierDescription:
    """The ``Describe`` answer for a tier, from its bundle manifest and the gate (and policy) it actually runs."""
    seg = manifest["segment"]
    return pb.TierDescription(
        tier=manifest["tier"], model_id=manifest["model_id"], architecture=manifest["model"]["architecture"],
        stages=seg["stages"], exit_index=seg["exit_index"], exit_head=json.dumps(seg["exit_head"]),
        gate_kind=gate_kind, gate_params=gate_params, input_shape=manifest["input"]["shape"],
        input_dtype=manifest["input"]["dtype"], next_tier=next_tier,
        segment_flops=manifest["flops"]["segment"], head_flops=manifest["flops"]["head"],
        full_network_flops=manifest["flops"]["full_network"], class_names=manifest["class_names"],
        tiers=manifest["tiers"], policy=policy, calibration=json.dumps(calibration or {}, sort_keys=True),
    )


def create_server(
    servicer: TierServicer, address: str, max_workers: int = 8, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build (but do not start) a server for ``servicer`` on ``address``; return it, the bound port and its health.

    The standard health service starts as NOT_SERVING; the caller flips it to SERVING once the server is started.
    Server reflection is enabled so generic gRPC tools can list and call the service.
    """
    # Bound the queue: past 2 x workers concurrent calls, gRPC answers RESOURCE_EXHAUSTED instead of buffering
    # ever more large requests in memory.
    # SO_REUSEPORT off: a second tier started on a busy port must fail, not silently share its traffic.
    options = [*grpc_options(max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                         maximum_concurrent_rpcs=2 * max_workers)
    pb_grpc.add_TierServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises RuntimeError("Failed to bind ...") for a busy or invalid address
        raise OSError(f"could not listen on {address}: {e}") from None
    if port == 0:
        raise OSError(f"could not listen on {address}")
    return server, port, health_servicer


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    """Report SERVING or NOT_SERVING for the whole server and for the Tier service."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, status)


def emulate_link(link: LinkModel | None, request_bytes: int, reply_bytes: int) -> float:
    """Sleep the emulated delay of one exchange on ``link`` (nothing without one); return it in ms."""
    if link is None:
        return 0.0
    delay = link.delay_s(request_bytes, reply_bytes)
    time.sleep(delay)
    return delay * 1e3


class NextTierClient:
    """The ``Forward`` function of a tier whose next tier is a gRPC server at ``target``.

    ``wire`` is the codec of the tensors sent on this link; ``link``, when given, is an emulated link whose delay
    for the actual request and reply sizes is slept after each call (see ``common.link``).
    """

    def __init__(self, target: str, timeout_s: float = 60.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 wire: WireCodec = FLOAT32, link: LinkModel | None = None):
        self.target = target
        self.timeout_s = timeout_s
        self.wire, self.link = wire, link
        self.channel = grpc.insecure_channel(target, options=grpc_options(max_message_bytes))
        self.stub = pb_grpc.TierStub(self.channel)

    def __call__(self, batch: Batch) -> Forwarded:
        start = time.perf_counter()
        request = messages.request_from_batch(batch, self.wire)
        encode_ms = (time.perf_counter() - start) * 1e3
        try:
            # Fail fast (no wait_for_ready): a dead next tier must not hold a worker for the whole timeout.
            reply = self.stub.Infer(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise DownstreamError(f"next tier {self.target} failed: {e.code().name}: {e.details()}",
                                  _DOWNSTREAM.get(e.code(), "INTERNAL")) from None
        size = request.ByteSize()
        link_ms = emulate_link(self.link, size, reply.ByteSize())
        return Forwarded(messages.answer_from_reply(reply), size, encode_ms, link_ms)

    def describe(self) -> pb.TierDescription:
        """The next tier's ``Describe`` answer; waits (up to the timeout) for it to come up."""
        try:
            return self.stub.Describe(pb.DescribeRequest(), timeout=self.timeout_s, wait_for_ready=True)
        except grpc.RpcError as e:
            raise DownstreamError(f"{self.target} did not answer Describe: {e.code().name}: {e.details()}") from None

    def close(self) -> None:
        self.channel.close()


def wait_for_serving(target: str, timeout_s: float = 60.0) -> None:
    """Block until the server at ``target`` reports SERVING on the standard health service."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{target} did not report SERVING within {timeout_s:.0f} s")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=min(2.0, remaining)).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
