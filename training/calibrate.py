"""Exit thresholds calibrated on a validation split (never the test split).

The search is a pure function over cached exit logits. Exits are calibrated in cascade order: exit k sees only the
validation samples that earlier exits declined, and its threshold is the lowest one whose accepted samples still
reach the target accuracy - the highest coverage that meets the target.

``python -m training.calibrate --checkpoint FILE [--policy NAME] [--target-accuracy A | --target-drop D |
--budget-flops B]`` re-calibrates a trained checkpoint in place (validation split only).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from common.cli import run
from common.errors import ConfigError
from common.gates import (POLICY_NAMES, THRESHOLD_GATES, ConstantGate, Gate, LearnedGate, softmax_stats,
                          threshold_gate)

POLICIES = POLICY_NAMES


def gate_score(logits: Tensor, kind: str) -> np.ndarray:
    """Per-sample score of a thresholded gate, oriented so that a higher score means "more willing to exit"."""
    stat, direction = THRESHOLD_GATES[kind]
    return (direction * softmax_stats(logits)[stat]).double().numpy()


def coverage_threshold(scores: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """Lowest score threshold (accept ``score >= t``) whose accepted set has accuracy >= ``target``.

    Only thresholds at a change of score are considered, so ties are accepted or declined together. Returns
    ``None`` when no non-empty accepted set reaches the target.
    """
    if len(scores) == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order].astype(np.float64)
    acc = np.cumsum(c) / np.arange(1, len(s) + 1)
    boundary = np.append(s[1:] < s[:-1], True)  # position k ends a group of equal scores
    ok = np.nonzero(boundary & (acc >= target))[0]
    return float(s[ok[-1]]) if len(ok) else None


@dataclass(frozen=True)
class Thresholdable:
    """One early exit's policy as a family of gates indexed by a threshold on a score (higher = more willing)."""

    score: Callable[[Tensor], np.ndarray]
    make: Callable[[float], Gate]


def policy_family(policy: str, templates: list[Gate] | None = None, num_early: int = 2) -> list[Thresholdable]:
    """The thresholdable form of ``policy`` for each early exit. Learned policies need their fitted ``templates``."""
    if policy in THRESHOLD_GATES:
        direction = THRESHOLD_GATES[policy][1]
        fam = Thresholdable(lambda lg: gate_score(lg, policy), lambda t: threshold_gate(policy, t * direction))
        return [fam] * num_early
    if policy in ("mlp", "cost") and templates and all(isinstance(g, LearnedGate) for g in templates):
        return [Thresholdable(lambda lg, g=g: g.probability(lg).double().numpy(), g.with_threshold)
                for g in templates]
    raise ConfigError(f"cannot calibrate policy {policy!r}" + ("" if policy in ("mlp", "cost") else
                      f"; use one of {', '.join(POLICIES)}"))


def calibrate_gates(exit_logits: list[Tensor], labels: Tensor, target: float,
                    kind: str | list[Thresholdable] = "confidence") -> list[Gate]:
    """One gate per early exit (all but the last), calibrated in cascade order to ``target`` accuracy."""
    family = policy_family(kind, num_early=len(exit_logits) - 1) if isinstance(kind, str) else kind
    remaining = torch.ones(len(labels), dtype=torch.bool)
    gates: list[Gate] = []
    for logits, fam in zip(exit_logits[:-1], family):
        idx = torch.nonzero(remaining).flatten()
        correct = (logits[idx].argmax(1) == labels[idx]).numpy()
        t = coverage_threshold(fam.score(logits[idx]), correct, target)
        gate: Gate = ConstantGate(False) if t is None else fam.make(t)
        gates.append(gate)
        accepted = torch.zeros(len(labels), dtype=torch.bool)
        accepted[idx] = gate(logits[idx])
        remaining &= ~accepted
    return gates


def calibrate_policy(exit_logits: list[Tensor], labels: Tensor, family: list[Thresholdable], costs: list[float], *,
                     target_accuracy: float | None = None, target_drop: float | None = None,
                     budget: float | None = None, full_flops: float | None = None) -> tuple[list[Gate], dict]:
    """Thresholds for one policy under one objective, searched on (validation) logits.

    * ``target_accuracy``: every early exit keeps at least this accuracy on the samples it accepts;
    * ``target_drop`` (points): the cheapest thresholds found whose overall accuracy is within that many points of
      the final exit's;
    * ``budget`` (fraction of ``full_flops``, the whole network's FLOPs without exit heads): the most accurate
      thresholds found whose mean cost fits;
    * none: every early exit keeps the final exit's accuracy.
    The drop and budget objectives are a grid search: 201 accuracy targets shared by the early exits, each turned
    into cascade thresholds as above, plus "never exit early"; the best feasible cascade is kept.
    """
    if sum(x is not None for x in (target_accuracy, target_drop, budget)) > 1:
        raise ConfigError("give at most one of --target-accuracy, --target-drop and --budget-flops")
    final_acc = float((exit_logits[-1].argmax(1) == labels).double().mean())
    full = costs[-1] if full_flops is None else full_flops
    if target_drop is not None and target_drop < 0:
        raise ConfigError(f"target drop must be >= 0 points, got {target_drop}")
    if budget is not None and budget <= 0:
        raise ConfigError(f"FLOPs budget must be a positive fraction, got {budget}")
    if target_drop is None and budget is None:
        target = final_acc if target_accuracy is None else target_accuracy
        gates = calibrate_gates(exit_logits, labels, target, family)
        return gates, {"objective": "target_accuracy", "target": target, "final_accuracy": final_acc}
    candidates = [[ConstantGate(False)] * (len(exit_logits) - 1)]
    candidates += [calibrate_gates(exit_logits, labels, float(t), family) for t in np.linspace(0.0, 1.0, 201)]
    scored = [(cascade(exit_logits, labels, g, costs), g) for g in candidates]
    if target_drop is not None:
        goal = final_acc - target_drop / 100 - 1e-12  # tolerance: 0.98 - 0.01 must admit an accuracy of 0.97
        feasible = [(r, g) for r, g in scored if r["accuracy"] >= goal]
        best = min(feasible, key=lambda rg: (rg[0]["mean_cost"], -rg[0]["accuracy"]))
        info = {"objective": "target_drop", "target": target_drop, "final_accuracy": final_acc}
    else:
        feasible = [(r, g) for r, g in scored if r["mean_cost"] <= budget * full]
        if not feasible:
            raise ConfigError(f"no thresholds fit a budget of {budget:.1%} of the network's FLOPs on this data")
        best = max(feasible, key=lambda rg: (rg[0]["accuracy"], -rg[0]["mean_cost"]))
        info = {"objective": "budget_flops", "target": budget, "final_accuracy": final_acc}
    return best[1], info


def exit_taken(exit_logits: list[Tensor], gates: list[Gate]) -> Tensor:
    """Index of the exit each sample leaves at when ``gates`` guard the early exits (cascade order)."""
    n = len(exit_logits[0])
    exit_of = torch.full((n,), len(exit_logits) - 1, dtype=torch.long)
    remaining = torch.ones(n, dtype=torch.bool)
    for k, (logits, gate) in enumerate(zip(exit_logits[:-1], gates)):
        take = remaining & gate(logits)
        exit_of[take] = k
        remaining &= ~take
    return exit_of


def cascade(exit_logits: list[Tensor], labels: Tensor, gates: list[Gate],
            exit_costs: list[float] | None = None) -> dict:
    """Simulate the deployed cascade on cached logits: accuracy, exits per exit index and, given the cumulative
    cost of leaving at each exit, the mean cost per sample."""
    n = len(labels)
    exit_of = exit_taken(exit_logits, gates)
    preds = torch.stack([lg.argmax(1) for lg in exit_logits])[exit_of, torch.arange(n)]
    counts = torch.bincount(exit_of, minlength=len(exit_logits))
    out = {"accuracy": int((preds == labels).sum()) / n, "exit_counts": counts.tolist()}
    if exit_costs is not None:
        out["mean_cost"] = float(sum(c * k for c, k in zip(exit_costs, counts.tolist())) / n)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.safetensors written by training.train")
    p.add_argument("--data", default=None, help="data spec (default: the one the model was trained on)")
    p.add_argument("--policy", choices=POLICIES, default=None, help="active policy (default: keep the current one)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--target-accuracy", type=float, default=None,
                      help="accuracy each early exit must keep (default: the final exit's validation accuracy)")
    goal.add_argument("--target-drop", type=float, default=None,
                      help="cheapest thresholds within this many accuracy points of the final exit")
    goal.add_argument("--budget-flops", type=float, default=None,
                      help="most accurate thresholds within this fraction of the network's FLOPs")
    return p


def main(argv: list[str] | None = None) -> int:
    """Re-calibrate every policy of a checkpoint (learned gates are kept, only thresholds move) and save it."""
    from common.gates import gate_from_dict
    from training import checkpoint
    from training.config import TrainConfig
    from training.data import load
    from training.train import fit_and_calibrate

    args = get_args_parser().parse_args(argv)
    model, meta = checkpoint.load(args.checkpoint)
    saved = dict(meta["config"])
    saved.update(target_accuracy=args.target_accuracy, target_drop=args.target_drop, budget_flops=args.budget_flops)
    if args.policy:
        saved["policy"] = args.policy
    if args.data:
        saved["data"] = args.data
    try:
        cfg = TrainConfig(**saved)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot re-calibrate with these settings: {e}") from None
    learned = None
    if meta.get("policies"):  # keep the fitted gates; only their thresholds are re-calibrated
        learned = {k: [gate_from_dict(g) for g in meta["policies"][k]] for k in ("mlp", "cost")}
        learned = {k: [g.with_threshold(0.5) for g in v] for k, v in learned.items()}
    val = load(cfg.data, "val", val_fraction=cfg.val_fraction, seed=cfg.seed, limit=cfg.limit_val)
    meta.update(fit_and_calibrate(model, val, cfg, learned))
    meta["config"] = {**meta["config"], "target_accuracy": cfg.target_accuracy, "target_drop": cfg.target_drop,
                      "budget_flops": cfg.budget_flops, "policy": cfg.policy}
    checkpoint.save(model, meta, args.checkpoint)
    print(f"calibrated on {len(val)} validation samples of {cfg.data}; active policy {cfg.policy}")
    return 0


if __name__ == "__main__":
    run(main)
