"""The server side of the ``Tier`` service: a servicer adapting the tier runtime, ``Describe``, ``create_server``.

Servicers only adapt: they hand the received request to ``common.serving.handling``, map ``RequestError``s to status
codes and encode the answer. The server is built here and started by the caller.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from common.errors import RequestError, quote
from common.model.bundle import Manifest
from common.model.gates import Gate, scalar_params
from common.serving.handling import answer_request, answer_stream
from common.serving.health import REPLICA_HEALTH_SERVICE
from common.serving.metrics import TierMetrics
from common.serving.options import DEFAULT_MAX_MESSAGE_BYTES, NO_DEADLINE_S, SERVICE_NAME, server_options
from common.serving.runtime import MAX_REQUEST_ID, TierRuntime
from common.serving.security import Security
from common.wire import codecs, messages
from common.wire.batch import Answer, merge_answers
from common.wire.tensors import DEFAULT_LIMITS, TensorLimits
from proto import splitexit_pb2 as pb
from proto import splitexit_pb2_grpc as pb_grpc

log = logging.getLogger("splitexit.server")
HEALTH_SERVICES = ("", SERVICE_NAME)  # the whole server and the Tier service report the same status
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
MAX_CALLS_PER_WORKER = 4

_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}

MAX_STATUS_MESSAGE = 512  # a status message travels in a header: keep it far below clients' metadata limits (8 KiB)


def _bounded(message: object) -> str:
    """A status or log message on one line of at most ``MAX_STATUS_MESSAGE`` characters. Caller strings inside are
    already quoted (``common.errors.quote``); this is the backstop for everything else."""
    text = str(message).replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= MAX_STATUS_MESSAGE else text[:MAX_STATUS_MESSAGE] + "..."


def _deadline(context: grpc.ServicerContext) -> float | None:
    """When the caller needs the answer (``time.monotonic()``), or None when it set no deadline."""
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None and remaining < NO_DEADLINE_S else None


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
        try:
            answer = answer_request(self.runtime, received, _deadline(context))
        except Exception as e:
            self._refuse(context, received.message, e, t0)
        self._answered(received, answer, t0)
        return messages.reply_from_answer(answer)

    def InferStream(self, received: messages.Received, context: grpc.ServicerContext):
        """``Infer`` with the answers streamed as the tiers decide them (``handling.answer_stream``). The deadline
        covers the whole stream; an error after some replies ends the stream with its status code."""
        if self.runtime is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the tier is still loading its model")
        t0 = time.perf_counter()
        request, parts = received.message, []
        try:
            for part in answer_stream(self.runtime, received, _deadline(context)):
                parts.append(part)
                yield messages.reply_from_answer(part)
            answer = merge_answers(request.request_id, list(request.sample_ids), parts)
        except Exception as e:
            self._refuse(context, request, e, t0)
        self._answered(received, answer, t0, streamed=True)

    def _refuse(self, context: grpc.ServicerContext, request: pb.InferRequest, error: Exception, t0: float):
        """End the call for ``error`` (call it from the ``except`` clause): a refused request gets its status code
        and one WARNING line; anything else is a bug, INTERNAL with the traceback logged, never gRPC's bare UNKNOWN.
        Caller strings are quoted and every message bounded (``_bounded``)."""
        rid = quote(request.request_id)  # the caller's string, escaped and bounded for log messages
        raw_id = request.request_id[:MAX_REQUEST_ID]  # JSON log fields escape it themselves
        if isinstance(error, RequestError):
            code = _CODES.get(error.code, grpc.StatusCode.INTERNAL)
            self._failed(code, t0)
            log.warning("request %s refused: %s: %s", rid, code.name, _bounded(error),
                        extra={"request_id": raw_id, "code": code.name})
            context.abort(code, _bounded(error))
        self._failed(grpc.StatusCode.INTERNAL, t0)
        log.exception("request %s failed", rid, extra={"request_id": raw_id})
        context.abort(grpc.StatusCode.INTERNAL, _bounded(f"{type(error).__name__}: {error}"))

    def _answered(self, received: messages.Received, answer: Answer, t0: float, streamed: bool = False) -> None:
        """Metrics and the log line of an answered request (degraded answers are a WARNING)."""
        seconds = time.perf_counter() - t0
        hop = answer.trace[0]
        if self.metrics is not None:
            self.metrics.observe(answer, received.nbytes, seconds)
            if not hasattr(self.runtime, "on_batch"):  # a DynamicBatcher reports the batches it merges itself
                self.metrics.batch_ran(len(answer.predictions))
        request_id = received.message.request_id
        fields = {"request_id": request_id[:MAX_REQUEST_ID], "samples": hop.samples_in,
                  "degraded": hop.samples_degraded, "ms": round(seconds * 1e3, 3), "streamed": streamed}
        if hop.samples_degraded:
            log.warning("request %s: %d samples answered degraded: %s", quote(request_id), hop.samples_degraded,
                        _bounded(hop.downstream_error), extra=fields)
        else:
            log.debug("request %s answered", quote(request_id), extra=fields)

    def _failed(self, code: grpc.StatusCode, t0: float) -> None:
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
        "InferStream": grpc.unary_stream_rpc_method_handler(
            servicer.InferStream, request_deserializer=messages.Received.parse,
            response_serializer=pb.InferReply.SerializeToString),
        "Describe": handler(servicer.Describe, pb.DescribeRequest, pb.TierDescription),
    })


def describe_tier(m: Manifest, gates: list[Gate], next_tier: str, policy: str = "", calibration: dict | None = None,
                  max_batch: int = 0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                  limits: TensorLimits = DEFAULT_LIMITS) -> pb.TierDescription:
    """The ``Describe`` answer for a tier, from its bundle manifest and the gates (and policy) it actually runs, one
    per exit, and what a caller must respect: batch and message limits, tensor limits, the codecs it decodes, its
    normalisation, whether requests carry the earlier exits' logits. ``gate_kind`` / ``gate_params`` describe the
    tier's last exit; ``exits`` describes every one."""
    norm = m.normalization or {}
    exits = [pb.ExitDescription(index=e, gate_kind=g.kind, gate_params=scalar_params(g), block_flops=b, head_flops=h)
             for e, g, b, h in zip(m.exits, gates, m.block_flops, m.exit_head_flops)]
    return pb.TierDescription(
        tier=m.tier, model_id=m.model_id, architecture=m.architecture, stages=m.stages, exit_index=m.exit_index,
        exit_head=json.dumps(m.exit_head), gate_kind=gates[-1].kind, gate_params=scalar_params(gates[-1]),
        input_shape=m.input_shape, input_dtype=m.input_dtype, next_tier=next_tier, segment_flops=m.segment_flops,
        head_flops=m.head_flops, full_network_flops=m.full_network_flops, class_names=m.class_names, tiers=m.tiers,
        policy=policy, calibration=json.dumps(calibration or {}, sort_keys=True),
        max_batch=max_batch, max_message_bytes=max_message_bytes,
        tensor_limits=pb.TensorLimits(max_rank=limits.max_rank, max_dim=limits.max_dim,
                                      max_elements=limits.max_elements, max_decoded_bytes=limits.max_decoded_bytes),
        codecs=codecs.ACCEPTED_CODECS, compressions=[c for c in codecs.COMPRESSIONS if c],
        input_mean=norm.get("mean", ()), input_std=norm.get("std", ()), exits=exits,
        history=m.history and m.tier_index > 0,
    )


def add_reflection(server: grpc.Server, services: tuple[str, ...]) -> None:
    """Server reflection as ``grpc.reflection.v1`` (what current tools ask for first) and ``v1alpha`` (older tools).

    grpcio-reflection 1.85 ships only the v1alpha module. The v1 protocol is the same messages under a new package
    name (identical field numbers), so v1 is served by the same servicer with the v1alpha message classes."""
    servicer = reflection.ReflectionServicer((*services, reflection.SERVICE_NAME, REFLECTION_V1))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    }),))


def create_server(
    servicer: TierServicer, address: str, max_workers: int = 8, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    security: Security | None = None, max_connection_age_s: float | None = None,
    max_connection_age_grace_s: float | None = None, max_streams_per_connection: int | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build (but do not start) a server for ``servicer`` on ``address``; return it, the bound port and its health.

    The standard health service starts as NOT_SERVING; the caller flips it to SERVING once the server is started.
    Server reflection is enabled so generic gRPC tools can list and call the service. ``security`` adds TLS (mutual
    with a CA) and the bearer-token check. ``max_connection_age_s`` closes connections that old, so callers
    re-resolve their target and spread over new replicas (see ``server_options``).

    A call holds one of the ``max_workers`` threads from its headers until its reply, waiting for its body included.
    So that one connection cannot hold them all (a peer opening calls and never sending their bodies), one
    connection gets at most ``max_streams_per_connection`` concurrent streams (default: half the workers, plus one
    for the caller's client-side health watch, a stream that lasts as long as the connection but holds no worker;
    HTTP/2 clients queue the rest), and the health service always finds a free worker.
    """
    security = security or Security()
    streams = max_streams_per_connection or max_workers // 2 + 1
    # Bound the calls admitted at once: past MAX_CALLS_PER_WORKER x workers, gRPC answers RESOURCE_EXHAUSTED instead
    # of buffering ever more large requests in memory. Well above the workers, because a slot is freed only after
    # the reply is sent: clients that each keep one call in flight must never see the limit.
    options = [*server_options(max_message_bytes, max_connection_age_s, max_connection_age_grace_s),
               ("grpc.max_concurrent_streams", streams)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                         maximum_concurrent_rpcs=MAX_CALLS_PER_WORKER * max_workers,
                         interceptors=security.interceptors())
    add_tier_service(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*HEALTH_SERVICES, REPLICA_HEALTH_SERVICE):  # until the tier says otherwise (TierHealth)
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    add_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
    try:
        credentials = security.server_credentials()
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises RuntimeError("Failed to bind ...") for a busy or invalid address
        raise OSError(f"could not listen on {address}: {e}") from None
    if port == 0:
        raise OSError(f"could not listen on {address}")
    return server, port, health_servicer


