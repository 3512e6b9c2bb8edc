"""The embedded demo: train on synthetic data, export three tier bundles, serve them as three processes, report.

``python -m scripts.demo [--out runs/demo] [--config FILE.toml]`` (what ``make demo`` runs). Writes
``OUT/train/`` (checkpoint, config, history), ``OUT/bundle/{device,edge,cloud}``, ``OUT/report.json`` and the tiers'
logs in ``OUT/logs/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from common.cli import positive_int, run
from common.config import add_config_args, resolve_config
from common.emulation.report import format_summary, write_report
from device.client import run_client
from common.emulation.deployment import LocalDeployment
from training.config import TrainConfig
from common.data.datasets import load
from training.export import export
from training.train import train


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--config", type=Path, default=None, help="TOML file with training keys")
    p.add_argument("--batch-size-serve", type=positive_int, default=64, help="client batch size")
    add_config_args(p, TrainConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = resolve_config(TrainConfig, args.config, args)
    if cfg.target_accuracy is None and cfg.target_drop is None and cfg.budget_flops is None:
        cfg = dataclasses.replace(cfg, target_drop=1.0)  # the demo's promise: within 1 point of the final exit
    t0 = time.perf_counter()
    print(f"== 1/3 training on {cfg.data} ({cfg.mode}, {cfg.epochs} epochs, width {cfg.width}); policies "
          f"calibrated to within {cfg.target_drop} point of the final exit", flush=True)
    train(cfg, args.out / "train")
    print("== 2/3 exporting per-tier bundles", flush=True)
    bundle = args.out / "bundle"
    for folder in export(args.out / "train" / "checkpoint.safetensors", bundle):
        print(f"   {folder}")
    print("== 3/3 serving device, edge and cloud as three processes; streaming the test split", flush=True)
    test = load(cfg.data, "test", val_fraction=cfg.val_fraction, seed=cfg.seed)
    with LocalDeployment(bundle, log_dir=args.out / "logs") as deployment:
        print("   " + ", ".join(f"{t} on {a}" for t, a in deployment.addresses.items()), flush=True)
        report = run_client(deployment.device_address, test.images, test.labels, args.batch_size_serve, bundle)
    report["data"] = cfg.data
    write_report(report, args.out / "report.json")
    print(format_summary(report))
    print(f"report: {args.out / 'report.json'}   (total {time.perf_counter() - t0:.0f} s)")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
