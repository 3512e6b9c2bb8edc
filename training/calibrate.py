"""Exit thresholds calibrated on a validation split (never the test split).

The search is a pure function over cached exit logits. Exits are calibrated in cascade order: exit k sees only the
validation samples that earlier exits declined, and its threshold is the lowest one whose accepted samples still
reach the target accuracy - the highest coverage that meets the target.

``python -m training.calibrate --checkpoint FILE [--data SPEC] [--target-accuracy A] [--gate confidence|entropy]``
re-calibrates a trained checkpoint in place.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from common.cli import run
from common.errors import ConfigError
from common.gates import THRESHOLD_GATES, ConstantGate, Gate, gate_to_dict, softmax_stats, threshold_gate

GATE_KINDS = tuple(THRESHOLD_GATES)


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


def calibrate_gates(exit_logits: list[Tensor], labels: Tensor, target: float, kind: str = "confidence") -> list[Gate]:
    """One gate per early exit (all but the last), calibrated in cascade order to ``target`` accuracy."""
    if kind not in GATE_KINDS:
        raise ConfigError(f"cannot calibrate gate kind {kind!r}; use one of {', '.join(GATE_KINDS)}")
    remaining = torch.ones(len(labels), dtype=torch.bool)
    gates: list[Gate] = []
    for logits in exit_logits[:-1]:
        idx = torch.nonzero(remaining).flatten()
        scores = gate_score(logits[idx], kind)
        correct = (logits[idx].argmax(1) == labels[idx]).numpy()
        t = coverage_threshold(scores, correct, target)
        gate: Gate = ConstantGate(False) if t is None else threshold_gate(kind, t * THRESHOLD_GATES[kind][1])
        gates.append(gate)
        accepted = torch.zeros(len(labels), dtype=torch.bool)
        accepted[idx] = gate(logits[idx])
        remaining &= ~accepted
    return gates


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
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="accuracy each early exit must keep (default: the final exit's validation accuracy)")
    p.add_argument("--gate", choices=GATE_KINDS, default="confidence", help="gate kind to calibrate")
    return p


def main(argv: list[str] | None = None) -> int:
    from training import checkpoint
    from training.data import load
    from training.engine import collect_logits

    args = get_args_parser().parse_args(argv)
    model, meta = checkpoint.load(args.checkpoint)
    cfg = meta["config"]
    data_spec = args.data or cfg["data"]
    val = load(data_spec, "val", val_fraction=cfg["val_fraction"], seed=cfg["seed"], limit=cfg.get("limit_val"))
    logits = collect_logits(model, val)
    result = calibrate_on(logits, val.labels, args.target_accuracy, args.gate)
    meta["gates"], meta["calibration"] = result["gates"], result
    checkpoint.save(model, meta, args.checkpoint)
    print(f"calibrated on {len(val)} validation samples of {data_spec}: {result}")
    return 0


def calibrate_on(logits: list[Tensor], labels: Tensor, target: float | None, kind: str) -> dict:
    """Calibrate and describe the outcome on the same (validation) data, as stored in checkpoints."""
    final_acc = float((logits[-1].argmax(1) == labels).float().mean())
    target = final_acc if target is None else target
    gates = calibrate_gates(logits, labels, target, kind)
    sim = cascade(logits, labels, gates)
    return {
        "target_accuracy": target, "final_exit_val_accuracy": final_acc, "gate_kind": kind,
        "gates": [gate_to_dict(g) for g in gates], "val_accuracy": sim["accuracy"],
        "val_exit_counts": sim["exit_counts"], "val_samples": len(labels),
    }


if __name__ == "__main__":
    run(main)
