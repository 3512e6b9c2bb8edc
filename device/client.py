"""The application side of the device: stream a data set to a running device tier and write the report.

``python -m device.client --target HOST:PORT --data SPEC --batch-size N --report FILE [--bundle DIR [--gate T=S]]``

Images are sent as the raw uint8 tensors a camera would give. With ``--bundle`` the same batches also run through
the in-process chain of that bundle (with the same ``--gate`` overrides the tiers were started with), and the report
says how many predictions differ between the two.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.cli import add_run_args, address, emit_report, run, tier_gates
from common.emulation.feed import feed_and_report
from common.model.gates import Gate
from common.emulation.chain import evaluate_in_process
from common.emulation.report import compare
from common.serving.client import NextTierClient
from common.plugins import use_plugins
from common.serving.security import Security, add_security_args, security_from_args
from common.wire.codecs import WireCodec, add_codec_args, wire_from_args


def run_client(target: str, images, labels, batch_size: int, bundle: Path | None = None,
               gates: dict[str, Gate] | None = None, timeout_s: float = 120.0, policy: str | None = None,
               wires: dict[str, WireCodec] | None = None, security: Security | None = None,
               streamed: bool = True) -> dict:
    """Feed ``images`` to the device tier at ``target``; compare with the in-process chain when ``bundle`` is given.

    ``streamed`` (default) sends each request by ``InferStream`` and records when each sample's answer arrived;
    otherwise by the unary ``Infer``. ``wires`` (tier -> codec of its outgoing link) must name the codecs the tiers were started with, so that the
    in-process chain sees the same decoded tensors."""
    client = NextTierClient(target, timeout_s=timeout_s, security=security)
    try:
        info = client.describe()
        report, records = feed_and_report(client, images, labels, info.model_id, batch_size, list(info.tiers),
                                          info.full_network_flops, run_id="client",
                                          forward_stream=client.stream if streamed else None)
    finally:
        client.close()
    report["model_id"] = info.model_id
    report["calibration"] = {"policy": info.policy, **json.loads(info.calibration or "{}")}
    if bundle is not None:
        ref_report, ref_records = evaluate_in_process(bundle, images, labels, batch_size, gates, policy, wires)
        compare(report, records, ref_records, ref_report)
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device.client", description=__doc__.splitlines()[0])
    p.add_argument("--target", type=address, required=True, help="HOST:PORT of the device tier")
    p.add_argument("--bundle", type=Path, default=None, help="bundle root for the in-process comparison")
    add_run_args(p, gate_help="TIER=SPEC gate the tiers were started with, for the in-process comparison")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply")
    p.add_argument("--unary", action="store_true",
                   help="one reply per request (Infer) instead of answers streamed as the tiers decide them")
    add_codec_args(p)  # for the in-process comparison: the codec every tier was started with
    add_security_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from common.data.datasets import load  # the data-spec readers live with the training code

    args = get_args_parser().parse_args(argv)
    use_plugins(args.plugin)
    gates = tier_gates(args.gate)
    data = load(args.data, args.split, limit=args.limit)
    wire = wire_from_args(args)  # None: the tiers use their bundles' codecs
    wires = {t: wire for t in ("device", "edge")} if wire else None
    report = run_client(args.target, data.images, data.labels, args.batch_size, args.bundle, gates, args.timeout,
                        args.policy, wires=wires, security=security_from_args(args), streamed=not args.unary)
    emit_report(report, args)
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
