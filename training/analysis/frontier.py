"""Accuracy against computation for every exit policy, from one cached forward pass over a data set.

``python -m training.analysis.frontier --bundle DIR --data SPEC --out DIR [--split test] [--limit N] [--points 41]
[--calibrate-on val]``

Runs the bundle's segments once over the data (no sample leaves early), keeps every exit's logits, and then sweeps
each thresholded policy (one threshold shared by the early exits; the stored ``mlp`` and ``ensemble`` gates included)
over its range, plus the bundle's own calibrated gates. With ``--calibrate-on val`` every policy is also swept twice
with per-exit thresholds set on the validation split: the way the seed projects do it, to desired accuracies from
0.5 to 1 (``per_exit`` in the JSON; dashed in the plot for ``confidence``, ``mlp`` and ``ensemble``), and priced at
every exchange rate between FLOPs and answers lost, the candidates calibration certifies (``priced``; dotted for
``confidence`` and ``ensemble``). With ``--probe-on train`` the frontier also has a ``probe`` policy: a gate
reading every statistic of the exits so far, fitted on that split (``training.analysis.gate_probe``), a reference
for how much any gate could gain over ``confidence`` on this model. Each segment's compute time is measured during
the pass, so every point also has a mean compute latency per sample (segments and exit heads on this machine,
batches of 500; links not included). Writes ``OUT/frontier.json`` and ``OUT/frontier.png``: accuracy against the mean FLOPs fraction and
against latency, one line per policy, the final exit's accuracy as a reference line, and two oracle gates that
read the labels (``oracles``: the least computation for the final exit's answers, and for the best accuracy the
exits allow) as bounds no policy can pass.

The ``cost`` policy's trade-off is its ``alpha``, fixed when its gates are fitted, so a threshold sweep does not
apply to it: the bundle's fitted cost gates are one point, and with ``--calibrate-on`` the cost gates are refitted
on the validation logits for a grid of ``alpha`` values (``--cost-alphas``) and each refit is measured here, which
draws the policy as a curve (``cost.curve`` in the JSON).

``at_drop`` in the JSON reads the frontier at 1, 2 and 5 points of accuracy drop: per policy, the least mean FLOPs
fraction among its measured points (any of its curves) within that drop of the final exit, and which point it is.
It picks points on the data being measured, so it is the frontier's reach, not a calibrated promise.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.model.bundle import find_tier_folders, load_tier_bundle
from common.cli import add_data_args, positive_int, run
from common.errors import ConfigError
from common.model.gates import ConstantGate, Gate, gate_to_dict
from common.emulation.chain import all_exit_logits, bundle_costs, exit_names, exit_seconds
from training.calibrate import (PRICES, ExitScores, Thresholdable, bundle_families, cascade, cascade_thresholds,
                                history_at, priced_thresholds, to_gates)
from training.analysis.gate_probe import probe_family
from training.policies import fit_cost_gates
from common.data.datasets import load, parse_spec


@dataclass(frozen=True)
class Cached:
    """One forward pass over a data set: every exit's logits, the labels, the cumulative FLOPs of leaving at each
    exit, the whole network's FLOPs, the tier names, and the cumulative compute time per sample up to each exit."""

    logits: list[torch.Tensor]
    labels: torch.Tensor
    costs: list[float]
    full: float
    tiers: list[str]
    ms_to_exit: list[float]

    def point(self, gates: list[Gate]) -> dict:
        """Accuracy, mean FLOPs fraction, mean compute latency per sample and exits per tier under ``gates``."""
        sim = cascade(self.logits, self.labels, gates, self.costs)
        n = len(self.labels)
        latency = sum(k * ms for k, ms in zip(sim["exit_counts"], self.ms_to_exit)) / n
        return {"accuracy": sim["accuracy"], "flops_fraction": sim["mean_cost"] / self.full,
                "compute_ms_per_sample": latency, "exits": dict(zip(self.tiers, sim["exit_counts"]))}


def oracles(cached: Cached) -> dict:
    """Two gates no policy can beat, as references for the policies' frontier (they read the labels):

    * ``agree_with_final``: every sample leaves at the first exit whose answer is the final exit's. Any policy
      that answers exactly like the whole network spends at least these FLOPs.
    * ``first_correct``: every sample leaves at the first exit that is right (samples no exit gets right leave at
      the first). The least computation any policy needs for this accuracy or more."""
    preds = torch.stack([lg.argmax(1) for lg in cached.logits])
    right = preds == cached.labels
    exit_of = {"agree_with_final": (preds == preds[-1]).int().argmax(0),
               "first_correct": torch.where(right.any(0), right.int().argmax(0), 0)}
    n, costs = len(cached.labels), torch.tensor(cached.costs, dtype=torch.float64)
    out = {}
    for name, taken in exit_of.items():
        counts = torch.bincount(taken, minlength=len(cached.logits)).tolist()
        out[name] = {"accuracy": float(right[taken, torch.arange(n)].double().mean()),
                     "flops_fraction": float(costs[taken].mean()) / cached.full,
                     "exits": dict(zip(cached.tiers, counts))}
    return out


def sweep(cached: Cached, family: list[Thresholdable], points: int = 41) -> list[dict]:
    """One point per threshold (shared by the early exits), at quantiles of their pooled scores, plus exit-none."""
    scores = np.concatenate([fam.score(history_at(cached.logits, k)) for k, fam in enumerate(family)])
    quantiles = np.unique(np.quantile(scores, np.linspace(0, 1, points)))
    out = []
    for q in quantiles:
        gates = [fam.make(float(q)) for fam in family]
        out.append({"parameter": gates[0].params()["threshold"], **cached.point(gates)})
    never = [ConstantGate(False)] * (len(cached.logits) - 1)
    out.append({"parameter": None, **cached.point(never)})
    return sorted(out, key=lambda p: p["flops_fraction"])


def per_exit_sweep(cached: Cached, family: list[Thresholdable], calib: ExitScores, points: int = 41) -> list[dict]:
    """Per-exit thresholds calibrated on ``calib`` (other data) to each desired accuracy of a grid from 0.5 to 1,
    measured on ``cached``: exit k takes the lowest threshold whose accepted calibration samples (among those earlier
    exits declined) reach the desired accuracy."""
    out = []
    for target in np.linspace(0.5, 1.0, points):
        gates = to_gates(family, cascade_thresholds(calib, float(target)))
        out.append({"parameter": round(float(target), 6), **cached.point(gates)})
    return sorted(out, key=lambda p: (p["flops_fraction"], p["parameter"]))


def priced_sweep(cached: Cached, family: list[Thresholdable], calib: ExitScores) -> list[dict]:
    """Per-exit thresholds priced on ``calib`` (other data) at every exchange rate of ``training.calibrate.PRICES``
    (the candidates calibration certifies), measured on ``cached``."""
    out = []
    for price in PRICES:
        gates = to_gates(family, priced_thresholds(calib, float(price)))
        out.append({"parameter": round(float(price), 6), **cached.point(gates)})
    return sorted(out, key=lambda p: (p["flops_fraction"], p["parameter"]))


COST_ALPHAS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
DROPS = (1.0, 2.0, 5.0)
CURVES = ("points", "per_exit", "priced", "curve")  # the measured point lists a policy may have in the JSON


def at_drop(policies: dict, final_accuracy: float, drops: tuple[float, ...] = DROPS) -> dict:
    """Per policy and drop D (points): the least FLOPs fraction among its measured points whose accuracy is within D
    points of ``final_accuracy``, with the curve and parameter of that point; None where no point is."""
    out = {}
    for name, policy in policies.items():
        pts = [(curve, p) for curve in CURVES for p in policy.get(curve, [])]
        out[name] = {}
        for d in drops:
            ok = [(c, p) for c, p in pts if p["accuracy"] >= final_accuracy - d / 100 - 1e-12]
            best = min(ok, key=lambda cp: (cp[1]["flops_fraction"], -cp[1]["accuracy"]), default=None)
            out[name][f"{d:g}"] = None if best is None else {
                "flops_fraction": best[1]["flops_fraction"], "accuracy": best[1]["accuracy"], "curve": best[0],
                "parameter": best[1]["parameter"]}
    return out


def cost_curve(cached: Cached, calib_logits: list[torch.Tensor], calib_labels: torch.Tensor,
               alphas: tuple[float, ...] = COST_ALPHAS) -> list[dict]:
    """The ``cost`` policy at each ``alpha``: gates fitted on the calibration logits, measured on ``cached``."""
    out = []
    for alpha in alphas:
        gates = fit_cost_gates(calib_logits, calib_labels, cached.costs, alpha, full_flops=cached.full)
        out.append({"parameter": alpha, **cached.point(gates)})
    return sorted(out, key=lambda p: (p["flops_fraction"], p["parameter"]))


def frontier(bundle_root: Path, images: torch.Tensor, labels: torch.Tensor, points: int = 41,
             calib: tuple[torch.Tensor, torch.Tensor] | None = None,
             cost_alphas: tuple[float, ...] = COST_ALPHAS,
             probe: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """The frontier of every thresholded policy and of the bundle's calibrated gates on ``images``.

    With ``calib`` (images and labels of other data, e.g. the validation split), every policy also gets a
    ``per_exit`` sweep: per-exit thresholds calibrated there to a range of desired accuracies, measured here; a
    ``priced`` sweep: the thresholds priced there at every exchange rate between FLOPs and answers lost (the
    candidates calibration certifies), measured here; and the ``cost`` policy a ``curve``: its gates refitted there
    for every alpha of ``cost_alphas``. With ``probe`` (images and labels of a third split, e.g. the training split),
    the ``probe`` gates are fitted there and swept like every policy.
    """
    bundles = [load_tier_bundle(f) for f in find_tier_folders(bundle_root)]
    tiers = exit_names(bundles)
    start = time.perf_counter()
    seconds: list[float] = []
    logits = all_exit_logits(bundles, images, seconds=seconds)
    forward_s = time.perf_counter() - start
    costs, full = bundle_costs(bundles)
    cached = Cached(logits, labels, costs, full, tiers,
                    list(np.cumsum([1000 * s / len(labels) for s in exit_seconds(bundles, seconds)])))
    calibrated = [g for b in bundles for g in b.early_gates]
    families = bundle_families(bundles)
    # The fitted cost gates are one point (their trade-off was fixed by alpha), not a sweep.
    cost_stored = families.pop("cost", None) is not None
    if probe is not None:
        families["probe"] = probe_family(all_exit_logits(bundles, probe[0]), probe[1])
    policies = {kind: {"points": sweep(cached, family, points)} for kind, family in families.items()}
    calib_logits = all_exit_logits(bundles, calib[0]) if calib is not None else None
    if calib_logits is not None:
        for kind, family in families.items():
            scores = ExitScores.build(calib_logits, calib[1], family, costs, full)
            policies[kind]["per_exit"] = per_exit_sweep(cached, family, scores, points)
            policies[kind]["priced"] = priced_sweep(cached, family, scores)
    if cost_stored:
        gates = [g for b in bundles for g in b.policy_gates("cost")]
        policies["cost"] = {"alpha": gates[0].alpha,
                            "points": [{"parameter": gates[0].alpha, **cached.point(gates)}]}
    if calib_logits is not None and cost_alphas:
        policies.setdefault("cost", {"alpha": None, "points": []})
        policies["cost"]["curve"] = cost_curve(cached, calib_logits, calib[1], cost_alphas)
    final_accuracy = float((logits[-1].argmax(1) == labels).double().mean())
    return {
        "samples": len(labels),
        "model_id": bundles[0].model_id,
        "final_accuracy": final_accuracy,
        "exit_accuracy": dict(zip(tiers, [float((lg.argmax(1) == labels).double().mean()) for lg in logits])),
        "exit_flops_fraction": dict(zip(tiers, [c / full for c in costs])),
        "policies": policies,
        "at_drop": at_drop(policies, final_accuracy),
        "calibrated": {"policy": bundles[0].manifest.policy or None,
                       "gates": dict(zip(tiers, [gate_to_dict(g) for g in calibrated])),
                       "calibration": bundles[0].calibration(), **cached.point(calibrated)},
        # Every policy the bundle stores, at its calibrated thresholds: what serving it with --policy gives here.
        "stored": {name: {"calibration": bundles[0].calibration(name),
                          **cached.point([g for b in bundles for g in b.policy_gates(name)])}
                   for name in bundles[0].manifest.policies},
        "oracles": oracles(cached),
        "compute_ms_to_exit": dict(zip(tiers, cached.ms_to_exit)),
        "calibration_samples": None if calib is None else len(calib[1]),
        "probe_samples": None if probe is None else len(probe[1]),
        "forward_seconds": forward_s,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw={"width_ratios": [4, 4, 2.6]})
    axes[1].sharey(axes[0])
    cal = result["calibrated"]
    for ax, key, xlabel in ((axes[0], "flops_fraction", "mean FLOPs per sample / whole network"),
                            (axes[1], "compute_ms_per_sample", "mean compute time per sample (ms, this CPU)")):
        for kind, policy in result["policies"].items():
            pts = policy["points"]
            style = {"marker": "D", "markersize": 8, "linestyle": "none"} if len(pts) == 1 else {"marker": "."}
            label = f"cost (alpha={policy['alpha']})" if kind == "cost" else kind
            if not pts and policy.get("curve"):
                line = None
            else:
                line, = ax.plot([p[key] for p in pts], [p["accuracy"] for p in pts], label=label, **style)
            if policy.get("curve"):
                cv = policy["curve"]
                ax.plot([p[key] for p in cv], [p["accuracy"] for p in cv], linestyle="-.", marker="s", markersize=4,
                        color=line.get_color() if line else None, label="cost, gates refitted per alpha on the "
                        "calibration split")
            if policy.get("per_exit") and kind in ("confidence", "mlp", "ensemble"):
                pe = policy["per_exit"]
                ax.plot([p[key] for p in pe], [p["accuracy"] for p in pe], linestyle="--", marker="x",
                        color=line.get_color(), label=f"{kind}, per-exit thresholds for a desired accuracy")
            if policy.get("priced") and kind in ("confidence", "ensemble", "probe"):
                pr = policy["priced"]
                ax.plot([p[key] for p in pr], [p["accuracy"] for p in pr], linestyle=":", marker="+",
                        color=line.get_color(), label=f"{kind}, thresholds priced on the calibration split")
        ax.axhline(result["final_accuracy"], color="grey", linestyle="--", label="final exit")
        ax.plot([cal[key]], [cal["accuracy"]], "k*", markersize=12, label="bundle's calibrated gates")
        if key == "flops_fraction":
            for (name, o), marker in zip(result["oracles"].items(), ("P", "X")):
                ax.plot([o[key]], [o["accuracy"]], marker, color="grey", markersize=9,
                        label=f"oracle gate ({name.replace('_', ' ')}; reads the labels)")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].set_title(f"accuracy against computation ({result['samples']} samples)")
    axes[1].set_title("accuracy against latency (segments' compute, no links)")
    # beside, not over, the curves
    axes[2].legend(*axes[0].get_legend_handles_labels(), loc="lower center", fontsize=6.5)
    for d in DROPS:
        axes[0].axhline(result["final_accuracy"] - d / 100, color="grey", linestyle=":", linewidth=0.8)
    reach = result["at_drop"]
    drops = list(next(iter(reach.values()), {}))
    rows = [[name] + ["-" if r[d] is None else f"{r[d]['flops_fraction']:.1%}" for d in drops]
            for name, r in reach.items()]
    axes[2].axis("off")
    if rows:
        table = axes[2].table(cellText=rows, colLabels=["policy"] + [f"<= {d} pt" for d in drops], loc="top",
                              bbox=[0, 0.66, 1, 0.32])
        table.auto_set_font_size(False)
        table.set_fontsize(8)
    axes[2].set_title("least FLOPs within a drop of the final exit\n(dotted lines; points picked on this data)",
                      fontsize=9, pad=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.analysis.frontier", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle root written by training.export")
    add_data_args(p)
    p.add_argument("--points", type=positive_int, default=41, help="thresholds per policy (default 41)")
    p.add_argument("--calibrate-on", default=None, metavar="SPLIT",
                   help="also sweep per-exit thresholds set on this split of the data (e.g. val): to desired "
                        "accuracies from 0.5 to 1, and priced at every exchange rate calibration uses")
    p.add_argument("--cost-alphas", type=_alphas, default=COST_ALPHAS, metavar="A,B,...",
                   help="with --calibrate-on: the alphas the cost policy's gates are refitted for (default "
                        f"{','.join(map(str, COST_ALPHAS))}; empty = none)")
    p.add_argument("--probe-on", default=None, metavar="SPLIT",
                   help="also fit and sweep the probe gate (reads every statistic of the exits so far) on this split "
                        "of the data, e.g. train: how much any gate could gain over confidence on this model")
    p.add_argument("--out", type=Path, required=True, help="folder for frontier.json and frontier.png")
    return p


def _alphas(value: str) -> tuple[float, ...]:
    """argparse type: comma-separated alphas in [0, 1]."""
    try:
        alphas = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {value!r}") from None
    if not all(0 <= a <= 1 for a in alphas):
        raise argparse.ArgumentTypeError(f"alphas must lie in [0, 1], got {value!r}")
    return alphas


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    data = load(args.data, args.split, limit=args.limit)
    calib = None
    if args.calibrate_on:
        if parse_spec(args.data).split is not None or args.calibrate_on == args.split:
            raise ConfigError("--calibrate-on needs a data spec without a split and another split than --split, "
                              "e.g. --data synthetic --split test --calibrate-on val")
        held_out = load(args.data, args.calibrate_on, limit=args.limit)
        calib = (held_out.images, held_out.labels)
    probe = None
    if args.probe_on:
        if parse_spec(args.data).split is not None or args.probe_on in (args.split, args.calibrate_on):
            raise ConfigError("--probe-on needs a data spec without a split and a split of its own, e.g. --data "
                              "cifar10 --split test --calibrate-on val --probe-on train")
        fit_on = load(args.data, args.probe_on, limit=args.limit)
        probe = (fit_on.images, fit_on.labels)
    result = frontier(args.bundle, data.images, data.labels, args.points, calib, args.cost_alphas, probe)
    result["data"] = args.data
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "frontier.png")
    cal = result["calibrated"]
    print(f"final exit accuracy {result['final_accuracy']:.4f}; calibrated gates: accuracy {cal['accuracy']:.4f} "
          f"at {cal['flops_fraction']:.1%} of the network's FLOPs, exits {cal['exits']}")
    for name, point in result["stored"].items():
        print(f"{name:>10}: at its calibrated thresholds accuracy {point['accuracy']:.4f} "
              f"({(result['final_accuracy'] - point['accuracy']) * 100:+.2f} pt below the final exit), "
              f"{point['flops_fraction']:.1%} of the FLOPs")
    for name, reach in result["at_drop"].items():
        print(f"{name:>10}: least FLOPs within " + ", ".join(
            f"{d} pt {'-' if r is None else format(r['flops_fraction'], '.1%')}" for d, r in reach.items()))
    print(f"wrote {args.out / 'frontier.json'} and {args.out / 'frontier.png'}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
