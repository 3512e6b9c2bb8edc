"""Learned exit policies (mlp, cost) and the calibration objectives, on synthetic exit outputs of known shape."""
import json

import pytest
import torch

from common.errors import ConfigError

from common.model.gates import ConstantGate, EnsembleGate, LearnedGate, answer_stats, gate_from_dict, gate_to_dict
from training.calibrate import (ExitScores, Objective, calibrate_scores, cascade, history_at, naive_thresholds,
                                policy_family, to_gates)
from training.policies import (build_policies, cascade_objective, fit_cost_gates, fit_ensemble_gates, fit_mlp_gates,
                               gate_split)


def calibrate_policy(exit_logits, labels, family, costs, *, target_accuracy=None, target_drop=None, budget=None,
                     full_flops=None):
    """Naive thresholds for one policy under one objective, searched on the given logits."""
    objective = Objective.from_targets(target_accuracy, target_drop, budget)
    thresholds, info = naive_thresholds(ExitScores.build(exit_logits, labels, family, costs, full_flops), objective)
    return to_gates(family, thresholds), info


def synthetic_exits(n=2000, seed=0):
    """Three exits over 5 classes. Each sample has a difficulty d in [0, 1]; exit k is right when d < its skill,
    and its confidence falls with d, so confidence carries the signal a gate should learn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    d = torch.rand(n, generator=g)
    logits = []
    for skill in (0.4, 0.7, 0.95):
        right = d < skill
        pred = torch.where(right, labels, (labels + 1) % 5)
        strength = 1.0 + 6.0 * (1 - d) + 0.5 * torch.randn(n, generator=g)
        lg = 0.3 * torch.randn(n, 5, generator=g)
        lg[torch.arange(n), pred] += strength
        logits.append(lg)
    return logits, labels


COSTS = [30.0, 60.0, 100.0]  # cumulative: the early exit heads make the last exit cost more than the network
FULL = 90.0


def _auc(scores, positives):
    pos, neg = scores[positives], scores[~positives]
    return float((pos[:, None] > neg[None, :]).float().mean())


def test_mlp_gate_learns_who_is_right():
    logits, labels = synthetic_exits()
    gates = fit_mlp_gates(logits, labels, epochs=30)
    assert [g.kind for g in gates] == ["mlp", "mlp"] and [g.depth for g in gates] == [0.0, 0.5]
    assert all(g.exit is None and not g.needs_history for g in gates)  # no agreement feature unless asked
    test_logits, test_labels = synthetic_exits(seed=1)
    for gate, lg in zip(gates, test_logits):
        p = gate.probability(lg)
        assert _auc(p, lg.argmax(1) == test_labels) > 0.85


def test_learned_gates_survive_the_manifest_exactly():
    logits, labels = synthetic_exits(n=500)
    gate = fit_mlp_gates(logits, labels, epochs=5, use_agreement=True)[0].with_threshold(0.37)
    again = gate_from_dict(json.loads(json.dumps(gate_to_dict(gate))))
    assert isinstance(again, LearnedGate) and again.threshold == 0.37 and again.exit == 0
    history = history_at(logits, 0)
    assert torch.equal(again.probability(logits[0], history=history), gate.probability(logits[0], history=history))


def test_cost_alpha_trades_accuracy_for_flops():
    logits, labels = synthetic_exits()
    outcomes = {}
    for alpha in (0.0, 0.3, 1.0):
        gates = fit_cost_gates(logits, labels, COSTS, alpha, epochs=30)
        assert all(g.kind == "cost" and g.alpha == alpha for g in gates)
        outcomes[alpha] = cascade(logits, labels, gates, COSTS)
    assert outcomes[1.0]["exit_counts"][0] > 0.95 * len(labels)  # cost only: leave at once
    assert outcomes[0.0]["accuracy"] > outcomes[1.0]["accuracy"]
    assert outcomes[0.0]["mean_cost"] > outcomes[0.3]["mean_cost"] > outcomes[1.0]["mean_cost"]


def test_cascade_objective_matches_its_definition():
    losses = torch.tensor([[1.0, 2.0, 3.0]])
    costs = torch.tensor([0.2, 0.5, 1.0])
    big = torch.tensor([50.0])  # sigmoid = 1: always exit at the first gate
    assert cascade_objective([big, big], losses, costs, 0.0).item() == pytest.approx(1.0)
    assert cascade_objective([-big, big], losses, costs, 1.0).item() == pytest.approx(0.5)
    zero = torch.tensor([0.0])  # 1/2 exit at 0, 1/4 at 1, 1/4 at the end
    assert cascade_objective([zero, zero], losses, costs, 0.5).item() == pytest.approx(
        0.5 * (0.5 * 1 + 0.25 * 2 + 0.25 * 3) + 0.5 * (0.5 * 0.2 + 0.25 * 0.5 + 0.25 * 1.0))


@pytest.mark.parametrize("policy", ["confidence", "entropy", "margin", "mlp"])
def test_target_drop_and_budget(policy):
    logits, labels = synthetic_exits()
    templates = fit_mlp_gates(logits, labels, epochs=10) if policy == "mlp" else None
    family = policy_family(policy, templates, 2)
    final = float((logits[-1].argmax(1) == labels).double().mean())
    gates, info = calibrate_policy(logits, labels, family, COSTS, target_drop=2.0, full_flops=FULL)
    out = cascade(logits, labels, gates, COSTS)
    assert info["objective"] == "target_drop" and out["accuracy"] >= final - 0.02
    assert out["mean_cost"] < FULL * 0.9  # the drop allowance is spent on saving computation
    # A tighter allowance can only cost more.
    tight, _ = calibrate_policy(logits, labels, family, COSTS, target_drop=0.5, full_flops=FULL)
    assert cascade(logits, labels, tight, COSTS)["mean_cost"] >= out["mean_cost"]
    for budget in (0.45, 0.6):  # a fraction of the whole network (FULL), not of the last exit's cost
        gates, _ = calibrate_policy(logits, labels, family, COSTS, budget=budget, full_flops=FULL)
        assert cascade(logits, labels, gates, COSTS)["mean_cost"] <= budget * FULL


def test_objective_errors_are_config_errors():
    logits, labels = synthetic_exits(n=300)
    family = policy_family("confidence", None, 2)
    with pytest.raises(ConfigError, match="target_drop"):
        calibrate_policy(logits, labels, family, COSTS, target_drop=-1.0)
    with pytest.raises(ConfigError, match="no thresholds fit"):
        calibrate_policy(logits, labels, family, COSTS, budget=0.2, full_flops=FULL)  # below the first exit's cost
    with pytest.raises(ConfigError, match="at most one"):
        calibrate_policy(logits, labels, family, COSTS, target_drop=1.0, budget=0.5)


def test_gate_split_halves_are_disjoint_and_complete():
    fit, cal = gate_split(101, seed=3)
    assert not set(fit.tolist()) & set(cal.tolist())
    assert sorted(fit.tolist() + cal.tolist()) == list(range(101))
    assert torch.equal(gate_split(101, seed=3)[0], fit)


def test_build_policies_fits_on_one_half_and_calibrates_on_the_other():
    logits, labels = synthetic_exits(n=1000)
    built = build_policies(logits, labels, COSTS, FULL, alpha=0.4, epochs=5, max_batches=None, seed=0,
                           budget=0.7)
    assert set(built["policies"]) == {"confidence", "entropy", "margin", "mlp", "cost", "ensemble"}
    assert all(len(g) == 2 for g in built["policies"].values())
    assert all(c["val_samples"] == 500 for c in built["calibration"].values())
    assert built["calibration"]["cost"]["target"] == 0.4
    for name in ("confidence", "entropy", "margin", "mlp", "ensemble"):
        assert built["calibration"][name]["val_flops_fraction"] <= 0.7


def test_ltt_ordered_on_the_training_split_certifies_on_all_it_may():
    """Candidates ordered on other data: the statistic policies are certified on every validation sample, the
    fitted ones only on the half their gates were not fitted on."""
    logits, labels = synthetic_exits(n=1000)
    train_logits, train_labels = synthetic_exits(n=3000, seed=7)
    kwargs = dict(alpha=0.4, epochs=5, max_batches=None, seed=0, target_drop=2.0, method="ltt")
    built = build_policies(logits, labels, COSTS, FULL, order_on=(train_logits, train_labels), **kwargs)["calibration"]
    halves = build_policies(logits, labels, COSTS, FULL, **kwargs)["calibration"]
    for name in ("confidence", "entropy", "margin"):
        assert (built[name]["val_samples"], built[name]["path_samples"], built[name]["ordered_on"]) == (1000, 3000,
                                                                                                       "train")
        assert built[name]["val_flops_fraction"] < 0.9  # it does certify early exits
    for name in ("mlp", "cost", "ensemble"):
        assert (built[name]["val_samples"], built[name]["path_samples"], built[name]["ordered_on"]) == (500, 3000,
                                                                                                       "train")
    assert all((c["val_samples"], c["path_samples"], c["ordered_on"]) == (500, 500, "val") for c in halves.values())


def test_ensemble_calibration_keeps_its_promise_on_fresh_data():
    """Ensemble gates fitted on one draw and LTT-calibrated (delta = 0.1) on each of 10 further draws keep a 2-point
    drop on a large fresh draw in at least 8 of the 10 (one draw may fail by design, about one in ten); calibration
    judges each exit by the ensemble's label, not the exit's own."""
    logits, labels = synthetic_exits(n=2000, seed=3)
    gates = fit_ensemble_gates(logits, labels)
    family = policy_family("ensemble", gates, 2)
    path = ExitScores.build(logits, labels, family, COSTS, FULL)
    fresh, fresh_labels = synthetic_exits(n=10000, seed=4)
    final = float((fresh[-1].argmax(1) == fresh_labels).double().mean())
    objective = Objective.from_targets(None, 2.0, None, "ltt")
    held, early = 0, 0
    for seed in range(10, 20):
        cal_logits, cal_labels = synthetic_exits(n=2000, seed=seed)
        es = ExitScores.build(cal_logits, cal_labels, family, COSTS, FULL)
        thresholds, info = calibrate_scores(es, objective, "ltt", 0.1, "wsr", path=path)
        chosen = to_gates(family, thresholds)
        assert all(isinstance(g, EnsembleGate) and g.needs_history for g in chosen)
        out = cascade(fresh, fresh_labels, chosen, COSTS)
        held += out["accuracy"] >= final - 0.02
        early += sum(out["exit_counts"][:2]) > 0
    assert held >= 8 and early == 10  # it does exit early, every time
    # The labels calibration scores at exit 1 are the ensemble's.
    es = ExitScores.build(fresh, fresh_labels, family, COSTS, FULL)
    ensemble_labels = answer_stats(gates[1], fresh[1], history_at(fresh, 1))["label"]
    assert torch.equal(torch.from_numpy(es.preds[1]), ensemble_labels)
    assert not torch.equal(ensemble_labels, fresh[1].argmax(1))


def test_policy_family_needs_the_right_fitted_gates():
    with pytest.raises(ConfigError, match="without its fitted gates"):
        policy_family("ensemble", None, 2)
    with pytest.raises(ConfigError, match="without its fitted gates"):
        policy_family("ensemble", [ConstantGate(False)] * 2, 2)
