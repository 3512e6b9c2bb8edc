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
from common.metrics import TierMetrics
from common.security import Security
from common.tensor_codecs import FLOAT32, WireCodec
from proto import splitexit_pb2 as pb
from proto import splitexit_pb2_grpc as pb_grpc

log = logging.getLogger("splitexit.rpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tier"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)  # the whole server and the Tier service report the same status
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel and server options: one place for message limits (gRPC's default receive limit is 4 MiB)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Retries replay the request from a buffer that defaults to 256 KiB; activations are larger.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
    ]


# Keepalive: a peer that vanished without closing the connection (a cut cable, a frozen host) is noticed within
# KEEPALIVE_TIME + KEEPALIVE_TIMEOUT instead of at the next request's deadline. Servers accept pings that often.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
# Bounded retries of UNAVAILABLE with exponential backoff (Infer is a pure function of its request, so replaying it
# is safe). gRPC applies this policy itself; the replay buffer is sized by grpc.per_rpc_retry_buffer_size.
RETRY_POLICY = {
    "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2.0,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# Reconnect to a restarted next tier within about a second, not after gRPC's default backoff of up to 2 minutes.
MAX_RECONNECT_BACKOFF_MS = 1_000
# What a hop keeps of its caller's remaining time for itself when it forwards: enough to answer (degraded if need
# be) before the caller gives up. A share of the budget, bounded to [MIN, MAX] seconds.
DEADLINE_MARGIN_SHARE, DEADLINE_MARGIN_MIN_S, DEADLINE_MARGIN_MAX_S = 0.1, 0.02, 0.5
NO_DEADLINE_S = 1e7  # gRPC reports "no deadline" as a remaining time of centuries


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    """Options of a channel to a tier: message limits, the retry policy, keepalive and a short reconnect backoff."""
    config = {"methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": RETRY_POLICY}]}
    return [
        *grpc_options(max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(config)),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    """Options of a tier's server: message limits, and client keepalive pings at our channels' rate allowed."""
    return [
        *grpc_options(max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        # SO_REUSEPORT off: a second tier started on a busy port must fail, not silently share its traffic.
        ("grpc.so_reuseport", 0),
    ]


def forward_timeout(deadline: float | None, cap_s: float, now: float) -> float:
    """Seconds the next hop may take: the caller's remaining budget less a margin for our own answer, at most
    ``cap_s``; 0 or less means there is no time left to forward at all."""
    if deadline is None:
        return cap_s
    remaining = deadline - now
    margin = min(DEADLINE_MARGIN_MAX_S, max(DEADLINE_MARGIN_MIN_S, DEADLINE_MARGIN_SHARE * remaining))
    return min(cap_s, remaining - margin)


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
    """Adapts a ``TierRuntime`` to the ``Tier`` service. Until ``runtime`` is set (the tier is still loading) every
    call is answered UNAVAILABLE, which callers retry."""

    def __init__(self, runtime: TierRuntime | None, description: pb.TierDescription | None,
                 metrics: TierMetrics | None = None) -> None:
        self.runtime = runtime
        self.description = description
        self.metrics = metrics

    def Infer(self, received: messages.Received, context: grpc.ServicerContext) -> pb.InferReply:
        if self.runtime is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the tier is still loading its model")
        t0 = time.perf_counter()
        request, size = received.message, received.nbytes
        try:
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None and remaining < NO_DEADLINE_S else None
            answer = messages.answer_request(self.runtime, received, deadline)
        except RequestError as e:
            code = _CODES.get(e.code, grpc.StatusCode.INTERNAL)
            self._failed(request.request_id, code, t0)
            log.warning("request %s refused: %s: %s", request.request_id, code.name, e,
                        extra={"request_id": request.request_id, "code": code.name})
            context.abort(code, str(e))
        except Exception as e:  # a bug, not a bad request: say so instead of gRPC's bare UNKNOWN
            self._failed(request.request_id, grpc.StatusCode.INTERNAL, t0)
            log.exception("request %s failed", request.request_id, extra={"request_id": request.request_id})
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        seconds = time.perf_counter() - t0
        hop = answer.trace[0]
        if self.metrics is not None:
            self.metrics.observe(answer, size, seconds)
            if not hasattr(self.runtime, "on_batch"):  # a DynamicBatcher reports the batches it merges itself
                self.metrics.batch_ran(len(answer.predictions))
        fields = {"request_id": request.request_id, "samples": hop.samples_in, "degraded": hop.samples_degraded,
                  "ms": round(seconds * 1e3, 3)}
        if hop.samples_degraded:
            log.warning("request %s: %d samples answered degraded: %s", request.request_id, hop.samples_degraded,
                        hop.downstream_error, extra=fields)
        else:
            log.debug("request %s answered", request.request_id, extra=fields)
        return messages.reply_from_answer(answer)

    def _failed(self, request_id: str, code: grpc.StatusCode, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.error(code.name, time.perf_counter() - t0)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.TierDescription:
        if self.description is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the tier is still loading its model")
        return self.description


def add_tier_service(servicer: TierServicer, server: grpc.Server) -> None:
    """Register the ``Tier`` service like the generated ``add_TierServicer_to_server``, except that ``Infer`` is
    handed a ``messages.Received``: the request together with its size on the wire, which the tier reports and
    counts, so that a large request is never serialized again just to be measured."""
    def handler(method, request_type, response_type, parse=None):
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=parse or request_type.FromString,
                                                   response_serializer=response_type.SerializeToString)

    server.add_registered_method_handlers(SERVICE_NAME, {
        "Infer": handler(servicer.Infer, pb.InferRequest, pb.InferReply, messages.Received.parse),
        "Describe": handler(servicer.Describe, pb.DescribeRequest, pb.TierDescription),
    })


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
    servicer: TierServicer, address: str, max_workers: int = 8, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    security: Security | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build (but do not start) a server for ``servicer`` on ``address``; return it, the bound port and its health.

    The standard health service starts as NOT_SERVING; the caller flips it to SERVING once the server is started.
    Server reflection is enabled so generic gRPC tools can list and call the service. ``security`` adds TLS (mutual
    with a CA) and the bearer-token check.
    """
    security = security or Security()
    # Bound the queue: past 2 x workers concurrent calls, gRPC answers RESOURCE_EXHAUSTED instead of buffering
    # ever more large requests in memory.
    options = server_options(max_message_bytes)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                         maximum_concurrent_rpcs=2 * max_workers, interceptors=security.interceptors())
    add_tier_service(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in HEALTH_SERVICES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        credentials = security.server_credentials()
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises RuntimeError("Failed to bind ...") for a busy or invalid address
        raise OSError(f"could not listen on {address}: {e}") from None
    if port == 0:
        raise OSError(f"could not listen on {address}")
    return server, port, health_servicer


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    """Report SERVING or NOT_SERVING for the whole server and for the Tier service."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in HEALTH_SERVICES:
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

    Each call's deadline is the batch's remaining budget less a margin (``forward_timeout``), at most ``timeout_s``;
    UNAVAILABLE is retried by gRPC per ``RETRY_POLICY``. A batch with no time left is not sent at all. ``wire`` is
    the codec of the tensors sent on this link; ``link``, when given, is an emulated link whose delay for the actual
    request and reply sizes is slept after each call (see ``common.link``).
    """

    def __init__(self, target: str, timeout_s: float = 60.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 wire: WireCodec = FLOAT32, link: LinkModel | None = None, security: Security | None = None):
        self.target = target
        self.timeout_s = timeout_s
        self.wire, self.link = wire, link
        self.channel = open_channel(target, security, channel_options(max_message_bytes))
        self.metadata = (security or Security()).metadata()
        self.stub = pb_grpc.TierStub(self.channel)
        # Infer takes the request already serialized (messages.encode_request copies the tensor only once).
        self._infer = self.channel.unary_unary(f"/{SERVICE_NAME}/Infer", request_serializer=None,
                                               response_deserializer=pb.InferReply.FromString)
        self.reachable = True  # set by a health watcher; False = fail at once without trying (circuit open)

    def __call__(self, batch: Batch) -> Forwarded:
        if not self.reachable:
            raise DownstreamError(f"next tier {self.target} is unreachable (health check); not forwarding",
                                  "UNAVAILABLE")
        timeout = forward_timeout(batch.deadline, self.timeout_s, time.monotonic())
        if timeout <= 0:
            raise DownstreamError(f"no time left to forward to {self.target}: the deadline has run out",
                                  "UNAVAILABLE")
        start = time.perf_counter()
        request = messages.encode_request(batch, self.wire)
        encode_ms = (time.perf_counter() - start) * 1e3
        try:
            # Fail fast (no wait_for_ready): a dead next tier must not hold a worker for the whole timeout.
            reply = self._infer(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise DownstreamError(f"next tier {self.target} failed: {e.code().name}: {e.details()}",
                                  _DOWNSTREAM.get(e.code(), "INTERNAL")) from None
        size = len(request)
        link_ms = emulate_link(self.link, size, reply.ByteSize())
        return Forwarded(messages.answer_from_reply(reply), size, encode_ms, link_ms)

    def describe(self) -> pb.TierDescription:
        """The next tier's ``Describe`` answer; waits (up to the timeout) for it to come up."""
        try:
            return self.stub.Describe(pb.DescribeRequest(), timeout=self.timeout_s, wait_for_ready=True,
                                      metadata=self.metadata)
        except grpc.RpcError as e:
            raise DownstreamError(f"{self.target} did not answer Describe: {e.code().name}: {e.details()}") from None

    def close(self) -> None:
        self.channel.close()


def open_channel(target: str, security: Security | None = None, options: list | None = None) -> grpc.Channel:
    """A channel to ``target``: TLS (with our certificate for mutual TLS) when ``security`` has a CA, else plaintext."""
    security = security or Security()
    options = [*(options or []), *security.channel_options()]
    credentials = security.channel_credentials()
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def wait_for_serving(target: str, timeout_s: float = 60.0, security: Security | None = None) -> None:
    """Block until the server at ``target`` reports SERVING on the standard health service."""
    deadline = time.monotonic() + timeout_s
    with open_channel(target, security) as channel:
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
