import numpy as np
import torch

from common.model.gates import ConfidenceGate, ConstantGate, EntropyGate, MarginGate
from training.calibrate import (ExitScores, Objective, candidate_thresholds, cascade, cascade_thresholds,
                                coverage_threshold, isotonic_rising, policy_family, priced_thresholds, to_gates)


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


def _scores_only(scores, right, costs):
    """ExitScores straight from per-exit scores and per-exit correctness (the final exit last; label 1 is right)."""
    scores, right = np.asarray(scores, dtype=np.float64), np.asarray(right)
    return ExitScores(scores, right.astype(np.int64), np.ones(right.shape[1], dtype=np.int64),
                      np.asarray(costs, dtype=np.float64), float(costs[-1]))


def test_isotonic_fit_rises_keeps_the_weighted_mean_and_leaves_rising_data_alone():
    rising = np.array([0.0, 0.1, 0.5, 0.5, 1.0])
    assert np.array_equal(isotonic_rising(rising, np.ones(5)), rising)
    y, w = np.array([0.0, 1.0, 0.0, 0.0, 1.0, 0.5]), np.array([1.0, 1.0, 2.0, 1.0, 1.0, 3.0])
    fit = isotonic_rising(y, w)
    assert np.all(np.diff(fit) >= 0)
    assert np.isclose((fit * w).sum(), (y * w).sum())
    assert np.allclose(fit, [0.0, 0.25, 0.25, 0.25, 2.5 / 4, 2.5 / 4])  # 1,0,0 pool to 1/4 by weight; 1, .5 pool


def test_a_dearer_lost_answer_never_lets_a_single_exit_accept_more():
    rng = np.random.default_rng(0)
    n = 2000
    score = rng.random(n)
    right0 = rng.random(n) < 0.5 + 0.5 * score  # the exit is right more often when it is surer
    es = _scores_only([score], [right0, np.ones(n, dtype=bool)], [0.4, 1.0])
    accepted = [int((score >= t).sum()) if t is not None else 0
                for t in (priced_thresholds(es, p)[0] for p in np.geomspace(0.1, 1000, 30))]
    assert accepted[0] == n and accepted[-1] < n // 10  # cheap answers: everything leaves; dear ones: few do
    assert all(a >= b for a, b in zip(accepted, accepted[1:]))


def test_priced_candidates_let_the_exit_that_saves_more_accept_more():
    # Two early exits equally sure and equally right for the same score, one leaving at 20% of the network and one
    # at 90%: one accuracy target for both (the older family) cannot see that a sample leaving at the first saves
    # eight times as much, so at the same accuracy drop the priced candidates are cheaper.
    rng = np.random.default_rng(1)
    n = 4000
    s0, s1 = rng.random(n), rng.random(n)
    right0, right1 = rng.random(n) < 0.6 + 0.4 * s0, rng.random(n) < 0.6 + 0.4 * s1
    es = _scores_only([s0, s1], [right0, right1, np.ones(n, dtype=bool)], [0.2, 0.9, 1.0])
    drop = Objective("drop", 3.0)
    final = float(es.reference_correct().mean())

    def cheapest(candidates):
        return min(es.outcome(th)["flops_fraction"] for th in candidates if drop.met(es.outcome(th), final))

    shared_targets = [cascade_thresholds(es, float(t)) for t in np.linspace(0, 1, 201)]
    assert cheapest(candidate_thresholds(es)) < cheapest(shared_targets) - 0.02


def test_candidates_start_cautious_and_take_small_steps():
    rng = np.random.default_rng(2)
    n = 3000
    score = rng.random((2, n))
    es = _scores_only(score, [rng.random(n) < 0.5 + 0.5 * score[0], rng.random(n) < 0.5 + 0.5 * score[1],
                              np.ones(n, dtype=bool)], [0.3, 0.6, 1.0])
    cands = candidate_thresholds(es)
    assert cands[0] == [None, None]
    costs = [es.outcome(th)["flops_fraction"] for th in cands]
    assert costs[1] > 0.99 and min(costs) < 0.35  # the first step exits a handful; the last, nearly everything early
    assert len({tuple(th) for th in cands}) == len(cands)
