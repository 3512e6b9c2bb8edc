"""A tier's serving state on the standard gRPC health service, and a watcher on the next tier's health.

A tier reports SERVING only while all three hold: its model is loaded, it is not draining, and its next tier (if it
has one) reports SERVING. The last condition makes the health of the first tier say whether the whole chain can
give full answers; requests are still answered meanwhile (degraded, see ``common.serving.runtime``).
"""
from __future__ import annotations

import logging
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger("splitexit.health")


class TierHealth:
    """The three conditions of a tier's health, published to a ``grpc_health`` servicer on every change."""

    def __init__(self, servicer: health.HealthServicer, services: tuple[str, ...], has_next: bool) -> None:
        self.servicer = servicer
        self.services = services
        self.loaded = False
        self.draining = False
        self.next_up = not has_next
        self._lock = threading.Lock()
        self._publish()

    @property
    def serving(self) -> bool:
        return self.loaded and not self.draining and self.next_up

    def update(self, **conditions: bool) -> None:
        """Set some of ``loaded``, ``draining``, ``next_up`` and publish the resulting status."""
        with self._lock:
            before = self.serving
            for name, value in conditions.items():
                if name not in ("loaded", "draining", "next_up"):
                    raise ValueError(f"unknown health condition {name!r}")
                setattr(self, name, value)
            if self.serving != before:
                log.info("health: %s (loaded=%s draining=%s next tier up=%s)",
                         "SERVING" if self.serving else "NOT_SERVING", self.loaded, self.draining, self.next_up)
            self._publish()

    def _publish(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.services:
            self.servicer.set(name, status)


SERVING, NOT_SERVING, UNREACHABLE = "serving", "not_serving", "unreachable"


class NextTierWatcher:
    """Polls the next tier's overall health on ``channel`` every ``interval_s``; calls ``on_change(state)`` with
    ``SERVING``, ``NOT_SERVING`` (it answers but cannot serve fully, or is slow to answer) or ``UNREACHABLE``.

    Polling with ``Check`` (rather than a ``Watch`` stream) on the channel the tier forwards on also keeps that
    channel reconnecting to a restarted next tier, so normal answers resume within about one interval.
    """

    def __init__(self, channel: grpc.Channel, on_change, interval_s: float = 0.5) -> None:
        self.stub = health_pb2_grpc.HealthStub(channel)
        self.on_change = on_change
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="next-tier-health", daemon=True)
        self.state: str | None = None

    def start(self) -> "NextTierWatcher":
        self._thread.start()
        return self

    def check(self) -> str:
        try:
            reply = self.stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=max(1.0, self.interval_s))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return SERVING  # a next hop without a health service (a plain proxy, say) answered: it is up
            return UNREACHABLE if e.code() == grpc.StatusCode.UNAVAILABLE else NOT_SERVING
        return SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING

    def _run(self) -> None:
        while not self._stop.is_set():
            state = self.check()
            if state != self.state:
                self.state = state
                self.on_change(state)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
