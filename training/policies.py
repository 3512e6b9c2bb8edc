"""Fitting the learned exit policies on cached exit outputs (the third training stage).

* ``mlp``  - one gate per early exit, trained with binary cross-entropy to predict whether that exit's answer is right;
  its inputs may include whether the exit agrees with the previous one (``agreement``, PABEE-style; off by
  default: it did not help where measured, see docs/policies.md).
* ``cost`` - the gates of all early exits trained together to minimise ``(1 - alpha) * E[loss] + alpha * E[cost]``,
  where a sample's exit distribution follows the cascade (exit k is reached only if every earlier gate declined),
  the loss is the cross-entropy of the exit taken and the cost is the FLOPs spent up to it, as a share of the
  whole network's. One ``alpha`` in [0, 1] trades accuracy for computation (after LEENet).

* ``ensemble`` - at each early exit k, the non-negative weights of a geometric ensemble of exits 0..k and a per-class
  bias (Zero Time Waste), fitted to minimise the ensemble's negative log-likelihood, starting from the plain exit.

All are fitted on data the backbone was not trained on, and are cheap: they only see the exits' logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from common.model.gates import EnsembleGate, GateMLP, LearnedGate, agreement, gate_features, gate_to_dict
from training.calibrate import (FITTED, POLICIES, ExitScores, Objective, calibrate_scores, cascade, history_at,
                                policy_family, to_gates)


def _standardised_mlp(features: Tensor, hidden: int, seed: int) -> GateMLP:
    with torch.random.fork_rng():  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(seed)
        mlp = GateMLP(hidden, features.shape[1])
    mlp.mean.copy_(features.mean(0))
    mlp.std.copy_(features.std(0).nan_to_num(1.0).clamp_min(1e-4))
    return mlp


def _depths(num_exits: int) -> list[float]:
    return [k / (num_exits - 1) for k in range(num_exits - 1)]


def _minibatches(n: int, batch_size: int, gen: torch.Generator, max_batches: int | None):
    order = torch.randperm(n, generator=gen)
    for b, lo in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield order[lo:lo + batch_size]


def fit_mlp_gates(exit_logits: list[Tensor], labels: Tensor, *, epochs: int = 40, max_batches: int | None = None,
                  batch_size: int = 256, lr: float = 1e-2, hidden: int = 16, seed: int = 0,
                  use_agreement: bool = False) -> list[LearnedGate]:
    """One ``mlp`` gate per early exit; its probability estimates P(this exit's prediction is correct). With
    ``use_agreement`` its inputs include whether the exit agrees with the previous one, and it needs history."""
    gen = torch.Generator().manual_seed(seed)
    gates = []
    for k, (logits, depth) in enumerate(zip(exit_logits[:-1], _depths(len(exit_logits)))):
        features = gate_features(logits, depth)
        if use_agreement:
            features = torch.cat([features, agreement(history_at(exit_logits, k))[:, None]], dim=1)
        target = (logits.argmax(1) == labels).float()
        mlp = _standardised_mlp(features, hidden, seed + k)
        opt = torch.optim.Adam(mlp.net.parameters(), lr=lr)
        for _ in range(epochs):
            for idx in _minibatches(len(labels), batch_size, gen, max_batches):
                loss = F.binary_cross_entropy_with_logits(mlp(features[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        gates.append(LearnedGate("mlp", mlp.eval(), depth, 0.5, exit=k if use_agreement else None))
    return gates


def ensemble_nll(weights: Tensor, bias: Tensor, log_probs: Tensor, labels: Tensor) -> Tensor:
    """Mean negative log-likelihood of ``labels`` under the geometric ensemble of ``log_probs`` (N, k + 1, K)."""
    log_q = (log_probs * weights[None, :, None]).sum(1) + bias
    return F.cross_entropy(log_q, labels)


def fit_ensemble_gates(exit_logits: list[Tensor], labels: Tensor, *, steps: int = 100,
                       lr: float = 0.1) -> list[EnsembleGate]:
    """One ``ensemble`` gate per early exit k: the weights of exits 0..k and a per-class bias minimising the
    ensemble's NLL of ``labels``, by full-batch Adam steps (deterministic) from the plain exit (weights one-hot on k,
    bias 0). Weights are kept non-negative (projected after each step), as in Zero Time Waste, so an earlier exit can
    only add its vote, never count against it; a fit that ends worse than its start keeps the start. Thresholds are
    placeholders until calibrated."""
    gates = []
    for k in range(len(exit_logits) - 1):
        log_probs = torch.log_softmax(history_at(exit_logits, k).float(), dim=2)
        weights = torch.zeros(k + 1)
        weights[k] = 1.0
        bias = torch.zeros(log_probs.shape[2])
        start = float(ensemble_nll(weights, bias, log_probs, labels))
        w, b = weights.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        opt = torch.optim.Adam([w, b], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            ensemble_nll(w, b, log_probs, labels).backward()
            opt.step()
            with torch.no_grad():
                w.clamp_(min=0.0)
        with torch.no_grad():
            end = float(ensemble_nll(w, b, log_probs, labels))
        if end < start and torch.isfinite(w).all() and torch.isfinite(b).all():
            weights, bias = w.detach(), b.detach()
        gates.append(EnsembleGate(tuple(weights.tolist()), tuple(bias.tolist()), 0.5))
    return gates


def cascade_objective(gate_logits: list[Tensor], exit_losses: Tensor, costs: Tensor, alpha: float) -> Tensor:
    """Mean of ``(1 - alpha) * E[loss] + alpha * E[cost]`` under the cascade's exit distribution.

    ``gate_logits[k]`` (N,) are the early gates' outputs, ``exit_losses`` (N, E) every exit's loss and ``costs`` (E,)
    the normalised cost of leaving at each exit.
    """
    remain = torch.ones_like(exit_losses[:, 0])
    expected_loss = torch.zeros_like(remain)
    expected_cost = torch.zeros_like(remain)
    for k, g in enumerate(torch.sigmoid(x) for x in gate_logits):
        p = remain * g
        expected_loss = expected_loss + p * exit_losses[:, k]
        expected_cost = expected_cost + p * costs[k]
        remain = remain * (1 - g)
    expected_loss = expected_loss + remain * exit_losses[:, -1]
    expected_cost = expected_cost + remain * costs[-1]
    return ((1 - alpha) * expected_loss + alpha * expected_cost).mean()


def fit_cost_gates(exit_logits: list[Tensor], labels: Tensor, costs: list[float], alpha: float, *, epochs: int = 40,
                   max_batches: int | None = None, batch_size: int = 256, lr: float = 1e-2, hidden: int = 16,
                   seed: int = 0, full_flops: float | None = None) -> list[LearnedGate]:
    """The ``cost`` gates of every early exit, trained jointly; ``costs`` are cumulative FLOPs of each exit and
    ``full_flops`` the whole network's (costs are normalised by it; default: the last exit's cost)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    gen = torch.Generator().manual_seed(seed)
    depths = _depths(len(exit_logits))
    features = [gate_features(lg, d) for lg, d in zip(exit_logits[:-1], depths)]
    exit_losses = torch.stack([F.cross_entropy(lg.float(), labels, reduction="none") for lg in exit_logits], dim=1)
    norm_costs = torch.tensor(costs, dtype=torch.float32) / (full_flops or costs[-1])
    mlps = [_standardised_mlp(f, hidden, seed + k) for k, f in enumerate(features)]
    opt = torch.optim.Adam([p for m in mlps for p in m.net.parameters()], lr=lr)
    for _ in range(epochs):
        for idx in _minibatches(len(labels), batch_size, gen, max_batches):
            loss = cascade_objective([m(f[idx]) for m, f in zip(mlps, features)], exit_losses[idx], norm_costs, alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [LearnedGate("cost", m.eval(), d, 0.5, alpha) for m, d in zip(mlps, depths)]


def gate_split(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split ``n`` validation samples into (fit, calibrate) halves: learned gates are fitted on the first and every
    policy's thresholds are calibrated on the second, so no threshold is tuned on the data a gate was fitted to."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return order[: n // 2], order[n // 2:]


def build_policies(exit_logits: list[Tensor], labels: Tensor, costs: list[float], full_flops: float, *, alpha: float,
                   epochs: int, max_batches: int | None, seed: int, target_accuracy: float | None = None,
                   target_drop: float | None = None, budget: float | None = None, method: str = "naive",
                   delta: float = 0.1, bound: str = "wsr", learned: dict[str, list] | None = None,
                   use_agreement: bool = False, order_on: tuple[list[Tensor], Tensor] | None = None) -> dict:
    """Fit the learned policies (those not given in ``learned``) and calibrate every policy on validation logits.

    ``method`` ``naive`` searches the calibration half for the best thresholds; ``ltt`` orders candidate thresholds
    on the fitting half and certifies them on the calibration half, so the target holds on new data with
    probability >= 1 - ``delta``. With ``order_on`` (the logits and labels of other data the validation split is
    independent of: the training split's), ``ltt`` orders the candidates there instead, and certifies the statistic
    policies on the whole validation split, the fitted ones on the half they were not fitted on.
    Returns ``{"policies": {name: [gate dict per early exit]}, "calibration": {name: how it was calibrated and its
    outcome on the data it was certified on}}``. Under ``naive`` the ``cost`` policy keeps its trained decision rule
    (probability >= 0.5): its trade-off is ``alpha``; ``ltt`` certifies its threshold too.
    """
    fit, cal = gate_split(len(labels), seed)
    fit_logits, cal_logits = [lg[fit] for lg in exit_logits], [lg[cal] for lg in exit_logits]
    fitters = {
        "mlp": lambda: fit_mlp_gates(fit_logits, labels[fit], epochs=epochs, max_batches=max_batches, seed=seed,
                                     use_agreement=use_agreement),
        "cost": lambda: fit_cost_gates(fit_logits, labels[fit], costs, alpha, epochs=epochs, max_batches=max_batches,
                                       seed=seed, full_flops=full_flops),
        "ensemble": lambda: fit_ensemble_gates(fit_logits, labels[fit]),
    }
    assert set(fitters) == set(FITTED)
    learned = dict(learned or {})
    for name in FITTED:
        if name not in learned:
            learned[name] = fitters[name]()
    objective = Objective.from_targets(target_accuracy, target_drop, budget, method)
    policies, calibration = {}, {}
    ordered_on_train = method == "ltt" and order_on is not None
    for name in POLICIES:
        # The samples a policy is certified on: never those its gates were fitted on.
        certify_logits, certify_labels = ((exit_logits, labels) if ordered_on_train and name not in FITTED
                                          else (cal_logits, labels[cal]))
        if name == "cost" and method == "naive":
            # Its trade-off is alpha, fixed at fitting; accuracy targets and budgets do not apply to it.
            gates, info = list(learned["cost"]), {"method": "alpha", "objective": "alpha",
                                                  "target": learned["cost"][0].alpha}
        else:
            family = policy_family(name, learned.get(name), len(exit_logits) - 1)
            cal_scores = ExitScores.build(certify_logits, certify_labels, family, costs, full_flops)
            path_logits, path_labels = order_on if ordered_on_train else (fit_logits, labels[fit])
            path = ExitScores.build(path_logits, path_labels, family, costs, full_flops)
            thresholds, info = calibrate_scores(cal_scores, objective, method, delta, bound, path=path)
            if method == "ltt":
                info["ordered_on"] = "train" if ordered_on_train else "val"
            gates = to_gates(family, thresholds)
        outcome = cascade(certify_logits, certify_labels, gates, costs)
        policies[name] = [gate_to_dict(g) for g in gates]
        calibration[name] = {**info, "val_accuracy": outcome["accuracy"], "val_exit_counts": outcome["exit_counts"],
                             "val_flops_fraction": outcome["mean_cost"] / full_flops,
                             "val_samples": len(certify_labels)}
    return {"policies": policies, "calibration": calibration}
