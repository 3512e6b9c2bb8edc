"""In-process evaluation of exported bundles: the tiers chained in one process, same runtime, same report.

``python -m training.evaluate --bundle DIR --data SPEC --report FILE [--batch-size N] [--limit N] [--gate T=SPEC]``
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import add_run_args, emit_report, run, tier_gates
from common.emulation.chain import evaluate_in_process
from common.plugins import use_plugins
from common.data.datasets import load


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle root written by training.export")
    add_run_args(p, gate_help="TIER=SPEC gate override, e.g. edge=entropy:0.2")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    use_plugins(args.plugin)
    gates = tier_gates(args.gate)
    data = load(args.data, args.split, limit=args.limit)
    report, _ = evaluate_in_process(args.bundle, data.images, data.labels, args.batch_size, gates, args.policy)
    emit_report(report, args)
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
