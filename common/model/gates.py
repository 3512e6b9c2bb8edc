"""Exit gates: pure, batch-aware policies that map a batch of exit logits to a boolean "may exit" mask.

A gate never sees the network; it sees the logits of the exit it guards and, if it ``needs_history``, the logits of
the earlier exits too (``history``, ``(N, k + 1, K)``: exits 0..k of the model, earliest first, this exit's last).
Gates serialise to a small dict (``{"kind": "confidence", "threshold": 0.9}``) stored in each tier's manifest and are
rebuilt by ``gate_from_dict``. A tier answers an exiting sample with ``answer_stats(gate, logits, history)``: its own
softmax for every gate but ``ensemble``, whose answer is the ensemble's.

Thresholded gates compare one softmax statistic with a threshold. Learned gates (``mlp``, ``cost``) run a tiny MLP
over statistics of the exit's logits (``mlp`` optionally also over whether this exit agrees with the previous one)
and exit when its output probability reaches a threshold. The ``ensemble`` gate answers with a weighted geometric
ensemble of the exits so far and exits when the ensemble is confident. Weights travel in the manifest as JSON numbers,
so a bundle never carries pickled code. They are fitted in ``training.policies``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from common.errors import ConfigError


def softmax_stats(logits: Tensor) -> dict[str, Tensor]:
    """Per-sample statistics of a batch of logits ``(N, K)``: confidence, label, normalised entropy, margin."""
    probs = torch.softmax(logits.float(), dim=1)
    top = probs.topk(min(2, probs.shape[1]), dim=1)
    confidence, label = top.values[:, 0], top.indices[:, 0]
    margin = confidence - top.values[:, 1] if probs.shape[1] > 1 else confidence
    logp = torch.log(probs.clamp_min(1e-12))
    entropy = -(probs * logp).sum(dim=1) / math.log(max(probs.shape[1], 2))
    return {"confidence": confidence, "label": label, "entropy": entropy, "margin": margin}


Stats = dict[str, Tensor]  # what ``softmax_stats`` returns


class Gate(Protocol):
    """``gate(logits, stats, history)`` -> boolean mask of the samples that may exit. ``stats``, when the caller
    already has ``answer_stats(gate, logits, history)`` (the tier runtime needs them for its answers), saves the gate
    computing them again. ``history`` (``(N, k + 1, K)``, exits 0..k, ``history[:, -1]`` equal to ``logits``) is
    required by gates whose ``needs_history`` is true and ignored by the others."""

    kind: str
    needs_history: bool

    def __call__(self, logits: Tensor, stats: Stats | None = None, history: Tensor | None = None) -> Tensor: ...

    def params(self) -> dict[str, float]: ...


POLICY_NAMES = ("confidence", "entropy", "margin", "mlp", "cost", "ensemble")
# Thresholded gates as (statistic, direction): a sample exits when ``direction * (stat - threshold) >= 0``.
THRESHOLD_GATES = {"confidence": ("confidence", 1), "entropy": ("entropy", -1), "margin": ("margin", 1)}


@dataclass(frozen=True)
class _ThresholdGate:
    """Compare one softmax statistic with ``threshold``; subclasses name the statistic via ``kind``."""

    threshold: float
    kind = ""
    needs_history = False

    def __call__(self, logits: Tensor, stats: Stats | None = None, history: Tensor | None = None) -> Tensor:
        stat, direction = THRESHOLD_GATES[self.kind]
        value = (stats or softmax_stats(logits))[stat]
        return value >= self.threshold if direction > 0 else value <= self.threshold

    def params(self) -> dict[str, float]:
        return {"threshold": self.threshold}


class ConfidenceGate(_ThresholdGate):
    """Exit when the maximum softmax probability is at least ``threshold`` (BranchyNet-style confidence)."""

    kind = "confidence"


class EntropyGate(_ThresholdGate):
    """Exit when the softmax entropy, normalised to [0, 1] by log(K), is at most ``threshold``."""

    kind = "entropy"


class MarginGate(_ThresholdGate):
    """Exit when the top-1 softmax probability beats the runner-up by at least ``threshold``."""

    kind = "margin"


def check_history(history: Tensor | None, logits: Tensor, exits: int, kind: str) -> Tensor:
    """``history`` as a float tensor, or a ``ConfigError`` saying why a gate that needs the logits of exits 0..k
    (``exits`` = k + 1 of them) cannot use it: missing, or the wrong shape for ``logits``."""
    if history is None:
        raise ConfigError(f"the {kind!r} gate of exit {exits - 1} needs the logits of exits 0..{exits - 1} (history); "
                          "none were given")
    if history.dim() != 3 or history.shape[1] != exits or history.shape[0] != logits.shape[0] \
            or history.shape[2] != logits.shape[1]:
        raise ConfigError(f"the {kind!r} gate of exit {exits - 1} needs a history of shape (N, {exits}, K) = "
                          f"({logits.shape[0]}, {exits}, {logits.shape[1]}), got {tuple(history.shape)}")
    return history.float()


def needs_history(gate: Gate) -> bool:
    """Whether ``gate`` must be called with the logits of the earlier exits (``history``)."""
    return bool(getattr(gate, "needs_history", False))


def answer_stats(gate: Gate, logits: Tensor, history: Tensor | None = None) -> Stats:
    """The statistics (``softmax_stats`` keys) of the answer a tier gives at this exit under ``gate``: the exit's own
    softmax, or, for a gate that answers otherwise (``ensemble``), its own distribution's."""
    own = getattr(gate, "answer_stats", None)
    return own(logits, history) if own is not None else softmax_stats(logits)


GATE_FEATURES = ("confidence", "entropy", "margin", "depth", "logit_norm")
# The agreement feature (PABEE-style): 1 when this exit's argmax is the previous exit's; 1 at the first exit.
AGREEMENT = "agreement"


def gate_features(logits: Tensor, depth: float, stats: Stats | None = None) -> Tensor:
    """``(N, 5)`` inputs of a learned gate: max probability, normalised entropy, margin, normalised depth of the
    exit (0 = first, 1 = last), and the L2 norm of the logits."""
    s = stats or softmax_stats(logits)
    cols = [s["confidence"], s["entropy"], s["margin"], torch.full_like(s["margin"], float(depth)),
            logits.float().norm(dim=1)]
    return torch.stack(cols, dim=1)


def agreement(history: Tensor) -> Tensor:
    """``(N,)`` 1.0 where the last exit of ``history`` predicts what the exit before it predicts (1.0 at exit 0)."""
    if history.shape[1] < 2:
        return torch.ones(history.shape[0])
    return (history[:, -1].argmax(1) == history[:, -2].argmax(1)).float()


class GateMLP(torch.nn.Module):
    """Standardise the gate features, then Linear -> ReLU -> Linear -> one logit (probability of exiting).
    ``features`` is 5 (``GATE_FEATURES``) or 6 (and ``AGREEMENT``)."""

    def __init__(self, hidden: int = 16, features: int = len(GATE_FEATURES)) -> None:
        super().__init__()
        if features not in (len(GATE_FEATURES), len(GATE_FEATURES) + 1):
            raise ConfigError(f"a learned gate takes {len(GATE_FEATURES)} or {len(GATE_FEATURES) + 1} features, "
                              f"got {features}")
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.net = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    @property
    def uses_agreement(self) -> bool:
        return len(self.mean) > len(GATE_FEATURES)

    def forward(self, features: Tensor) -> Tensor:
        return self.net((features - self.mean) / self.std).squeeze(1)

    def to_dict(self) -> dict[str, list]:
        return {k: v.detach().flatten().tolist() for k, v in self.state_dict().items()}

    @classmethod
    def from_dict(cls, d: dict) -> "GateMLP":
        """Rebuild from ``to_dict``'s form; the feature count is read from the stored ``mean`` (older bundles: 5)."""
        try:
            hidden, features = len(d["net.0.bias"]), len(d["mean"])
            mlp = cls(hidden, features)
            state = {k: torch.tensor(d[k], dtype=torch.float32).view_as(v) for k, v in mlp.state_dict().items()}
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"learned gate weights are malformed: {e}") from None
        if not all(torch.isfinite(t).all() for t in state.values()) or not bool((state["std"] > 0).all()):
            raise ConfigError("learned gate weights must be finite with positive feature scales")
        mlp.load_state_dict(state)
        return mlp.eval()


@dataclass(frozen=True, eq=False)
class LearnedGate:
    """Exit when the gate MLP's probability for this exit is at least ``threshold``.

    ``kind`` is ``mlp`` (trained to predict whether the exit's answer is right) or ``cost`` (trained, together with
    the other exits' gates, to minimise ``(1 - alpha) * loss + alpha * normalised FLOPs``; ``alpha`` records which).
    An MLP over the agreement feature needs ``history`` and records its global exit index ``exit``.
    """

    kind: str
    mlp: GateMLP
    depth: float
    threshold: float = 0.5
    alpha: float | None = None
    exit: int | None = None

    def __post_init__(self) -> None:
        if self.mlp.uses_agreement and self.exit is None:
            raise ConfigError(f"a learned {self.kind!r} gate over the agreement feature needs its exit index")
        if not self.mlp.uses_agreement and self.exit is not None:
            raise ConfigError(f"a learned {self.kind!r} gate without the agreement feature takes no exit index")

    @property
    def needs_history(self) -> bool:
        return self.mlp.uses_agreement

    def features(self, logits: Tensor, stats: Stats | None = None, history: Tensor | None = None) -> Tensor:
        """The MLP's inputs: ``gate_features`` and, for an agreement gate, ``agreement`` of the checked history."""
        base = gate_features(logits, self.depth, stats)
        if not self.needs_history:
            return base
        h = check_history(history, logits, self.exit + 1, self.kind)
        return torch.cat([base, agreement(h)[:, None]], dim=1)

    def probability(self, logits: Tensor, stats: Stats | None = None, history: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            return torch.sigmoid(self.mlp(self.features(logits, stats, history)))

    def __call__(self, logits: Tensor, stats: Stats | None = None, history: Tensor | None = None) -> Tensor:
        return self.probability(logits, stats, history) >= self.threshold

    def with_threshold(self, threshold: float) -> "LearnedGate":
        return LearnedGate(self.kind, self.mlp, self.depth, threshold, self.alpha, self.exit)

    def params(self) -> dict:
        out = {"threshold": self.threshold, "depth": self.depth, "weights": self.mlp.to_dict()}
        if self.alpha is not None:
            out["alpha"] = self.alpha
        if self.exit is not None:
            out["exit"] = self.exit
        return out


def _learned(kind: str):
    def build(p: dict) -> LearnedGate:
        alpha = _number(p, "alpha") if kind == "cost" else None
        exit_index = _index(p, "exit") if "exit" in p else None
        return LearnedGate(kind, GateMLP.from_dict(p["weights"]), _number(p, "depth"), _threshold(p), alpha,
                           exit_index)

    return build


@dataclass(frozen=True, eq=False)
class EnsembleGate:
    """Zero Time Waste's geometric ensemble (Wolczyk et al., NeurIPS 2021) of the exits so far, at exit k:
    ``log q = sum_{j <= k} weights[j] * log_softmax(z_j) + bias``; the answer is ``softmax(log q)`` and a sample
    exits when its maximum probability is at least ``threshold``. ``weights`` one-hot on exit k with a zero ``bias``
    is the plain ``confidence`` gate."""

    weights: tuple[float, ...]
    bias: tuple[float, ...]
    threshold: float
    kind = "ensemble"
    needs_history = True

    @property
    def exit(self) -> int:
        return len(self.weights) - 1

    def log_q(self, logits: Tensor, history: Tensor | None) -> Tensor:
        """The ensemble's unnormalised log-probabilities ``(N, K)``."""
        h = check_history(history, logits, len(self.weights), self.kind)
        if h.shape[2] != len(self.bias):
            raise ConfigError(f"the ensemble gate of exit {self.exit} has a bias for {len(self.bias)} classes, "
                              f"the logits have {h.shape[2]}")
        w = torch.tensor(self.weights, dtype=torch.float32)
        return (torch.log_softmax(h, dim=2) * w[None, :, None]).sum(1) + torch.tensor(self.bias, dtype=torch.float32)

    def answer_stats(self, logits: Tensor, history: Tensor | None = None) -> Stats:
        return softmax_stats(self.log_q(logits, history))

    def __call__(self, logits: Tensor, stats: Stats | None = None, history: Tensor | None = None) -> Tensor:
        # The ensemble's own confidence, recomputed from the history (cheap) rather than trusted from ``stats``:
        # stats of the exit's own softmax would otherwise be thresholded silently.
        return self.answer_stats(logits, history)["confidence"] >= self.threshold

    def with_threshold(self, threshold: float) -> "EnsembleGate":
        return EnsembleGate(self.weights, self.bias, threshold)

    def params(self) -> dict:
        return {"threshold": self.threshold, "weights": list(self.weights), "bias": list(self.bias)}


def _numbers(p: dict, key: str) -> tuple[float, ...]:
    v = p[key]
    if not isinstance(v, list) or not v or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        raise ConfigError(f"gate {key} must be a non-empty list of finite numbers, got {v!r:.80}")
    return tuple(float(x) for x in v)


def _ensemble(p: dict) -> EnsembleGate:
    return EnsembleGate(_numbers(p, "weights"), _numbers(p, "bias"), _threshold(p))


@dataclass(frozen=True)
class ConstantGate:
    """Exit every sample (``always``) or none (``never``); useful to pin a deployment's routing."""

    exit_all: bool

    @property
    def kind(self) -> str:
        return "always" if self.exit_all else "never"

    needs_history = False

    def __call__(self, logits: Tensor, stats: Stats | None = None, history: Tensor | None = None) -> Tensor:
        return torch.full((logits.shape[0],), self.exit_all, dtype=torch.bool)

    def params(self) -> dict[str, float]:
        return {}


def _number(p: dict, key: str) -> float:
    t = p[key]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ConfigError(f"gate {key} must be a finite number, got {t!r}")
    return float(t)


def _threshold(p: dict) -> float:
    return _number(p, "threshold")


def _index(p: dict, key: str) -> int:
    t = p[key]
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ConfigError(f"gate {key} must be a non-negative integer, got {t!r}")
    return t


_FACTORIES: dict[str, Callable[[dict], Gate]] = {
    "confidence": lambda p: ConfidenceGate(_threshold(p)),
    "entropy": lambda p: EntropyGate(_threshold(p)),
    "margin": lambda p: MarginGate(_threshold(p)),
    "mlp": _learned("mlp"),
    "cost": _learned("cost"),
    "always": lambda p: ConstantGate(True),
    "never": lambda p: ConstantGate(False),
    "ensemble": _ensemble,
}
_PARAMS = {"confidence": {"threshold"}, "entropy": {"threshold"}, "margin": {"threshold"}, "always": set(),
           "never": set(), "mlp": {"threshold", "depth", "weights"}, "cost": {"threshold", "depth", "weights", "alpha"},
           "ensemble": {"threshold", "weights", "bias"}}
# Parameters a kind may carry besides its own: the exit index of a learned gate over the agreement feature.
_OPTIONAL = {"mlp": {"exit"}, "cost": {"exit"}}


def threshold_gate(kind: str, threshold: float) -> Gate:
    """The thresholded gate ``kind`` at ``threshold``."""
    if kind not in THRESHOLD_GATES:
        raise ConfigError(f"{kind!r} is not a thresholded gate; use one of {', '.join(THRESHOLD_GATES)}")
    return _FACTORIES[kind]({"threshold": threshold})


def gate_to_dict(gate: Gate) -> dict:
    return {"kind": gate.kind, **gate.params()}


def gate_from_dict(d: dict) -> Gate:
    """Rebuild a gate from its manifest form; unknown kinds or keys are configuration errors."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in _FACTORIES:
        raise ConfigError(f"unknown gate kind {kind!r}; known: {', '.join(_FACTORIES)}")
    if not _PARAMS[kind] <= set(d) <= _PARAMS[kind] | _OPTIONAL.get(kind, set()):
        optional = sorted(_OPTIONAL.get(kind, ()))
        raise ConfigError(f"gate {kind!r} takes parameters {sorted(_PARAMS[kind])}"
                          + (f" (and optionally {optional})" if optional else "") + f", got {sorted(d)}")
    return _FACTORIES[kind](d)


def scalar_params(gate: Gate) -> dict[str, float]:
    """The numeric parameters of ``gate`` (a learned gate's weights left out), e.g. for ``Describe``."""
    return {k: float(v) for k, v in gate.params().items() if isinstance(v, (int, float))}


def format_gate(gate: Gate) -> str:
    """The command-line form of a thresholded or constant gate; ``parse_gate(format_gate(g))`` rebuilds ``g``."""
    if isinstance(gate, (LearnedGate, EnsembleGate)):
        raise ConfigError(f"a learned {gate.kind!r} gate has no command-line form; select it with --policy")
    params = gate.params()
    return gate.kind if not params else f"{gate.kind}:{params['threshold']!r}"


def parse_gate(spec: str) -> Gate:
    """Parse a command-line gate such as ``confidence:0.9``, ``entropy:0.2``, ``always`` or ``never``."""
    kind, _, value = spec.partition(":")
    if kind in ("always", "never"):
        if value:
            raise ConfigError(f"gate {kind!r} takes no value, got {spec!r}")
        return gate_from_dict({"kind": kind})
    try:
        threshold = float(value)
    except ValueError:
        raise ConfigError(f"bad gate {spec!r}: expected KIND:THRESHOLD, e.g. confidence:0.9") from None
    if not math.isfinite(threshold):
        raise ConfigError(f"bad gate {spec!r}: the threshold must be a finite number")
    return gate_from_dict({"kind": kind, "threshold": threshold})
