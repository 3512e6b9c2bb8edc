"""In-process evaluation of exported bundles: the tiers chained in one process, same runtime, same report.

``python -m training.evaluate --bundle DIR --data SPEC --report FILE [--batch-size N] [--limit N] [--gate T=SPEC]``
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import positive_int, run, tier_gates
from common.local import evaluate_in_process
from common.report import format_summary, write_report
from training.data import load


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle root written by training.export")
    p.add_argument("--data", default="synthetic:test", help="data spec (default: synthetic:test)")
    p.add_argument("--split", default="test", help="split when the spec names none (default: test)")
    p.add_argument("--report", type=Path, default=None, help="write the report JSON here")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate at most this many samples")
    p.add_argument("--gate", action="append", help="TIER=SPEC gate override, e.g. edge=entropy:0.2")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    gates = tier_gates(args.gate)
    data = load(args.data, args.split, limit=args.limit)
    report, _ = evaluate_in_process(args.bundle, data.images, data.labels, args.batch_size, gates)
    report["data"] = args.data
    print(format_summary(report))
    if args.report:
        write_report(report, args.report)
    return 0


if __name__ == "__main__":
    run(main)
