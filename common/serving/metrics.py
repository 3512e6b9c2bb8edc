"""Per-tier Prometheus metrics (``--metrics-port``) and structured JSON log lines carrying request ids.

``TierMetrics`` owns one registry per tier (so several tiers can live in one test process) and is fed by the
servicer after each call: requests by status code, samples by outcome (exited here, forwarded, degraded), bytes in
and out, latency, and the sizes of the batches the runtime ran (merged batches when dynamic batching is on).
"""
from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from common.wire.batch import Answer

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class TierMetrics:
    """The metrics of one tier, labelled with its name."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("splitexit_requests", "Infer calls answered, by gRPC status code", ["tier", "code"],
                                registry=r)
        self.samples = Counter("splitexit_samples", "samples handled, by outcome: exited here, forwarded, degraded",
                               ["tier", "outcome"], registry=r)
        self.bytes_in = Counter("splitexit_bytes_received", "serialized request bytes received", ["tier"], registry=r)
        self.bytes_out = Counter("splitexit_bytes_sent", "serialized request bytes sent to the next tier", ["tier"],
                                 registry=r)
        self.latency = Histogram("splitexit_request_seconds", "Infer latency at this tier, next tiers included",
                                 ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("splitexit_batch_samples", "samples per batch the runtime ran", ["tier"],
                               buckets=BATCH_BUCKETS, registry=r)

    def observe(self, answer: Answer, bytes_received: int, seconds: float) -> None:
        """Count a successful call from the answer's first hop (this tier)."""
        hop = answer.trace[0] if answer.trace else None
        t = self.tier
        self.requests.labels(t, "OK").inc()
        self.latency.labels(t).observe(seconds)
        self.bytes_in.labels(t).inc(bytes_received)
        if hop is not None:
            self.samples.labels(t, "exited").inc(hop.samples_exited)
            self.samples.labels(t, "degraded").inc(hop.samples_degraded)
            self.samples.labels(t, "forwarded").inc(hop.samples_in - hop.samples_exited - hop.samples_degraded)
            self.bytes_out.labels(t).inc(hop.bytes_sent)

    def error(self, code: str, seconds: float) -> None:
        self.requests.labels(self.tier, code).inc()
        self.latency.labels(self.tier).observe(seconds)

    def batch_ran(self, samples: int) -> None:
        self.batch.labels(self.tier).observe(samples)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose ``/metrics`` over HTTP on ``host:port`` (a daemon thread); return the server."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and ``request_id``/``tier`` when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in ("tier", "request_id", "code", "samples", "degraded", "ms", "streamed"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
