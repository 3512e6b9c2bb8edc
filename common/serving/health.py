"""A tier's serving state on the standard gRPC health service, and a watcher on the next tier's health.

A tier reports SERVING only while all three hold: its model is loaded, it is not draining, and its next tier (if it
has one) reports SERVING. The last condition makes the health of the first tier say whether the whole chain can
give full answers; requests are still answered meanwhile (degraded, see ``common.serving.runtime``).

A second status, under ``REPLICA_HEALTH_SERVICE``, says only whether this process takes calls (loaded, not draining).
Callers balance over a tier's replicas with client-side health checking on it (``common.serving.client``): a replica
that is loading or draining gets no new calls, while one whose *next* tier is down still does - when the replicas
share that next tier (the usual case) they are all in that state, and the best answer left is their degraded one.
"""
from __future__ import annotations

import logging
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger("splitexit.health")

# The health service name under which a replica says "send me calls": loaded and not draining.
REPLICA_HEALTH_SERVICE = "splitexit.replica"


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
        def status(up: bool):
            return health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING

        for name in self.services:
            self.servicer.set(name, status(self.serving))
        self.servicer.set(REPLICA_HEALTH_SERVICE, status(self.loaded and not self.draining))


SERVING, NOT_SERVING, UNREACHABLE = "serving", "not_serving", "unreachable"


class NextTierWatcher:
    """Polls the next tier's overall health on ``channel`` every ``interval_s``; calls ``on_change(state)`` with
    ``SERVING``, ``NOT_SERVING`` (it answers but cannot serve fully, or is slow to answer) or ``UNREACHABLE``.

    Polling with ``Check`` (rather than a ``Watch`` stream) on the channel the tier forwards on also keeps that
    channel reconnecting to a restarted next tier, so normal answers resume within about one interval.

    With several replicas behind the channel, each ``Check`` goes to the next replica (round robin over those taking
    calls); the next tier counts as SERVING while at least one replica is, so a poll asks up to ``probes`` times and
    stops at the first SERVING. UNREACHABLE means no replica accepts calls at all (the channel fails at once).
    """

    def __init__(self, channel: grpc.Channel, on_change, interval_s: float = 0.5, probes: int = 3) -> None:
        self.stub = health_pb2_grpc.HealthStub(channel)
        self.on_change = on_change
        self.interval_s = interval_s
        self.probes = probes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="next-tier-health", daemon=True)
        self.state: str | None = None

    def start(self) -> "NextTierWatcher":
        self._thread.start()
        return self

    def check(self) -> str:
        """The best state of up to ``probes`` checks: SERVING if any replica asked says so."""
        states = []
        for _ in range(self.probes):
            states.append(self.check_once())
            if states[-1] == SERVING:
                break
        # One failed probe (a connection closing for its age, say) does not make a tier that answered unreachable.
        return next(s for s in (SERVING, NOT_SERVING, UNREACHABLE) if s in states)

    def check_once(self) -> str:
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
