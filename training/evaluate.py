"""In-process evaluation of exported bundles: the tiers chained in one process, same runtime, same report.

``python -m training.evaluate --bundle DIR --data SPEC --report FILE [--batch-size N] [--limit N]``
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import positive_int, run
from common.feed import feed_and_report
from common.gates import parse_gate
from common.local import LocalLink, load_local_chain
from common.report import RequestRecord, format_summary, write_report
from training.data import load


def evaluate_in_process(bundle: Path, images, labels, batch_size: int, gate_specs: list[str] | None = None
                        ) -> tuple[dict, list[RequestRecord]]:
    """Report of the in-process chain over ``images``; ``gate_specs`` optionally override each tier's gate."""
    gates = [parse_gate(s) if s else None for s in gate_specs] if gate_specs else None
    first, bundles = load_local_chain(bundle, gates)
    m = bundles[0].manifest
    return feed_and_report(LocalLink(first), images, labels, m["model_id"], batch_size, m["tiers"],
                           m["flops"]["full_network"], run_id="in-process")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle root written by training.export")
    p.add_argument("--data", default="synthetic:test", help="data spec (default: synthetic:test)")
    p.add_argument("--split", default="test", help="split when the spec names none (default: test)")
    p.add_argument("--report", type=Path, default=None, help="write the report JSON here")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate at most this many samples")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    data = load(args.data, args.split, limit=args.limit)
    report, _ = evaluate_in_process(args.bundle, data.images, data.labels, args.batch_size)
    print(format_summary(report))
    if args.report:
        write_report(report, args.report)
    return 0


if __name__ == "__main__":
    run(main)
