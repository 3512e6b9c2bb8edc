"""Plan where to split: rank split points, link codecs and early exits for one link and compute profile.

``python -m scripts.plan --checkpoint FILE [--data SPEC] --link 10mbit,20ms --profile device=4,edge=2,cloud=1
--target-drop 1.0 [--out DIR] [--export DIR]``

For every candidate (see ``training.analysis.planner``) it predicts the mean and p95 latency of a request of
``--batch-size`` samples, the bytes each link carries per sample, and accuracy, FLOPs and exits on the evaluation
data, with thresholds calibrated on the checkpoint's validation split. Prints the ranked table (feasible
candidates - those whose thresholds keep the accuracy target - by predicted latency), writes ``DIR/plan.json``
with ``--out``, and with ``--export DIR`` writes the fastest feasible split as tier bundles whose manifests name
the chosen gates and link codecs, ready for ``python -m scripts.launch_local --bundle DIR``.

Compute times are measured in this process, so run it on the machine (or one like it) whose profile you give, with
the torch thread count the tiers will use (``--threads``).
"""
from __future__ import annotations

import argparse
import json
import time
import sys
from dataclasses import replace
from pathlib import Path

from common.serving import host

host.tune_environment()  # the tiers' settings, before torch loads: measured in process as they will be served

import torch  # noqa: E402

from common.cli import add_data_args, non_negative_float, positive_int, run
from common.emulation.cost_model import parse_profile
from common.errors import ConfigError
from common.model.gates import POLICY_NAMES
from common.wire.link import parse_link
from common.model.split import TIER_NAMES
from common.wire.codecs import COMPRESSIONS, ELEMENT_CODECS
from training import checkpoint
from training.calibrate import METHODS, to_gates
from training.analysis.planner import Candidate, Settings, export_split, plan, stored_family
from training.risk import BOUNDS


def format_table(rows: list[Candidate], top: int) -> str:
    """The ranked candidates as aligned text, best first."""
    lines = [f"{'#':>3} {'ok':>3} {'latency ms':>10} {'p95 ms':>8} {'bytes/sample':>22} {'accuracy':>8} "
             f"{'drop':>6} {'FLOPs':>6}  candidate"]
    for i, r in enumerate(rows[:top], start=1):
        p = r.predicted
        sent = "/".join(f"{v:,.0f}" for v in p.get("bytes_per_sample", {}).values()) or "0"
        lat = (f"{p['latency_ms_mean']:10.1f} {p['latency_ms_p95']:8.1f}" if "latency_ms_mean" in p
               else f"{'-':>10} {'-':>8}")
        acc = (f"{p['accuracy']:8.4f} {p['drop_points']:6.2f} {p['flops_fraction']:6.1%}" if "accuracy" in p
               else f"{'-':>8} {'-':>6} {'-':>6}")
        lines.append(f"{i:>3} {'yes' if r.feasible else 'no':>3} {lat} {sent:>22} {acc}  {r.name}")
    return "\n".join(lines)


def export_choice(model, meta: dict, row: Candidate, out: Path, policy: str, settings: dict) -> None:
    """Bundles of the chosen split of the checkpoint's ``model``: its gates, calibration record (with the planner's
    prediction and ``settings``) and link codecs in the manifests."""
    gates = to_gates(stored_family(meta, policy, len(model.exits)), row.thresholds)
    record = {**row.calibration, "planner": {"candidate": row.name, "predicted": row.predicted, "settings": settings}}
    export_split(model, meta, row.split, out, gates, policy if row.early_exits else "planner", record, list(row.codecs))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.plan", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.safetensors written by training.train")
    add_data_args(p, default=None, default_help="the checkpoint's own, its test partition")
    p.add_argument("--link", default=None, help="every link as RATE,RTT, e.g. 10mbit,20ms (default: loopback)")
    p.add_argument("--profile", default="", help="compute profile, TIER=S,... e.g. device=4,edge=2,cloud=1: each "
                   "tier's compute takes S x this machine's time (default 1 everywhere)")
    p.add_argument("--target-drop", type=non_negative_float, default=1.0,
                   help="accuracy points a candidate may lose against the float32 network (default 1.0)")
    p.add_argument("--policy", choices=POLICY_NAMES, default="confidence", help="exit policy (default confidence)")
    p.add_argument("--method", choices=METHODS, default="ltt", help="threshold calibration (default ltt)")
    p.add_argument("--delta", type=float, default=0.1, help="ltt: allowed probability that the promise fails")
    p.add_argument("--bound", choices=BOUNDS, default="wsr", help="ltt: concentration bound (default wsr)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per request (default 64)")
    p.add_argument("--codecs", default="float32,float16,int8",
                   help=f"element codecs to consider on each link, from {', '.join(ELEMENT_CODECS)}")
    p.add_argument("--compressions", default="none,zlib", help="compressions to consider: none, zlib or both")
    p.add_argument("--overhead-ms", type=non_negative_float, default=3.0,
                   help="per-call RPC cost beyond encoding and the link (default 3.0: gRPC on loopback here)")
    p.add_argument("--reps", type=positive_int, default=5, help="timings per batch size (median kept; default 5)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads, as the tiers will use")
    p.add_argument("--top", type=positive_int, default=15, help="rows of the table to print (default 15)")
    p.add_argument("--out", type=Path, default=None, help="write plan.json here")
    p.add_argument("--export", type=Path, default=None, help="write the chosen split's bundles here")
    return p


def main(argv: list[str] | None = None) -> int:
    from common.data.datasets import load

    args = get_args_parser().parse_args(argv)
    host.keep_freed_memory()  # time the segments with the allocator setting the tiers serve them with
    link = parse_link(args.link) if args.link else None
    compressions = tuple("" if c == "none" else c for c in filter(None, args.compressions.split(",")))
    if not compressions or set(compressions) - set(COMPRESSIONS):
        raise ConfigError(f"--compressions takes none, zlib or none,zlib, not {args.compressions!r}")
    if not 0 < args.delta < 1:
        raise ConfigError(f"--delta must lie in (0, 1), got {args.delta}")
    settings = Settings(link=link, scales=tuple(parse_profile(args.profile, TIER_NAMES)), batch_size=args.batch_size,
                        target_drop=args.target_drop, policy=args.policy, method=args.method, delta=args.delta,
                        bound=args.bound, codecs=tuple(filter(None, args.codecs.split(","))),
                        compressions=compressions, overhead_ms=args.overhead_ms, reps=args.reps)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = checkpoint.load(args.checkpoint)
    cfg = meta.get("config") or {}
    settings = replace(settings, seed=int(cfg.get("seed", 0)))
    data_spec = args.data or cfg.get("data")
    if not data_spec:
        raise ConfigError(f"{args.checkpoint} does not name its data: pass --data SPEC")
    val = load(cfg.get("data", data_spec), "val", val_fraction=cfg.get("val_fraction", 0.1),
               seed=int(cfg.get("seed", 0)), limit=cfg.get("limit_val"))
    test = load(data_spec, args.split, limit=args.limit)
    print(f"planning on {len(test)} {args.split} samples of {data_spec}; thresholds from {len(val)} validation "
          f"samples; link {link or 'loopback'}, profile {dict(zip(TIER_NAMES, settings.scales))}", flush=True)
    start = time.perf_counter()
    result = plan(model, meta, val, test, settings)
    rows = result["candidates"]
    result["settings"] = {"link": str(link) if link else None, "compute_scale": dict(zip(TIER_NAMES, settings.scales)),
                          "batch_size": settings.batch_size, "target_drop": settings.target_drop,
                          "policy": settings.policy, "method": settings.method, "delta": settings.delta,
                          "bound": settings.bound, "overhead_ms": settings.overhead_ms,
                          "threads": torch.get_num_threads(), "data": data_spec, "samples": len(test)}
    print(format_table(rows, args.top))
    chosen = result["chosen"]
    if chosen is None:
        print("no split keeps the accuracy target: deploy without a split")
    else:
        best = rows[chosen]
        print(f"chosen: #{chosen + 1} {best.name}")
        if chosen > 0:
            print(f"note: #1 ({rows[0].name}) is predicted faster than any split")
    doc = {"command": "python -m scripts.plan " + " ".join(sys.argv[1:] if argv is None else argv), **result,
           "candidates": [r.to_dict() for r in rows], "seconds": round(time.perf_counter() - start, 1)}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "plan.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out / 'plan.json'}")
    if args.export and chosen is not None:
        export_choice(model, meta, rows[chosen], args.export, args.policy, result["settings"])
        print(f"exported the chosen split to {args.export}: python -m scripts.launch_local --bundle {args.export}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
