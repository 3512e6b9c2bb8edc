"""The caller's side of the ``Tier`` service: channels to a tier, the next-tier ``Forward`` function, health waits.

``NextTierClient`` is what a tier's runtime (and the device client) calls to hand samples on; it maps gRPC failures
to ``DownstreamError`` codes the runtime understands, so the runtime itself never sees grpc.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import DownstreamError
from common.serving.health import REPLICA_HEALTH_SERVICE
from common.serving.options import (DEFAULT_MAX_MESSAGE_BYTES, KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS, SERVICE_NAME,
                                    grpc_options)
from common.serving.runtime import Forwarded
from common.serving.security import Security
from common.wire import messages
from common.wire.batch import Batch
from common.wire.codecs import FLOAT32, WireCodec
from common.wire.link import LinkModel, StreamLinkClock, emulate_link
from proto import splitexit_pb2 as pb
from proto import splitexit_pb2_grpc as pb_grpc

# Bounded retries of UNAVAILABLE with exponential backoff (Infer is a pure function of its request, so replaying it
# is safe). gRPC applies this policy itself; the replay buffer is sized by grpc.per_rpc_retry_buffer_size.
RETRY_POLICY = {
    "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2.0,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# InferStream is not retried by gRPC: with a retry policy, a server-streaming call whose server dies (SIGKILL) while
# the call waits for its first reply hangs until its deadline and beyond (grpcio 1.85), where without one it fails
# at once with UNAVAILABLE, which the runtime answers degraded. A method's own entry overrides the service's.
STREAM_METHOD_CONFIG = [{"name": [{"service": SERVICE_NAME, "method": "InferStream"}]}]
# ... except a stream the next tier refused before reading it (HTTP/2 REFUSED_STREAM: its per-connection stream
# limit was full for a moment, e.g. while it still counted a just-finished stream), which did no work and is sent
# again, at most this many times, within the call's deadline.
REFUSED_STREAM_RETRIES = 3
# Reconnect to a restarted next tier within about a second, not after gRPC's default backoff of up to 2 minutes.
MAX_RECONNECT_BACKOFF_MS = 1_000
# What a hop keeps of its caller's remaining time for itself when it forwards: enough to answer (degraded if need
# be) before the caller gives up. A share of the budget, bounded to [MIN, MAX] seconds.
DEADLINE_MARGIN_SHARE, DEADLINE_MARGIN_MIN_S, DEADLINE_MARGIN_MAX_S = 0.1, 0.02, 0.5
# What a failed call to the next tier means for the caller: the next tier being unreachable or slow is retryable;
# the next tier refusing our request means the deployment itself is inconsistent (e.g. tiers from two exports).
_DOWNSTREAM = {
    grpc.StatusCode.UNAVAILABLE: "UNAVAILABLE",
    grpc.StatusCode.DEADLINE_EXCEEDED: "UNAVAILABLE",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "UNAVAILABLE",
    grpc.StatusCode.INVALID_ARGUMENT: "FAILED_PRECONDITION",
    grpc.StatusCode.FAILED_PRECONDITION: "FAILED_PRECONDITION",
}


def service_config() -> dict:
    """The channel's service config: the retry policy (not for ``InferStream``, see ``STREAM_METHOD_CONFIG``),
    ``round_robin`` over every address the target resolves to (replicas), and client-side health checking on
    ``REPLICA_HEALTH_SERVICE``.

    Round robin picks a READY connection per call, so a retry of UNAVAILABLE lands on another replica once the failed
    one's connection is down. Health checking keeps calls off a replica that is loading or draining; it watches the
    replica's own readiness, not its next tier's (see ``common.serving.health``), so when every replica's next tier is
    down, calls still reach a replica, which answers with its own exit. A server without a health service (a plain
    proxy) answers UNIMPLEMENTED and gRPC then treats it as healthy.
    """
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": REPLICA_HEALTH_SERVICE},
        "methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": RETRY_POLICY}, *STREAM_METHOD_CONFIG],
    }


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    """Options of a channel to a tier: message limits, the service config (retries, round robin, health checks),
    keepalive and a short reconnect backoff."""
    config = service_config()
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


def forward_timeout(deadline: float | None, cap_s: float, now: float) -> float:
    """Seconds the next hop may take: the caller's remaining budget less a margin for our own answer, at most
    ``cap_s``; 0 or less means there is no time left to forward at all."""
    if deadline is None:
        return cap_s
    remaining = deadline - now
    margin = min(DEADLINE_MARGIN_MAX_S, max(DEADLINE_MARGIN_MIN_S, DEADLINE_MARGIN_SHARE * remaining))
    return min(cap_s, remaining - margin)


class NextTierClient:
    """The ``Forward`` function of a tier whose next tier is a gRPC server at ``target``.

    Each call's deadline is the batch's remaining budget less a margin (``forward_timeout``), at most ``timeout_s``;
    UNAVAILABLE is retried by gRPC per ``RETRY_POLICY``. A batch with no time left is not sent at all. ``wire`` is
    the codec of the tensors sent on this link; ``link``, when given, is an emulated link whose delay for the actual
    request and reply sizes is slept after each call (see ``common.wire.link``).
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
        self._infer_stream = self.channel.unary_stream(f"/{SERVICE_NAME}/InferStream", request_serializer=None,
                                                       response_deserializer=pb.InferReply.FromString)
        self.reachable = True  # set by a health watcher; False = fail at once without trying (circuit open)

    def _timeout(self, batch: Batch) -> float:
        """Seconds the call for ``batch`` may take; ``DownstreamError`` (UNAVAILABLE) when it must not be made at all:
        the next tier is known to be unreachable, or the batch has no time left."""
        if not self.reachable:
            raise DownstreamError(f"next tier {self.target} is unreachable (health check); not forwarding",
                                  "UNAVAILABLE")
        timeout = forward_timeout(batch.deadline, self.timeout_s, time.monotonic())
        if timeout <= 0:
            raise DownstreamError(f"no time left to forward to {self.target}: the deadline has run out",
                                  "UNAVAILABLE")
        return timeout

    def _failure(self, e: Exception) -> DownstreamError:
        """What a failed call means to the runtime (see ``_DOWNSTREAM``)."""
        if isinstance(e, grpc.RpcError):
            return DownstreamError(f"next tier {self.target} failed: {e.code().name}: {e.details()}",
                                   _DOWNSTREAM.get(e.code(), "INTERNAL"))
        # ValueError "Cannot invoke RPC on closed channel!": this tier is shutting down
        return DownstreamError(f"the channel to next tier {self.target} is closed (shutting down)", "UNAVAILABLE")

    def __call__(self, batch: Batch) -> Forwarded:
        self._timeout(batch)  # refuse before paying for encoding
        request, encode_ms = messages.encode_request_timed(batch, self.wire)
        for attempt in range(REFUSED_STREAM_RETRIES + 1):
            try:
                # Fail fast (no wait_for_ready): a dead next tier must not hold a worker for the whole timeout.
                reply = self._infer(request, timeout=self._timeout(batch), metadata=self.metadata)
                break
            except grpc.RpcError as e:
                if attempt == REFUSED_STREAM_RETRIES or not _refused(e):  # refused unread: safe to send again
                    raise self._failure(e) from None
            except ValueError as e:
                raise self._failure(e) from None
        size = len(request)
        link_ms = emulate_link(self.link, size, reply.ByteSize())
        return Forwarded(messages.answer_from_reply(reply), size, encode_ms, link_ms)

    def stream(self, batch: Batch) -> Iterator[Forwarded]:
        """The ``ForwardStream`` over ``InferStream``: one ``Forwarded`` per reply of the next tier, as it arrives.

        The deadline covers the whole stream; a failure at any point raises ``DownstreamError`` (after the parts
        already yielded). Abandoning the iteration cancels the call. With an emulated link each reply is held back
        until it would have arrived (``StreamLinkClock``), timed from when it really arrived: a reader thread takes
        the replies off the call meanwhile."""
        self._timeout(batch)  # refuse before paying for encoding and the uplink
        request, encode_ms = messages.encode_request_timed(batch, self.wire)
        size = len(request)
        clock = StreamLinkClock(self.link)
        up_ms = clock.send(size)
        for attempt in range(REFUSED_STREAM_RETRIES + 1):
            timeout = self._timeout(batch)  # what is left after the uplink (and any refused attempt)
            try:
                call = self._infer_stream(request, timeout=timeout, metadata=self.metadata)
            except ValueError as e:
                raise self._failure(e) from None
            answered = False
            try:
                replies = _timed_replies(call) if self.link is not None else ((r, 0.0) for r in call)
                for k, (reply, received_at) in enumerate(replies):
                    answered = True
                    link_ms = clock.receive(reply.ByteSize(), received_at) + (up_ms if k == 0 else 0.0)
                    yield Forwarded(messages.answer_from_reply(reply), size if k == 0 else 0,
                                    encode_ms if k == 0 else 0.0, link_ms)
                return
            except grpc.RpcError as e:
                if answered or attempt == REFUSED_STREAM_RETRIES or not _refused(e):
                    raise self._failure(e) from None
            finally:
                call.cancel()  # no-op once the stream has ended

    def describe(self) -> pb.TierDescription:
        """The next tier's ``Describe`` answer; waits (up to the timeout) for it to come up."""
        try:
            return self.stub.Describe(pb.DescribeRequest(), timeout=self.timeout_s, wait_for_ready=True,
                                      metadata=self.metadata)
        except grpc.RpcError as e:
            raise DownstreamError(f"{self.target} did not answer Describe: {e.code().name}: {e.details()}") from None

    def close(self) -> None:
        self.channel.close()


def _refused(e: grpc.RpcError) -> bool:
    """Whether the call failed because the server refused its stream unread (RST_STREAM with REFUSED_STREAM, code
    7): safe to send again."""
    return e.code() == grpc.StatusCode.UNAVAILABLE and "error code 7" in (e.details() or "")


def _timed_replies(call) -> Iterator[tuple[pb.InferReply, float]]:
    """``(reply, time.monotonic() it was received)`` for each reply of a streaming ``call``, read by a thread so that
    a reply arriving while the caller still sleeps out an earlier one's emulated link is timed when it arrived."""
    box: queue.SimpleQueue = queue.SimpleQueue()
    end = object()

    def read() -> None:
        try:
            for reply in call:
                box.put((reply, time.monotonic()))
            box.put(end)
        except BaseException as e:  # handed to the consumer, raised there
            box.put(e)

    threading.Thread(target=read, name="stream-reader", daemon=True).start()
    while (item := box.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


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
