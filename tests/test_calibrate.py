import numpy as np
import torch

from common.model.gates import ConfidenceGate, ConstantGate, EntropyGate, MarginGate
from training.calibrate import ExitScores, cascade, cascade_thresholds, coverage_threshold, policy_family, to_gates


def calibrate_gates(exit_logits, labels, target, kind="confidence"):
    """One gate per early exit, calibrated in cascade order to ``target`` accuracy."""
    family = policy_family(kind, num_early=len(exit_logits) - 1)
    scores = ExitScores.build(exit_logits, labels, family, [0.0] * len(exit_logits))
    return to_gates(family, cascade_thresholds(scores, target))


def test_coverage_threshold_picks_the_highest_coverage_meeting_the_target():
    scores = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 1, 1, 0, 1, 0])
    assert coverage_threshold(scores, correct, 1.0) == 0.9  # top 3 all correct
    assert coverage_threshold(scores, correct, 0.8) == 0.7  # top 5: 4/5 = 0.8
    assert coverage_threshold(scores, correct, 0.5) == 0.6  # everything: 4/6
    assert coverage_threshold(np.array([0.5]), np.array([0]), 0.9) is None
    assert coverage_threshold(np.array([]), np.array([]), 0.9) is None


def test_ties_are_accepted_or_declined_together():
    scores = np.array([0.9, 0.8, 0.8, 0.8])
    correct = np.array([1, 1, 0, 0])
    # Accepting at 0.8 takes all three tied samples (accuracy 0.5), so only 0.9 meets 0.9.
    assert coverage_threshold(scores, correct, 0.9) == 0.9


def _logits(conf_class, labels, strength):
    """Logits whose argmax is ``conf_class`` with softmax confidence rising with ``strength``."""
    out = torch.zeros(len(labels), 3)
    out[torch.arange(len(labels)), conf_class] = strength
    return out


def test_cascade_calibration_respects_the_target_on_validation():
    torch.manual_seed(0)
    n = 400
    labels = torch.randint(0, 3, (n,))
    strength = torch.rand(n) * 6
    # Exit 0 is right exactly when it is confident; the final exit is always right.
    pred0 = torch.where(strength > 3, labels, (labels + 1) % 3)
    exit0 = _logits(pred0, labels, strength)
    exit1 = _logits((labels + 1) % 3, labels, torch.ones(n))  # always wrong
    final = _logits(labels, labels, torch.full((n,), 5.0))
    gates = calibrate_gates([exit0, exit1, final], labels, target=1.0)
    assert isinstance(gates[0], ConfidenceGate)
    assert isinstance(gates[1], ConstantGate) and gates[1].kind == "never"  # never right: never exits
    sim = cascade([exit0, exit1, final], labels, gates)
    assert sim["accuracy"] == 1.0
    assert sim["exit_counts"][0] == int((strength > 3).sum())
    assert sim["exit_counts"][1] == 0


def test_entropy_calibration():
    labels = torch.tensor([0, 1, 2, 0])
    strength = torch.tensor([8.0, 6.0, 1.0, 0.5])
    exit0 = _logits(torch.tensor([0, 1, 0, 1]), labels, strength)
    gates = calibrate_gates([exit0, exit0], labels, target=1.0, kind="entropy")
    assert isinstance(gates[0], EntropyGate)
    assert gates[0](exit0).tolist() == [True, True, False, False]


def test_margin_calibration_and_costs():
    labels = torch.tensor([0, 1, 2, 0])
    strength = torch.tensor([8.0, 6.0, 1.0, 0.5])
    exit0 = _logits(torch.tensor([0, 1, 0, 1]), labels, strength)
    gates = calibrate_gates([exit0, exit0], labels, target=1.0, kind="margin")
    assert isinstance(gates[0], MarginGate)
    sim = cascade([exit0, exit0], labels, gates, exit_costs=[10.0, 30.0])
    assert sim["exit_counts"] == [2, 2] and sim["mean_cost"] == 20.0
