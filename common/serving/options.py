"""gRPC settings shared by every tier's server and channels: message limits and keepalive, set in one place."""
from __future__ import annotations

from proto import splitexit_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tier"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# Keepalive: a peer that vanished without closing the connection (a cut cable, a frozen host) is noticed within
# KEEPALIVE_TIME + KEEPALIVE_TIMEOUT instead of at the next request's deadline. Servers accept pings that often.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
NO_DEADLINE_S = 1e7  # gRPC reports "no deadline" as a remaining time of centuries


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


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_connection_age_s: float | None = None,
                   max_connection_age_grace_s: float | None = None) -> list[tuple[str, object]]:
    """Options of a tier's server: message limits, client keepalive pings at our channels' rate allowed, and, when
    given, a maximum connection age.

    A caller re-resolves a ``dns:///`` target only when a connection closes; closing every connection after
    ``max_connection_age_s`` (gRPC adds a random +-10% jitter) makes callers re-resolve, so replicas added behind a
    headless Service get traffic. In-flight calls get ``max_connection_age_grace_s`` to finish (default: unlimited).
    """
    age = []
    if max_connection_age_s is not None:
        age.append(("grpc.max_connection_age_ms", max(1, round(max_connection_age_s * 1e3))))
    if max_connection_age_grace_s is not None:
        age.append(("grpc.max_connection_age_grace_ms", round(max_connection_age_grace_s * 1e3)))
    return [
        *age,
        *grpc_options(max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        # SO_REUSEPORT off: a second tier started on a busy port must fail, not silently share its traffic.
        ("grpc.so_reuseport", 0),
    ]
