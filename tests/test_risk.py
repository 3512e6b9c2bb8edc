"""The risk tests behind guaranteed calibration, and Learn-then-Test against naive calibration on known data."""
import math

import numpy as np
import pytest

from training.calibrate import ExitScores, Objective, ltt_thresholds, naive_thresholds
from training.risk import binomial_cdf, binomial_pvalue, fixed_sequence, hb_pvalue, pvalue, wsr_pvalue


def test_binomial_cdf_matches_the_sum_of_the_pmf():
    for n, p in [(10, 0.3), (57, 0.02), (400, 0.5)]:
        for k in (0, 1, n // 3, n - 1, n):
            exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
            assert binomial_cdf(k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-300)
    assert binomial_cdf(-1, 10, 0.5) == 0.0 and binomial_cdf(3, 10, 0.0) == 1.0


@pytest.mark.parametrize("method", ["wsr", "hb", "binomial"])
def test_pvalues_are_valid_at_the_null_boundary(method):
    """Losses whose mean equals the bound (the hardest null): P(p <= delta) must not exceed delta."""
    rng = np.random.default_rng(0)
    bound, n, reps = 0.2, 300, 1500
    draws = (rng.random((reps, n)) < bound).astype(np.float64)
    for delta in (0.05, 0.1, 0.2):
        rate = np.mean([pvalue(z, bound, method, delta) <= delta for z in draws])
        assert rate <= delta + 0.02, (method, delta, rate)


@pytest.mark.parametrize("method", ["wsr", "hb", "binomial"])
def test_pvalues_have_power_when_the_risk_is_well_below_the_bound(method):
    rng = np.random.default_rng(1)
    z = (rng.random(2000) < 0.10).astype(np.float64)
    assert pvalue(z, 0.2, method) < 1e-6
    assert pvalue(z, 0.08, method) > 0.1  # above the bound: no evidence against the null


def test_wsr_adapts_to_low_variance_where_hoeffding_bentkus_cannot():
    """An accuracy drop against the final exit: (final right - answer right + 1) / 2 is 1/2 for most samples."""
    rng = np.random.default_rng(2)
    n = 3000
    diff = rng.choice([-1.0, 0.0, 1.0], size=n, p=[0.02, 0.96, 0.02])  # true drop 0
    z = (diff + 1) / 2
    bound = (1 + 0.01) / 2  # drop <= 1 point
    assert wsr_pvalue(z, bound, 0.1) <= 0.1
    assert hb_pvalue(z, bound) > 0.1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="zero samples"):
        wsr_pvalue(np.array([]), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        hb_pvalue(np.array([0.5, 1.5]), 0.5)
    with pytest.raises(ValueError, match="0 or 1"):
        binomial_pvalue(np.array([0.5]), 0.5)
    with pytest.raises(ValueError, match="unknown bound"):
        pvalue(np.array([0.5]), 0.5, "chebyshev")
    with pytest.raises(ValueError, match="delta"):
        fixed_sequence([0.01], 0.0)


def test_fixed_sequence_stops_at_the_first_failure_without_computing_the_rest():
    seen = []

    def lazy():
        for p in [0.01, 0.02, 0.5, 0.0]:
            seen.append(p)
            yield p

    assert fixed_sequence(lazy(), 0.1) == 2
    assert seen == [0.01, 0.02, 0.5]
    assert fixed_sequence([], 0.1) == 0


def _population(n: int, rng: np.random.Generator) -> ExitScores:
    """Two early exits and a final exit with a known joint law: exit k is right with probability 0.45 + 0.55 * its
    score (score uniform on [0, 1]); the final exit is right with probability 0.9. Costs 0.3, 0.6 and 1."""
    labels = rng.integers(0, 10, n)
    scores = rng.random((2, n))
    right = np.vstack([rng.random((2, n)) < 0.45 + 0.55 * scores, rng.random((1, n)) < 0.9])
    preds = np.where(right, labels, (labels + 1 + rng.integers(0, 9, (3, n))) % 10)
    return ExitScores(scores, preds, labels, np.array([0.3, 0.6, 1.0]), 1.0)


def test_ltt_keeps_its_promise_where_naive_calibration_breaks_it():
    """Over many calibration draws, the guaranteed thresholds break "drop <= 2 points" on fresh data in at most
    delta of the draws (plus sampling slack); naive thresholds, fitted to the draw itself, break it far more often."""
    rng = np.random.default_rng(3)
    fresh = _population(200_000, rng)
    objective, delta, splits = Objective("drop", 2.0), 0.1, 120
    broken = {"naive": 0, "ltt": 0}
    flops = {"naive": [], "ltt": []}
    for _ in range(splits):
        cal = _population(1500, rng)
        path, test = cal.subset(np.arange(500)), cal.subset(np.arange(500, 1500))
        for method, (th, info) in {"naive": naive_thresholds(cal, objective),
                                   "ltt": ltt_thresholds(path, test, objective, delta)}.items():
            outcome = fresh.outcome(th)
            broken[method] += outcome["drop"] > objective.value
            flops[method].append(outcome["flops_fraction"])
        assert info["method"] == "ltt" and info["delta"] == delta and info["certified"] >= 1
    assert broken["ltt"] / splits <= delta + 0.05
    assert broken["naive"] / splits >= 0.3
    # The guarantee is paid in computation, but it still exits early.
    assert np.mean(flops["naive"]) < np.mean(flops["ltt"]) < 0.99


def test_ltt_budget_and_accuracy_objectives():
    rng = np.random.default_rng(4)
    cal, fresh = _population(4000, rng), _population(100_000, rng)
    path, test = cal.subset(np.arange(1500)), cal.subset(np.arange(1500, 4000))
    th, info = ltt_thresholds(path, test, Objective("budget", 0.7), 0.1)
    assert fresh.outcome(th)["flops_fraction"] <= 0.7 and info["objective"] == "budget_flops"
    th, info = ltt_thresholds(path, test, Objective("accuracy", 0.85), 0.1, bound="binomial")
    assert fresh.outcome(th)["accuracy"] >= 0.85 and fresh.outcome(th)["flops_fraction"] < 1.0
    with pytest.raises(Exception, match="nothing can be certified"):
        ltt_thresholds(path, test, Objective("accuracy", 0.95), 0.1)  # the final exit alone scores 0.9
    with pytest.raises(Exception, match="needs a target"):
        ltt_thresholds(path, test, Objective("per_exit"), 0.1)
