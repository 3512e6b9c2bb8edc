"""The entry point every tier process shares: load a bundle, wire the next tier, serve until SIGTERM.

``python -m device|edge|cloud`` call ``main`` with their tier name; what differs between tiers is in the bundle
(the device's segment normalises raw uint8 images; the cloud's has no next tier), not in this code.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

from common import host

host.tune_environment()  # before torch loads its OpenMP runtime and allocator

import torch  # noqa: E402

from common.bundle import load_tier_bundle, read_manifest
from common.codec import DTYPES
from common.health import SERVING, UNREACHABLE, NextTierWatcher, TierHealth
from common.batching import DynamicBatcher
from common.cli import address, non_negative_float, positive_float, positive_int
from common.cli import port as port_number
from common.errors import ConfigError
from common.gates import parse_gate, scalar_params
from common.link import parse_link
from common.tensor_codecs import add_codec_args, wire_from_args, wire_from_dict
from common.plugins import add_plugin_arg, use_plugins
from common.rpc import HEALTH_SERVICES, NextTierClient, TierServicer, create_server, describe_tier, message_limit
from common.metrics import JsonFormatter, TierMetrics
from common.runtime import ON_DOWNSTREAM_FAILURE, TierRuntime
from common.security import add_security_args, security_from_args

log = logging.getLogger("splitexit.tier")
PARENT_PID_ENV = "SPLITEXIT_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """When started by a launcher (``SPLITEXIT_PARENT_PID`` set), get SIGTERM from the kernel if it dies (Linux).

    Done here, after exec, rather than in a ``preexec_fn``: forking a threaded launcher and running Python before
    exec is unsafe. If the launcher already died before this ran, exit at once.
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        raise SystemExit(f"launcher {parent} is gone; not starting")


def get_args_parser(tier: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {tier}", description=f"Serve the {tier} tier of a SplitExit model.")
    p.add_argument("--bundle", type=Path, required=True, help=f"the {tier} bundle folder (or the export root)")
    p.add_argument("--listen", type=address, default="127.0.0.1:50051", help="HOST:PORT to listen on (port 0 = any)")
    p.add_argument("--next", type=address, default=None, help="HOST:PORT of the next tier (not for the last tier)")
    p.add_argument("--policy", default=None, help="use another exit policy stored in the bundle (e.g. mlp, cost)")
    p.add_argument("--gate", default=None,
                   help="override the gate: confidence:T, entropy:T, margin:T, always or never")
    p.add_argument("--max-batch", type=positive_int, default=512, help="largest batch a request may carry")
    p.add_argument("--max-queue-delay-ms", type=non_negative_float, default=0.0,
                   help="dynamic batching: wait up to this long to coalesce concurrent requests into one batch of "
                        "at most --max-batch samples (default 0 = off)")
    p.add_argument("--batch-workers", type=positive_int, default=2,
                   help="with dynamic batching: merged batches in flight at once (default 2)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--workers", type=positive_int, default=8, help="gRPC worker threads")
    p.add_argument("--return-freed-memory", action="store_true",
                   help="give freed activation memory back to the OS after each request and keep one allocator "
                        "arena per thread (glibc's defaults; slower: requests page-fault their tensors in again)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the next tier's answer at most (less when the caller's deadline is nearer)")
    p.add_argument("--on-downstream-failure", choices=ON_DOWNSTREAM_FAILURE, default="degrade",
                   help="when the next tier is unreachable or out of time: answer with this tier's exit, marked "
                        "degraded (default), or fail the request with UNAVAILABLE")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to drain in-flight requests on SIGTERM")
    p.add_argument("--health-interval", type=positive_float, default=0.5,
                   help="seconds between checks of the next tier's health (default 0.5)")
    p.add_argument("--ready-file", type=Path, default=None, help="write the bound HOST:PORT here once serving")
    add_link_args(p)
    p.add_argument("--metrics-port", type=port_number, default=None,
                   help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (on --listen's host if not "
                        "127.0.0.1; 0 = any free port)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON object per line, with request ids")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING"), default="INFO",
                   help="DEBUG logs every request")
    add_security_args(p)
    add_plugin_arg(p)
    return p


def add_link_args(p: argparse.ArgumentParser) -> None:
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


def on_next_tier(state: str, health: TierHealth, forward: NextTierClient) -> None:
    """Follow the next tier's health: ours is SERVING only while it is; while it cannot even be reached, answer
    degraded at once instead of paying connection attempts and retries on every request."""
    log.info("next tier %s is %s", forward.target, state)
    health.update(next_up=state == SERVING)
    forward.reachable = state != UNREACHABLE


def main(tier: str, argv: list[str] | None = None) -> int:
    args = get_args_parser(tier).parse_args(argv)
    security = security_from_args(args)
    die_with_parent()
    wire = wire_from_args(args)
    link = parse_link(args.link) if args.link else None
    configure_logging(tier, args.log_format, args.log_level)
    if not args.return_freed_memory and not host.keep_freed_memory():
        log.info("could not tune the allocator (not glibc): freed memory goes back to the OS")
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.bundle / tier if (args.bundle / tier / "manifest.json").is_file() else args.bundle
    use_plugins(args.plugin)
    m = read_manifest(folder)  # cheap: enough to size messages and to check the tier before serving
    wire = wire or wire_from_dict(m.get("link"))
    if m["tier"] != tier:
        raise ConfigError(f"{folder} is the {m['tier']} bundle, not the {tier} bundle")
    is_last = m["tier_index"] == len(m["tiers"]) - 1
    if is_last and args.next:
        raise ConfigError(f"the {tier} tier is the last tier and takes no --next")
    if not is_last and not args.next:
        raise ConfigError(f"the {tier} tier forwards declined samples and needs --next HOST:PORT")
    itemsize_in = torch.empty((), dtype=DTYPES[m["input"]["dtype"]][0]).element_size()
    in_bytes = itemsize_in * math.prod(m["input"]["shape"])
    out_bytes = 4 * math.prod(m["output_shape"])
    limit = message_limit(in_bytes, out_bytes, args.max_batch)

    # Serve health from the start: NOT_SERVING while the weights load, and Infer answers UNAVAILABLE meanwhile.
    metrics = TierMetrics(tier)
    servicer = TierServicer(None, None, metrics)
    server, port, health_servicer = create_server(servicer, args.listen, args.workers, limit, security)
    health = TierHealth(health_servicer, HEALTH_SERVICES, has_next=not is_last)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # installed before serving: an early SIGTERM still drains
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    forward = watcher = batcher = None
    try:
        bundle = load_tier_bundle(folder)
        spec = bundle.tier_spec(max_batch=args.max_batch)
        gate = parse_gate(args.gate) if args.gate else bundle.policy_gate(args.policy) if args.policy else bundle.gate
        policy, calibration = bundle.served_policy(args.policy, overridden=bool(args.gate))
        forward = (NextTierClient(args.next, timeout_s=args.timeout, max_message_bytes=limit, wire=wire, link=link,
                                  security=security) if args.next else None)
        runtime = TierRuntime(spec, bundle.segment, gate, forward, compute_scale=args.compute_scale,
                              on_downstream_failure=args.on_downstream_failure)
        kind, g = runtime.gate.kind, scalar_params(runtime.gate)
        servicer.description = describe_tier(m, kind, g, args.next or "", policy, calibration)
        batcher = (DynamicBatcher(runtime, args.max_batch, args.max_queue_delay_ms / 1e3, args.batch_workers,
                                  on_batch=metrics.batch_ran) if args.max_queue_delay_ms > 0 else None)
        servicer.runtime = batcher or runtime
        health.update(loaded=True)
        if forward is not None:
            watcher = NextTierWatcher(forward.channel, lambda state: on_next_tier(state, health, forward),
                                      args.health_interval).start()
        bound = f"{args.listen.rpartition(':')[0]}:{port}"
        if args.metrics_port is not None:
            http = metrics.serve(args.metrics_port, args.listen.rpartition(":")[0].strip("[]"))
            log.info("metrics on http://%s:%d/metrics", args.listen.rpartition(":")[0], http.server_port)
        log.info("serving %s of model %s on %s (gate %s %s, next %s)", tier, spec.model_id, bound, kind, g,
                 args.next)
        if args.ready_file:
            tmp = args.ready_file.with_suffix(".tmp")
            tmp.write_text(bound)
            os.replace(tmp, args.ready_file)  # atomic: a reader never sees a half-written address

        stop.wait()
        log.info("stopping: NOT_SERVING, draining in-flight requests for up to %.1f s", args.grace)
        health.update(draining=True)
        server.stop(args.grace).wait()
    finally:
        server.stop(0)
        if batcher is not None:
            batcher.close()
        if watcher is not None:
            watcher.stop()
        if forward is not None:
            forward.close()
    return 0
