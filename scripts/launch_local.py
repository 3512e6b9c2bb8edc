"""Launch cloud, edge and device as three OS processes on free loopback ports, run the device client, stop them.

``python -m scripts.launch_local --bundle DIR --data SPEC --report FILE [--batch-size N] [--limit N]
[--replicas edge=2,cloud=2]``

The tiers run as ``common.emulation.deployment.LocalDeployment`` starts them (free loopback ports, SERVING on the
health service before the client runs, SIGTERM with a grace period at the end - also on Ctrl-C or error). With
``--replicas`` a tier runs as several processes and the tier before it spreads its calls over them (see
docs/scale-out.md); the report's ``replicas`` says how many requests and samples each replica served.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import add_run_args, emit_report, positive_float, run, tier_counts, tier_gates
from common.emulation.deployment import LocalDeployment
from common.plugins import use_plugins
from common.wire.codecs import add_codec_args, link_args, wire_from_args
from common.wire.link import parse_link


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.launch_local", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle root written by training.export")
    add_run_args(p, gate_help="TIER=SPEC gate override for that tier, e.g. device=confidence:0.95")
    p.add_argument("--host", default="127.0.0.1", help="address the tiers listen on (default 127.0.0.1)")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the tiers' logs here")
    p.add_argument("--replicas", type=tier_counts, default={},
                   help="run tiers as several processes, e.g. edge=2,cloud=3 (the device stays one)")
    p.add_argument("--max-connection-age", type=positive_float, default=None,
                   help="passed to every tier: seconds before a tier closes a caller's connection (default: the "
                        "tiers' default)")
    p.add_argument("--unary", action="store_true",
                   help="one reply per request (Infer) instead of answers streamed as the tiers decide them")
    p.add_argument("--no-compare", action="store_true", help="skip the in-process comparison run")
    add_codec_args(p)
    p.add_argument("--link", default=None, help="emulate every tier's outgoing link as RATE,RTT (e.g. 10mbit,20ms)")
    return p


def main(argv: list[str] | None = None) -> int:
    from device.client import run_client
    from common.data.datasets import load

    args = get_args_parser().parse_args(argv)
    use_plugins(args.plugin)
    gates = tier_gates(args.gate)
    wire = wire_from_args(args)  # None: every tier uses its bundle's codec
    link = parse_link(args.link) if args.link else None
    deployment = LocalDeployment(args.bundle, host=args.host, gates=gates, policy=args.policy, log_dir=args.log_dir,
                                 replicas=args.replicas)
    # Every tier serves metrics on a free port: the report counts what each replica served from them.
    common = ["--metrics-port", "0"]
    if args.max_connection_age:
        common += ["--max-connection-age", str(args.max_connection_age)]
    deployment.extra_args = {t: common + (link_args(wire, link) if t != deployment.tiers[-1] else [])
                             for t in deployment.tiers}
    data = load(args.data, args.split, limit=args.limit)
    with deployment:
        print("tiers serving: " + ", ".join(f"{t} {','.join(a)}" for t, a in deployment.replica_addresses.items()),
              flush=True)
        report = run_client(deployment.device_address, data.images, data.labels, args.batch_size,
                            None if args.no_compare else args.bundle, gates, policy=args.policy,
                            wires={t: wire for t in deployment.tiers[:-1]} if wire else None,
                            streamed=not args.unary)
        report["replicas"] = deployment.replica_counts()
    for tier, served in report["replicas"].items():
        if len(served) > 1:
            print(f"{tier} replicas: " + ", ".join(f"{a} {c['requests']} requests/{c['samples']} samples"
                                                  for a, c in served.items()))
    emit_report(report, args)
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
