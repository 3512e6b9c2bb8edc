"""Does calibration keep its promise on data it has not seen? Naive against guaranteed, over many random splits.

``python -m training.analysis.calibration_study --bundle DIR --data SPEC --out DIR [--splits 100] [--target-drop 1.0]
[--delta 0.1] [--cal-fraction 0.5] [--path-fraction 0.5]``

One forward pass caches every exit's outputs on the data. Then, for each random split into a calibration part and an
evaluation part, every policy stored in the bundle is calibrated on the calibration part twice:

* ``naive`` - the best thresholds on the whole calibration part;
* ``ltt``   - candidates ordered on ``--path-fraction`` of the calibration part, certified on the rest at level delta
  (``training.calibrate.ltt_thresholds``).

Both are measured on the evaluation part: the accuracy drop against the final exit and the FLOPs fraction. The
study reports how often the promise (drop <= target) held, the realised drops and FLOPs, and what the guarantee
costs in FLOPs. Writes ``OUT/calibration_study.json`` and ``OUT/calibration_study.png``. The fitted gates (``mlp``,
``cost``, ``ensemble``) are the bundle's fitted ones; only their thresholds are calibrated here.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common.model.bundle import find_tier_folders, load_tier_bundle
from common.cli import add_data_args, positive_int, run
from common.errors import ConfigError
from common.emulation.chain import all_exit_logits, bundle_costs
from training.calibrate import ExitScores, Objective, bundle_families, ltt_thresholds, naive_thresholds
from common.data.datasets import load
from training.risk import BOUNDS

METHODS = ("naive", "ltt")


def policy_scores(bundle_root: Path, images: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, ExitScores], dict]:
    """``ExitScores`` of every policy the bundle can threshold, from one forward pass; plus facts about the run."""
    bundles = [load_tier_bundle(f) for f in find_tier_folders(bundle_root)]
    start = time.perf_counter()
    logits = all_exit_logits(bundles, images)
    forward_s = time.perf_counter() - start
    costs, full = bundle_costs(bundles)
    out = {kind: ExitScores.build(logits, labels, family, costs, full)
           for kind, family in bundle_families(bundles).items()}
    facts = {"model_id": bundles[0].model_id, "tiers": [b.tier for b in bundles], "forward_seconds": forward_s,
             "final_accuracy": float((logits[-1].argmax(1) == labels).double().mean())}
    return out, facts


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "p10": float(np.quantile(v, 0.1)), "p50": float(np.median(v)),
            "p90": float(np.quantile(v, 0.9)), "max": float(v.max())}


def study(scores: dict[str, ExitScores], objective: Objective, splits: int = 100, delta: float = 0.1,
          cal_fraction: float = 0.5, path_fraction: float = 0.5, bound: str = "wsr", seed: int = 0) -> dict:
    """Calibrate every policy on ``splits`` random calibration parts, naively and with LTT, and measure each on
    the matching evaluation part. Pure over cached scores; seeded."""
    if objective.kind != "drop":
        raise ConfigError("the study measures the accuracy-drop promise; give --target-drop")
    if not 0 < cal_fraction < 1 or not 0 < path_fraction < 1:
        raise ConfigError("--cal-fraction and --path-fraction must lie in (0, 1)")
    n = len(next(iter(scores.values())))
    n_cal = int(round(n * cal_fraction))
    n_path = int(round(n_cal * path_fraction))
    if min(n_path, n_cal - n_path, n - n_cal) < 1:
        raise ConfigError(f"{n} samples are too few to split into path, test and evaluation parts")
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n) for _ in range(splits)]
    result = {}
    for name, es in scores.items():
        runs = {m: {"drop": [], "flops_fraction": [], "held": []} for m in METHODS}
        for perm in perms:
            cal, evaluation = es.subset(perm[:n_cal]), es.subset(perm[n_cal:])
            chosen = {"naive": naive_thresholds(cal, objective)[0],
                      "ltt": ltt_thresholds(cal.subset(np.arange(n_path)), cal.subset(np.arange(n_path, n_cal)),
                                            objective, delta, bound)[0]}
            for method, thresholds in chosen.items():
                o = evaluation.outcome(thresholds)
                runs[method]["drop"].append(o["drop"])
                runs[method]["flops_fraction"].append(o["flops_fraction"])
                runs[method]["held"].append(o["drop"] <= objective.value + 1e-9)
        result[name] = {m: {"held_fraction": float(np.mean(r["held"])), "drop_points": _summary(r["drop"]),
                            "flops_fraction": _summary(r["flops_fraction"]),
                            "per_split": {"drop": r["drop"], "flops_fraction": r["flops_fraction"]}}
                        for m, r in runs.items()}
        result[name]["guarantee_flops_cost"] = (result[name]["ltt"]["flops_fraction"]["mean"]
                                                - result[name]["naive"]["flops_fraction"]["mean"])
    return {"samples": n, "calibration_samples": n_cal, "path_samples": n_path, "evaluation_samples": n - n_cal,
            "splits": splits, "target_drop": objective.value, "delta": delta, "bound": bound, "policies": result}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["policies"])
    fig, (ax_drop, ax_flops) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, name in enumerate(names):
        for j, (method, colour) in enumerate((("naive", "tab:red"), ("ltt", "tab:blue"))):
            r = result["policies"][name][method]["per_split"]
            pos = i + (j - 0.5) * 0.35
            for ax, key in ((ax_drop, "drop"), (ax_flops, "flops_fraction")):
                box = ax.boxplot([r[key]], positions=[pos], widths=0.3, patch_artist=True, showfliers=False)
                box["boxes"][0].set_facecolor(colour)
                box["boxes"][0].set_alpha(0.5)
    ax_drop.axhline(result["target_drop"], color="black", linestyle="--", label=f"promise: drop <= "
                                                                                   f"{result['target_drop']} pt")
    for ax, label in ((ax_drop, "accuracy drop on unseen data (points)"),
                      (ax_flops, "mean FLOPs per sample / whole network")):
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_drop.plot([], [], "s", color="tab:red", alpha=0.5, label="naive")
    ax_drop.plot([], [], "s", color="tab:blue", alpha=0.5, label=f"ltt (delta={result['delta']})")
    ax_drop.legend(loc="upper right")
    fig.suptitle(f"{result['splits']} random splits: calibrate on {result['calibration_samples']}, "
                 f"measure on {result['evaluation_samples']} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: dict) -> str:
    lines = [f"{'policy':>10}  {'method':>6}  {'promise held':>12}  {'drop p50/p90':>13}  {'FLOPs mean':>10}"]
    for name, r in result["policies"].items():
        for m in METHODS:
            d, f = r[m]["drop_points"], r[m]["flops_fraction"]
            lines.append(f"{name:>10}  {m:>6}  {r[m]['held_fraction']:>12.0%}  {d['p50']:>6.2f}/{d['p90']:<6.2f}  "
                         f"{f['mean']:>10.1%}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.analysis.calibration_study", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle root written by training.export")
    add_data_args(p)
    p.add_argument("--splits", type=positive_int, default=100, help="random calibration/evaluation splits")
    p.add_argument("--target-drop", type=float, default=1.0, help="promised accuracy drop, points (default 1)")
    p.add_argument("--delta", type=float, default=0.1, help="ltt: allowed failure probability (default 0.1)")
    p.add_argument("--bound", choices=BOUNDS, default="wsr", help="ltt: concentration bound (default wsr)")
    p.add_argument("--cal-fraction", type=float, default=0.5, help="share of the data calibrated on (default 0.5)")
    p.add_argument("--path-fraction", type=float, default=0.5,
                   help="ltt: share of the calibration part that orders the candidates (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random splits")
    p.add_argument("--out", type=Path, required=True, help="folder for calibration_study.json and .png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    objective = Objective.from_targets(target_drop=args.target_drop, method="ltt")
    if not 0 < args.delta < 1:
        raise ConfigError(f"--delta must lie in (0, 1), got {args.delta}")
    data = load(args.data, args.split, limit=args.limit)
    scores, facts = policy_scores(args.bundle, data.images, data.labels)
    start = time.perf_counter()
    result = study(scores, objective, args.splits, args.delta, args.cal_fraction, args.path_fraction, args.bound,
                   args.seed)
    result.update(facts, data=args.data, study_seconds=time.perf_counter() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration_study.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "calibration_study.png")
    print(format_table(result))
    print(f"wrote {args.out / 'calibration_study.json'} and {args.out / 'calibration_study.png'}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
