"""Exit thresholds calibrated on a validation split (never the test split), naively or with a guarantee.

Everything is a pure function over cached exit outputs. Candidate thresholds are priced (``priced_thresholds``): at
each exchange rate between FLOPs and answers lost, exit k takes the samples reaching it (those earlier exits declined)
for which leaving saves more computation than the accuracy it costs against where they would otherwise leave, so an
early exit, which saves much, may accept answers a little less sure than a late one; 60 rates and the fractions of
the most cautious give the candidates. (The older family, one accuracy target shared by every exit,
``cascade_thresholds``, remains for the ``per_exit`` objective and the frontier's ``per_exit`` sweep: at the same
certified promise it cost 1.5 to 5 points more FLOPs on the CIFAR-10 reference, docs/benchmarks.md.)

* ``naive`` keeps the candidate that is best on the calibration data itself. Its promise often breaks on new data.
* ``ltt`` (Learn-then-Test) orders the candidates on data the validation split is independent of and tests them in
  that order on validation (``training.risk``): the thresholds it returns meet the target on new data from the same
  distribution with probability >= 1 - delta over the draw of the calibration data. The order comes from the
  training split's exit outputs by default (every validation sample then certifies), or from one half of the
  validation split, certified on the other (``training.policies.build_policies``).

Scores and correctness at exit k see the logits of exits 0..k (``history``), since some policies (``ensemble``, the
``mlp`` gate's agreement feature) read the earlier exits, and the ``ensemble`` answers with its own label.

``python -m training.calibrate --checkpoint FILE [--policy NAME] [--target-accuracy A | --target-drop D |
--budget-flops B] [--method ltt|naive] [--delta 0.1] [--order-on train|val] [--refit]`` re-calibrates a trained
checkpoint in place; fitted policies the checkpoint lacks are fitted first, and ``--refit`` fits all of them again.
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
from common.model.gates import (POLICY_NAMES, THRESHOLD_GATES, ConstantGate, EnsembleGate, Gate, LearnedGate,
                                answer_stats, needs_history, softmax_stats, threshold_gate)
from training.config import check_targets
from training.risk import BOUNDS, fixed_sequence, pvalue

POLICIES = POLICY_NAMES
FITTED = tuple(p for p in POLICIES if p not in THRESHOLD_GATES)  # policies with weights fitted on validation logits
_TEMPLATE = {"mlp": LearnedGate, "cost": LearnedGate, "ensemble": EnsembleGate}


def history_at(exit_logits: list[Tensor], k: int) -> Tensor:
    """``(N, k + 1, K)``: the logits of exits 0..k, earliest first, exit k's last (what a gate's ``history`` is)."""
    return torch.stack(exit_logits[:k + 1], dim=1)


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
    """One early exit's policy as a family of gates indexed by a threshold on a score (higher = more willing).
    ``score`` takes the ``history`` of exit k (``history_at``), so it may read the earlier exits."""

    score: Callable[[Tensor], np.ndarray]
    make: Callable[[float], Gate]
    never: Callable[[], Gate] = lambda: ConstantGate(False)  # the gate of a threshold no sample reaches

    def answers(self, history: Tensor) -> Tensor:
        """The label this exit answers each sample with (the same for every threshold): ``answer_stats``'."""
        gate = self.never()
        return answer_stats(gate, history[:, -1], history)["label"]


def policy_family(policy: str, templates: list[Gate] | None = None, num_early: int = 2) -> list[Thresholdable]:
    """The thresholdable form of ``policy`` for each early exit. Learned policies need their fitted ``templates``."""
    if policy in THRESHOLD_GATES:
        direction = THRESHOLD_GATES[policy][1]
        fam = Thresholdable(lambda h: gate_score(h[:, -1], policy), lambda t: threshold_gate(policy, t * direction))
        return [fam] * num_early
    if policy in FITTED and templates and all(isinstance(g, _TEMPLATE[policy]) for g in templates):
        # A fitted gate that may exit nothing keeps its weights (re-calibration and alpha need them) with a
        # threshold no probability reaches.
        return [Thresholdable(lambda h, g=g: _probability(g, h), g.with_threshold, lambda g=g: g.with_threshold(2.0))
                for g in templates]
    raise ConfigError(f"cannot calibrate policy {policy!r}" + (" without its fitted gates" if policy in FITTED else
                      f"; use one of {', '.join(POLICIES)}"))


def _probability(gate: LearnedGate | EnsembleGate, history: Tensor) -> np.ndarray:
    """The score a fitted gate thresholds: the MLP's probability, or the ensemble's maximum probability."""
    logits = history[:, -1]
    if isinstance(gate, EnsembleGate):
        return gate.answer_stats(logits, history)["confidence"].double().numpy()
    return gate.probability(logits, history=history).double().numpy()


def bundle_families(bundles: list) -> dict[str, list[Thresholdable]]:
    """Every policy the loaded tier bundles (``common.model.bundle.TierBundle``, in order) can threshold: the statistic
    gates, and the fitted ``mlp`` / ``cost`` / ``ensemble`` gates the early tiers all store."""
    early = [b for b in bundles if b.manifest.num_early]  # the tiers holding early exits
    num_early = sum(b.manifest.num_early for b in early)
    stored = set.intersection(*(set(b.manifest.policies) for b in early))
    families = {kind: policy_family(kind, num_early=num_early) for kind in THRESHOLD_GATES}
    for kind in FITTED:
        if kind in stored:
            families[kind] = policy_family(kind, [g for b in early for g in b.policy_gates(kind)], num_early)
    return families


@dataclass(frozen=True)
class ExitScores:
    """What calibration needs from cached exit outputs, as arrays: each early exit's gate score (higher = more
    willing to exit), the label every exit answers with under the policy (the ensemble's for ``ensemble``), the
    labels, and the cumulative cost of leaving at each exit.

    A thresholded gate made by ``Thresholdable.make(t)`` accepts exactly the samples whose score is ``>= t``, so
    the cascade of any threshold vector can be simulated without touching the logits again.
    """

    scores: np.ndarray  # (early exits, N), float64
    preds: np.ndarray   # (exits, N)
    labels: np.ndarray  # (N,)
    costs: np.ndarray   # (exits,)
    full: float         # the whole network's cost (costs are reported as a fraction of it)
    # Per-sample correctness that a drop is measured against; None: the final exit's own. The planner sets it to
    # the float32 network's when a lossy link codec changes what the later exits see.
    reference: np.ndarray | None = None

    @classmethod
    def build(cls, exit_logits: list[Tensor], labels: Tensor, family: list[Thresholdable], costs: list[float],
              full: float | None = None) -> "ExitScores":
        histories = [history_at(exit_logits, k) for k in range(len(family))]
        scores = np.stack([fam.score(h) for fam, h in zip(family, histories)]).reshape(len(family), -1)
        preds = torch.stack([fam.answers(h) for fam, h in zip(family, histories)]
                            + [exit_logits[-1].argmax(1)]).numpy()
        return cls(scores, preds, labels.numpy(), np.asarray(costs, dtype=np.float64),
                   float(costs[-1] if full is None else full))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "ExitScores":
        return ExitScores(self.scores[:, idx], self.preds[:, idx], self.labels[idx], self.costs, self.full,
                          None if self.reference is None else self.reference[idx])

    def reference_correct(self) -> np.ndarray:
        """Which samples the reference answers correctly (the final exit unless ``reference`` is set)."""
        return self.preds[-1] == self.labels if self.reference is None else self.reference

    def exit_of(self, thresholds: list[float | None]) -> np.ndarray:
        """Exit index each sample leaves at; ``None`` is a gate that never accepts."""
        out = np.full(len(self), len(self.preds) - 1)
        remaining = np.ones(len(self), dtype=bool)
        for k, t in enumerate(thresholds):
            if t is None:
                continue
            take = remaining & (self.scores[k] >= t)
            out[take] = k
            remaining &= ~take
        return out

    def correct_at(self, exit_of: np.ndarray) -> np.ndarray:
        return self.preds[exit_of, np.arange(len(self))] == self.labels

    def outcome(self, thresholds: list[float | None]) -> dict:
        """Accuracy, accuracy drop against the final exit (points), mean cost fraction and exit counts."""
        exit_of = self.exit_of(thresholds)
        acc = float(self.correct_at(exit_of).mean())
        final = float(self.reference_correct().mean())
        return {"accuracy": acc, "drop": 100 * (final - acc),
                "flops_fraction": float(self.costs[exit_of].mean()) / self.full,
                "exit_counts": np.bincount(exit_of, minlength=len(self.preds)).tolist()}


def cascade_thresholds(es: ExitScores, target: float) -> list[float | None]:
    """Exits in cascade order, each at the lowest threshold whose accepted samples (among those earlier exits
    declined) reach ``target`` accuracy; ``None`` where no threshold does."""
    remaining = np.ones(len(es), dtype=bool)
    out: list[float | None] = []
    for k in range(len(es.scores)):
        idx = np.nonzero(remaining)[0]
        t = coverage_threshold(es.scores[k, idx], es.preds[k, idx] == es.labels[idx], target)
        out.append(t)
        if t is not None:
            remaining &= ~(es.scores[k] >= t)
    return out


def to_gates(family: list[Thresholdable], thresholds: list[float | None]) -> list[Gate]:
    return [fam.never() if t is None else fam.make(t) for fam, t in zip(family, thresholds)]


METHODS = ("naive", "ltt")


@dataclass(frozen=True)
class Objective:
    """What calibration promises. ``kind``: ``drop`` (accuracy within ``value`` points of the final exit),
    ``accuracy`` (accuracy >= ``value``), ``budget`` (mean FLOPs <= ``value`` of the whole network) or
    ``per_exit`` (naive only: every early exit keeps the final exit's accuracy on what it accepts)."""

    kind: str
    value: float | None = None

    @classmethod
    def from_targets(cls, target_accuracy: float | None = None, target_drop: float | None = None,
                     budget: float | None = None, method: str = "naive") -> "Objective":
        check_targets(target_accuracy, target_drop, budget)
        if target_drop is not None:
            return cls("drop", target_drop)
        if target_accuracy is not None:
            return cls("accuracy", target_accuracy)
        if budget is not None:
            return cls("budget", budget)
        return cls("drop", 1.0) if method == "ltt" else cls("per_exit")

    def met(self, outcome: dict, final_accuracy: float) -> bool:
        if self.kind == "drop":
            return outcome["accuracy"] >= final_accuracy - self.value / 100 - 1e-12  # 0.98 - 0.01 admits 0.97
        if self.kind == "accuracy":
            return outcome["accuracy"] >= self.value - 1e-12
        return outcome["flops_fraction"] <= self.value + 1e-12

    def losses(self, es: ExitScores, thresholds: list[float | None]) -> tuple[np.ndarray, float]:
        """Per-sample losses in [0, 1] and the bound their mean must stay under for the promise to hold."""
        exit_of = es.exit_of(thresholds)
        if self.kind == "drop":  # (final right - answer right + 1) / 2, mean <= (1 + D) / 2  <=>  drop <= D
            diff = es.reference_correct().astype(np.float64) - es.correct_at(exit_of)
            return (diff + 1) / 2, (1 + self.value / 100) / 2
        if self.kind == "accuracy":
            return (~es.correct_at(exit_of)).astype(np.float64), 1 - self.value
        top = float(es.costs.max())
        return es.costs[exit_of] / top, self.value * es.full / top

    def describe(self) -> dict:
        return {"objective": {"drop": "target_drop", "accuracy": "target_accuracy", "budget": "budget_flops",
                              "per_exit": "target_accuracy_per_exit"}[self.kind], "target": self.value}


def isotonic_rising(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted least-squares non-decreasing fit of ``values`` (pool adjacent violators), one value per input."""
    means: list[float] = []
    mass: list[float] = []
    sizes: list[int] = []
    for v, w in zip(values.tolist(), weights.tolist()):
        m, wt, size = v, w, 1
        while means and means[-1] > m:  # pool with the previous block until the fit rises
            pm, pw = means.pop(), mass.pop()
            m, wt, size = (pm * pw + m * wt) / (pw + wt), pw + wt, size + sizes.pop()
        means.append(m)
        mass.append(wt)
        sizes.append(size)
    return np.repeat(np.asarray(means), sizes)


def _best_prefix(scores: np.ndarray, saving: np.ndarray, loss: np.ndarray, price: float) -> float | None:
    """The threshold (accept ``score >= t``) maximising FLOPs saved minus ``price`` times answers lost over the
    accepted samples, with the loss smoothed into a rate that rises as the score falls; ``None``: accept nothing."""
    if len(scores) == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    ends = np.append(np.nonzero(s[1:] < s[:-1])[0], len(s) - 1)  # last position of each group of equal scores
    starts = np.concatenate([[0], ends[:-1] + 1])
    sizes = (ends - starts + 1).astype(np.float64)
    group_loss = np.add.reduceat(loss[order], starts) / sizes
    group_saving = np.add.reduceat(saving[order], starts)
    gain = np.cumsum(group_saving - price * sizes * isotonic_rising(group_loss, sizes))
    best = int(np.argmax(gain))
    return float(s[ends[best]]) if gain[best] > 0 else None


def priced_thresholds(es: ExitScores, price: float, sweeps: int = 2) -> list[float | None]:
    """Per-exit thresholds that trade computation for accuracy at one exchange rate: ``price`` is how many whole
    networks' FLOPs one answer lost is worth.

    Exit k accepts the samples reaching it (those earlier exits decline) whose score puts them where leaving saves
    more FLOPs - against where the later exits under their current thresholds would answer them - than ``price``
    times the answers it loses there (answered wrongly at k but rightly later, minus the reverse). The rate of loss
    is smoothed by an isotonic fit in the score, so a few lucky samples do not move a threshold. Exits are set from
    the last to the first, ``sweeps`` times, each seeing the others' current thresholds. Unlike one accuracy target
    for every exit, an exit that saves much (an early one) may accept answers a little less sure than one that saves
    little."""
    n, num_early = len(es), len(es.scores)
    right = es.preds == es.labels
    thresholds: list[float | None] = [None] * num_early
    for _ in range(sweeps):
        for k in reversed(range(num_early)):
            later = ExitScores(es.scores[k + 1:], es.preds[k + 1:], es.labels, es.costs[k + 1:], es.full)
            then = k + 1 + later.exit_of(thresholds[k + 1:])  # where a sample exit k declines would leave
            reach = es.exit_of(thresholds[:k] + [None] * (num_early - k)) == len(es.preds) - 1
            saving = (es.costs[then] - es.costs[k]) / es.full
            loss = right[then, np.arange(n)].astype(np.float64) - right[k]
            thresholds[k] = _best_prefix(es.scores[k, reach], saving[reach], loss[reach], price)
    return thresholds


def cautious_part(es: ExitScores, thresholds: list[float | None], fraction: float) -> list[float | None]:
    """Thresholds that keep, at every exit, the best-scored ``fraction`` of the samples ``thresholds`` accept there."""
    out: list[float | None] = []
    remaining = np.ones(len(es), dtype=bool)
    for k, t in enumerate(thresholds):
        taken = np.sort(es.scores[k, remaining])[::-1]
        keep = int(fraction * np.count_nonzero(taken >= t)) if t is not None else 0
        out.append(float(taken[keep - 1]) if keep else None)
        if keep:
            remaining &= ~(es.scores[k] >= out[-1])
    return out


PRICES = np.geomspace(1000.0, 0.1, 60)  # FLOPs of whole networks one lost answer is worth, most cautious first
CAUTIOUS_STEPS = np.linspace(0.0, 1.0, 41)[1:-1]


def candidate_thresholds(es: ExitScores) -> list[list[float | None]]:
    """Threshold vectors worth considering, from "never exit early" to "everything leaves at the first exit", without
    duplicates: ``priced_thresholds`` at each price of ``PRICES``, preceded by fractions of the most cautious of them
    (``cautious_part``), so that a certification testing them in this order has small steps to take at first."""
    out = [[None] * len(es.scores)]
    priced = [priced_thresholds(es, float(p)) for p in PRICES]
    for th in [cautious_part(es, priced[0], float(f)) for f in CAUTIOUS_STEPS] + priced:
        if th not in out:
            out.append(th)
    return out


def naive_thresholds(es: ExitScores, objective: Objective) -> tuple[list[float | None], dict]:
    """The best thresholds on ``es`` itself: the cheapest that meet a drop or accuracy target, the most accurate
    that fit a budget. No guarantee beyond the data searched."""
    final_acc = float(es.reference_correct().mean())
    info = {"method": "naive", **objective.describe(), "final_accuracy": final_acc, "samples": len(es)}
    if objective.kind == "per_exit":
        info["target"] = final_acc
        return cascade_thresholds(es, final_acc), info
    scored = [(es.outcome(th), th) for th in candidate_thresholds(es)]
    feasible = [(o, th) for o, th in scored if objective.met(o, final_acc)]
    if not feasible:
        raise ConfigError(_infeasible(objective, final_acc))
    if objective.kind == "budget":
        best = max(feasible, key=lambda oth: (oth[0]["accuracy"], -oth[0]["flops_fraction"]))
    else:
        best = min(feasible, key=lambda oth: (oth[0]["flops_fraction"], -oth[0]["accuracy"]))
    return best[1], info


def _infeasible(objective: Objective, final_acc: float) -> str:
    if objective.kind == "budget":
        return f"no thresholds fit a budget of {objective.value:.1%} of the network's FLOPs on this data"
    return (f"no thresholds reach an accuracy of {objective.value:.4f} on this data (the final exit alone scores "
            f"{final_acc:.4f})")


def ltt_thresholds(path: ExitScores, test: ExitScores, objective: Objective, delta: float = 0.1,
                   bound: str = "wsr") -> tuple[list[float | None], dict]:
    """Thresholds whose promise holds on new data with probability >= 1 - ``delta`` (Learn-then-Test).

    ``path`` (data independent of ``test``) orders the candidate threshold vectors from the safest to the most
    aggressive: by decreasing mean cost for drop and accuracy targets, by increasing cost for a budget. On
    ``test`` each candidate's null hypothesis "the promise is broken" is tested at level ``delta`` in that order
    (fixed-sequence testing); the last candidate rejected before the first failure is returned. Assumes the
    test data and the data served later are exchangeable (drawn from the same distribution).
    """
    if objective.kind == "per_exit":
        raise ConfigError("guaranteed calibration needs a target: --target-drop, --target-accuracy or --budget-flops")
    cands = candidate_thresholds(path)
    cost = {i: path.outcome(th)["flops_fraction"] for i, th in enumerate(cands)}
    order = sorted(range(len(cands)), key=lambda i: (cost[i] if objective.kind == "budget" else -cost[i], i))
    ordered = [cands[i] for i in order]
    # Never exiting early loses exactly nothing against the final exit: safe without a test (not so against
    # another reference).
    safe_first = objective.kind == "drop" and test.reference is None
    if safe_first:
        ordered.remove([None] * len(path.scores))
        ordered.insert(0, [None] * len(path.scores))
    pvals: list[float] = []

    def lazy():
        for k, th in enumerate(ordered):
            if k == 0 and safe_first:
                p = 0.0
            else:
                losses, limit = objective.losses(test, th)
                p = pvalue(losses, limit, bound, delta) if limit < 1 else 0.0
            pvals.append(p)
            yield p

    rejected = fixed_sequence(lazy(), delta)
    final_acc = float(test.reference_correct().mean())
    info = {"method": "ltt", **objective.describe(), "delta": delta, "bound": bound, "final_accuracy": final_acc,
            "samples": len(test), "path_samples": len(path), "candidates": len(ordered),
            "certified": rejected}
    if rejected == 0:
        raise ConfigError(f"nothing can be certified at delta={delta}: " + _infeasible(objective, final_acc)
                          + f" with {len(test)} calibration samples")
    info["p_value"] = pvals[rejected - 1]
    return ordered[rejected - 1], info


def calibrate_scores(es: ExitScores, objective: Objective, method: str = "naive", delta: float = 0.1,
                     bound: str = "wsr", path: ExitScores | None = None) -> tuple[list[float | None], dict]:
    """Thresholds by ``method``: ``naive`` searches ``es``; ``ltt`` orders candidates on ``path`` and certifies
    them on ``es``."""
    if method == "naive":
        return naive_thresholds(es, objective)
    if method != "ltt":
        raise ConfigError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must lie in (0, 1), got {delta}")
    if path is None:
        raise ConfigError("guaranteed calibration needs separate data to order its candidates")
    return ltt_thresholds(path, es, objective, delta, bound)


def cascade_answers(exit_logits: list[Tensor], gates: list[Gate]) -> tuple[Tensor, Tensor]:
    """The exit each sample leaves at and the label it is answered with when ``gates`` guard the early exits, as the
    tiers decide: ``answer_stats`` of the exit, then the gate, the history given to the gates that need it."""
    n = len(exit_logits[0])
    exit_of = torch.full((n,), len(exit_logits) - 1, dtype=torch.long)
    answer = exit_logits[-1].argmax(1)
    remaining = torch.ones(n, dtype=torch.bool)
    for k, (logits, gate) in enumerate(zip(exit_logits[:-1], gates)):
        history = history_at(exit_logits, k) if needs_history(gate) else None
        stats = answer_stats(gate, logits, history)
        take = remaining & gate(logits, stats, history)
        exit_of[take] = k
        answer = torch.where(take, stats["label"], answer)
        remaining &= ~take
    return exit_of, answer


def cascade(exit_logits: list[Tensor], labels: Tensor, gates: list[Gate],
            exit_costs: list[float] | None = None) -> dict:
    """Simulate the deployed cascade on cached logits: accuracy, exits per exit index and, given the cumulative
    cost of leaving at each exit, the mean cost per sample."""
    n = len(labels)
    exit_of, preds = cascade_answers(exit_logits, gates)
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
                      help="cheapest thresholds whose accuracy is at least this")
    goal.add_argument("--target-drop", type=float, default=None,
                      help="cheapest thresholds within this many accuracy points of the final exit")
    goal.add_argument("--budget-flops", type=float, default=None,
                      help="most accurate thresholds within this fraction of the network's FLOPs")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="ltt: certify the target on new data with probability >= 1 - delta; naive: best thresholds "
                        "on validation data, no guarantee (default: the checkpoint's)")
    p.add_argument("--delta", type=float, default=None, help="ltt: allowed probability that the promise fails")
    p.add_argument("--bound", choices=BOUNDS, default=None, help="ltt: concentration bound (default wsr)")
    p.add_argument("--order-on", choices=("train", "val"), default=None, dest="calibration_order",
                   help="ltt: put candidate thresholds in order on the training split (the statistic policies are "
                        "then certified on all of validation) or on half of validation (default: the checkpoint's, "
                        "else train)")
    p.add_argument("--refit", action="store_true",
                   help=f"fit the learned policies ({', '.join(FITTED)}) again on the validation split instead of "
                        "keeping the checkpoint's (those it lacks are always fitted)")
    p.add_argument("--gate-agreement", action=argparse.BooleanOptionalAction, default=None,
                   help="mlp gates fitted here use the agreement feature (default: the checkpoint's setting, else no)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Re-calibrate every policy of a checkpoint and save it: stored fitted gates are kept (only their thresholds
    move) unless ``--refit``; fitted policies the checkpoint lacks (e.g. ones newer than it) are fitted first."""
    from common.model.gates import gate_from_dict
    from training import checkpoint
    from training.config import TrainConfig
    from training.train import fit_and_calibrate

    args = get_args_parser().parse_args(argv)
    model, meta = checkpoint.load(args.checkpoint)
    # The targets are the command's (none: the default objective), not the ones the checkpoint was calibrated to.
    saved = {**meta["config"], "target_accuracy": args.target_accuracy, "target_drop": args.target_drop,
             "budget_flops": args.budget_flops}
    cfg = TrainConfig.from_checkpoint(saved, "re-calibrate", policy=args.policy, data=args.data,
                                      calibration=args.method, delta=args.delta, bound=args.bound,
                                      gate_agreement=args.gate_agreement, calibration_order=args.calibration_order)
    stored = {} if args.refit else (meta.get("policies") or {})
    # Keep the fitted gates the checkpoint has; only their thresholds are re-calibrated.
    learned = {k: [gate_from_dict(g).with_threshold(0.5) for g in stored[k]] for k in FITTED if k in stored}
    missing = [k for k in FITTED if k not in learned]
    if missing:
        print(f"fitting {', '.join(missing)} on the validation split" + (" (--refit)" if args.refit else ""))
    val = cfg.load_split("val")
    train_set = cfg.load_split("train") if cfg.calibration == "ltt" and cfg.calibration_order == "train" else None
    meta.update(fit_and_calibrate(model, val, cfg, learned, train_set))
    meta["config"] = {**meta["config"], "target_accuracy": cfg.target_accuracy, "target_drop": cfg.target_drop,
                      "budget_flops": cfg.budget_flops, "policy": cfg.policy, "calibration": cfg.calibration,
                      "delta": cfg.delta, "bound": cfg.bound, "gate_agreement": cfg.gate_agreement,
                      "calibration_order": cfg.calibration_order}
    checkpoint.save(model, meta, args.checkpoint)
    print(f"calibrated on {len(val)} validation samples of {cfg.data}; active policy {cfg.policy}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
