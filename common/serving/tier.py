"""The one entry point every tier process shares: build the tier from its flags and bundle, then serve it.

``python -m device|edge|cloud`` call ``main`` with their tier name; what differs between tiers is in the bundle
(the device's segment normalises raw uint8 images; the cloud's has no next tier), not in this code. The lifecycle is
split into steps that can be read and tested apart:

1. ``plan_tier``: flags and manifest checked against each other (cheap: no weights, no sockets);
2. ``Tier.open``: the server is built and started at once, reporting NOT_SERVING (Infer answers UNAVAILABLE);
3. ``Tier.load``: weights, gate and next-tier client; health turns SERVING (once the next tier is, if any);
4. ``Tier.drain``: NOT_SERVING, in-flight requests get ``--grace`` seconds, then everything is closed.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from common.cli import address, non_negative_float, positive_float, positive_int, target
from common.cli import port as port_number
from common.errors import ConfigError
from common.model.bundle import Manifest, TierBundle, bundle_folder, load_tier_bundle, read_manifest
from common.model.gates import scalar_params
from common.plugins import add_plugin_arg, use_plugins
from common.serving import host
from common.serving.batching import DynamicBatcher
from common.serving.client import NextTierClient
from common.serving.health import SERVING, UNREACHABLE, NextTierWatcher, TierHealth
from common.serving.metrics import JsonFormatter, TierMetrics
from common.serving.options import message_limit
from common.serving.runtime import ON_DOWNSTREAM_FAILURE, TierRuntime, TierSpec
from common.serving.security import Security, add_security_args, security_from_args
from common.serving.server import HEALTH_SERVICES, TierServicer, create_server, describe_tier
from common.wire.codecs import WireCodec, add_codec_args, wire_from_args
from common.wire.link import LinkModel, parse_link

log = logging.getLogger("splitexit.tier")


def get_args_parser(tier: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {tier}", description=f"Serve the {tier} tier of a SplitExit model.")
    g = parser.add_argument_group("model and chain")
    g.add_argument("--bundle", type=Path, required=True, help=f"the {tier} bundle folder (or the export root)")
    g.add_argument("--listen", type=address, default="127.0.0.1:50051", help="HOST:PORT to listen on (port 0 = any)")
    g.add_argument("--next", type=target, default=None,
                   help="the next tier (not for the last tier): HOST:PORT, or its replicas as a comma-separated list "
                        "of IP:PORT, an ipv4:/ipv6: list or dns:///NAME:PORT (calls are spread round robin)")
    g.add_argument("--policy", default=None,
                   help="use another exit policy stored in the bundle (e.g. mlp, cost, ensemble)")
    g.add_argument("--gate", default=None, help="override the gate of every early exit of this tier: confidence:T, "
                                                "entropy:T, margin:T, always or never")
    add_plugin_arg(g)

    g = parser.add_argument_group("batching and resources")
    g.add_argument("--max-batch", type=positive_int, default=512, help="largest batch a request may carry")
    g.add_argument("--max-queue-delay-ms", type=non_negative_float, default=0.0,
                   help="dynamic batching: wait up to this long to coalesce concurrent requests into one batch of "
                        "at most --max-batch samples (default 0 = off)")
    g.add_argument("--batch-workers", type=positive_int, default=2,
                   help="with dynamic batching: merged batches in flight at once (default 2)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    g.add_argument("--workers", type=positive_int, default=8, help="gRPC worker threads")
    g.add_argument("--max-streams-per-connection", type=positive_int, default=None,
                   help="concurrent streams one client connection may have (default: half of --workers, plus one "
                        "for the caller's health watch), so that no single connection can hold every worker")
    g.add_argument("--return-freed-memory", action="store_true",
                   help="give freed activation memory back to the OS after each request and keep one allocator "
                        "arena per thread (glibc's defaults; slower: requests page-fault their tensors in again)")

    g = parser.add_argument_group("next tier, deadlines and draining")
    g.add_argument("--timeout", type=positive_float, default=60.0,
                   help="seconds to wait for the next tier's answer at most (less when the caller's deadline is nearer)")
    g.add_argument("--on-downstream-failure", choices=ON_DOWNSTREAM_FAILURE, default="degrade",
                   help="when the next tier is unreachable or out of time: answer with this tier's exit, marked "
                        "degraded (default), or fail the request with UNAVAILABLE")
    g.add_argument("--forward-call", choices=("stream", "unary"), default="stream",
                   help="call the next tier by InferStream, relaying its answers as they arrive (default), or by "
                        "the unary Infer")
    g.add_argument("--grace", type=non_negative_float, default=5.0,
                   help="seconds to drain in-flight requests on SIGTERM")
    g.add_argument("--health-interval", type=positive_float, default=0.5,
                   help="seconds between checks of the next tier's health (default 0.5)")
    g.add_argument("--max-connection-age", type=positive_float, default=30.0,
                   help="close callers' connections after about this many seconds, so they re-resolve a dns:/// "
                        "target and new replicas of this tier get traffic (default 30)")
    g.add_argument("--max-connection-age-grace", type=non_negative_float, default=10.0,
                   help="seconds calls in flight on a connection closed for its age may still take (default 10)")
    g.add_argument("--ready-file", type=Path, default=None, help="write the bound HOST:PORT here once serving")

    add_link_args(parser.add_argument_group("outgoing link and compute profile"))

    g = parser.add_argument_group("observability")
    g.add_argument("--metrics-port", type=port_number, default=None,
                   help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (on --listen's host if not "
                        "127.0.0.1; 0 = any free port)")
    g.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON object per line, with request ids")
    g.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING"), default="INFO", help="DEBUG logs every request")

    add_security_args(parser.add_argument_group("security"))
    return parser


def add_link_args(p) -> None:
    """Communication against computation: the outgoing link's codec and emulated network, the compute profile."""
    add_codec_args(p)
    p.add_argument("--link", default=None, help="emulate the outgoing link as RATE,RTT, e.g. 10mbit,20ms")
    p.add_argument("--compute-scale", type=positive_float, default=1.0,
                   help="stretch this tier's compute to S x its measured time (emulate a slower machine)")


def configure_logging(tier: str, fmt: str, level: str) -> None:
    """Text lines for people, or one JSON object per line (with ``tier`` and, where known, ``request_id``)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        handler.addFilter(lambda record: setattr(record, "tier", tier) or True)
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tier} %(levelname)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])


@dataclass(frozen=True)
class TierPlan:
    """What a tier process will serve, decided from its flags and its manifest before anything heavy happens."""

    tier: str
    folder: Path
    manifest: Manifest
    args: argparse.Namespace
    security: Security
    wire: WireCodec  # the outgoing link's codec
    link: LinkModel | None  # the emulated outgoing link, if any
    max_message_bytes: int


def plan_tier(tier: str, args: argparse.Namespace) -> TierPlan:
    """Check the flags against the bundle's manifest; raise ``ConfigError`` on any disagreement."""
    security = security_from_args(args)
    wire = wire_from_args(args)  # None: the codec the bundle names
    link = parse_link(args.link) if args.link else None
    use_plugins(args.plugin)
    folder = bundle_folder(args.bundle, tier)
    m = read_manifest(folder)  # cheap: enough to size messages and to check the tier before serving
    if m.tier != tier:
        raise ConfigError(f"{folder} is the {m.tier} bundle, not the {tier} bundle")
    if m.is_last and args.next:
        raise ConfigError(f"the {tier} tier is the last tier and takes no --next")
    if not m.is_last and not args.next:
        raise ConfigError(f"the {tier} tier forwards declined samples and needs --next (HOST:PORT or its replicas)")
    limit = message_limit(m.input_bytes_per_sample, m.output_bytes_per_sample, args.max_batch)
    return TierPlan(tier, folder, m, args, security, m.link_codec(wire), link, limit)


@dataclass
class Tier:
    """A tier process's serving parts and its lifecycle (see the module docstring)."""

    plan: TierPlan
    server: grpc.Server
    port: int
    servicer: TierServicer
    health: TierHealth
    metrics: TierMetrics
    forward: NextTierClient | None = None
    watcher: NextTierWatcher | None = None
    batcher: DynamicBatcher | None = None

    @classmethod
    def open(cls, plan: TierPlan) -> "Tier":
        """Build the server and start it: health answers (NOT_SERVING) and Infer answers UNAVAILABLE while loading."""
        args = plan.args
        metrics = TierMetrics(plan.tier)
        servicer = TierServicer(None, None, metrics)
        server, port, health_servicer = create_server(servicer, args.listen, args.workers, plan.max_message_bytes,
                                                      plan.security, args.max_connection_age,
                                                      args.max_connection_age_grace, args.max_streams_per_connection)
        health = TierHealth(health_servicer, HEALTH_SERVICES, has_next=not plan.manifest.is_last)
        server.start()
        return cls(plan, server, port, servicer, health, metrics)

    @property
    def address(self) -> str:
        return f"{self.plan.args.listen.rpartition(':')[0]}:{self.port}"

    def load(self, bundle: TierBundle | None = None) -> TierRuntime:
        """Load the weights (unless ``bundle`` is given), wire gate, batcher and next tier; start serving."""
        plan, args = self.plan, self.plan.args
        bundle = bundle or load_tier_bundle(plan.folder)
        gates = bundle.select_gates(args.gate, args.policy)
        policy, calibration = bundle.served_policy(args.policy, overridden=bool(args.gate))
        if args.next:
            self.forward = NextTierClient(args.next, timeout_s=args.timeout, max_message_bytes=plan.max_message_bytes,
                                          wire=plan.wire, link=plan.link, security=plan.security)
        runtime = TierRuntime(TierSpec.from_manifest(bundle.manifest, args.max_batch), bundle.segment, gates,
                              self.forward, compute_scale=args.compute_scale,
                              on_downstream_failure=args.on_downstream_failure,
                              forward_stream=self.forward.stream if self.forward and args.forward_call == "stream"
                              else None)
        self.servicer.description = describe_tier(bundle.manifest, runtime.gates, args.next or "", policy, calibration,
                                                  args.max_batch, plan.max_message_bytes)
        kind = "/".join(g.kind for g in runtime.gates)
        params = [scalar_params(g) for g in runtime.gates]
        if args.max_queue_delay_ms > 0:
            self.batcher = DynamicBatcher(runtime, args.max_batch, args.max_queue_delay_ms / 1e3, args.batch_workers,
                                          on_batch=self.metrics.batch_ran)
        self.servicer.runtime = self.batcher or runtime
        self.health.update(loaded=True)
        if self.forward is not None:
            self.watcher = NextTierWatcher(self.forward.channel, self._on_next_tier, args.health_interval).start()
        if args.metrics_port is not None:
            host_name = args.listen.rpartition(":")[0]
            http = self.metrics.serve(args.metrics_port, host_name.strip("[]"))
            log.info("metrics on http://%s:%d/metrics", host_name, http.server_port)
        log.info("serving %s of model %s on %s (gate %s %s, next %s)", plan.tier, bundle.model_id, self.address, kind,
                 params, args.next)
        if args.ready_file:
            tmp = args.ready_file.with_suffix(".tmp")
            tmp.write_text(self.address)
            os.replace(tmp, args.ready_file)  # atomic: a reader never sees a half-written address
        return runtime

    def _on_next_tier(self, state: str) -> None:
        """Follow the next tier's health: ours is SERVING only while it is; while it cannot even be reached, answer
        degraded at once instead of paying connection attempts and retries on every request."""
        log.info("next tier %s is %s", self.forward.target, state)
        self.health.update(next_up=state == SERVING)
        self.forward.reachable = state != UNREACHABLE

    def drain(self) -> None:
        """NOT_SERVING, then let in-flight requests finish for up to ``--grace`` seconds."""
        grace = self.plan.args.grace
        log.info("stopping: NOT_SERVING, draining in-flight requests for up to %.1f s", grace)
        self.health.update(draining=True)
        self.server.stop(grace).wait()

    def close(self) -> None:
        """Stop everything this tier started (idempotent)."""
        self.server.stop(0)
        if self.batcher is not None:
            self.batcher.close()
        if self.watcher is not None:
            self.watcher.stop()
        if self.forward is not None:
            self.forward.close()


def serve(plan: TierPlan, stop: threading.Event) -> None:
    """Open, load and serve the tier of ``plan`` until ``stop`` is set, then drain and close it."""
    tier = Tier.open(plan)
    try:
        tier.load()
        stop.wait()
        tier.drain()
    finally:
        tier.close()


def main(tier: str, argv: list[str] | None = None) -> int:
    """Parse the flags, tune the process, and serve ``tier`` until SIGTERM or SIGINT."""
    args = get_args_parser(tier).parse_args(argv)
    host.die_with_parent()
    plan = plan_tier(tier, args)
    configure_logging(tier, args.log_format, args.log_level)
    if not args.return_freed_memory and not host.keep_freed_memory():
        log.info("could not tune the allocator (not glibc): freed memory goes back to the OS")
    if args.threads:
        torch.set_num_threads(args.threads)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # installed before serving: an early SIGTERM still drains
        signal.signal(sig, lambda *_: stop.set())
    serve(plan, stop)
    return 0
