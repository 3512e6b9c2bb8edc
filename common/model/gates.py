"""Exit gates: pure, batch-aware policies that map a batch of exit logits to a boolean "may exit" mask.

A gate never sees the network; it sees only the logits of the exit it guards. Gates serialise to a small dict
(``{"kind": "confidence", "threshold": 0.9}``) stored in each tier's manifest and are rebuilt by ``gate_from_dict``.

Thresholded gates compare one softmax statistic with a threshold. Learned gates (``mlp``, ``cost``) run a tiny MLP
over statistics of the exit's logits and exit when its output probability reaches a threshold; their weights travel
in the manifest as JSON numbers, so a bundle never carries pickled code. They are fitted in ``training.policies``.
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


def needs_history(gate) -> bool:
    """Whether ``gate`` reads the earlier exits' logits (``history``) besides its own exit's."""
    return bool(getattr(gate, "needs_history", False))


def answer_stats(gate, logits: Tensor, history: Tensor | None = None) -> Stats:
    """The statistics of the answer given at the exit ``gate`` guards (label, confidence, ...)."""
    stats = getattr(gate, "answer_stats", None)
    return stats(logits, history) if stats is not None else softmax_stats(logits)


class Gate(Protocol):
    """``gate(logits, stats)`` -> boolean mask of the samples that may exit. ``stats``, when the caller already has
    ``softmax_stats(logits)`` (the tier runtime needs them for its answers), saves the gate computing them again."""

    kind: str

    def __call__(self, logits: Tensor, stats: Stats | None = None, history: Tensor | None = None) -> Tensor: ...

    def params(self) -> dict[str, float]: ...


POLICY_NAMES = ("confidence", "entropy", "margin", "mlp", "cost")
# Thresholded gates as (statistic, direction): a sample exits when ``direction * (stat - threshold) >= 0``.
THRESHOLD_GATES = {"confidence": ("confidence", 1), "entropy": ("entropy", -1), "margin": ("margin", 1)}


@dataclass(frozen=True)
class _ThresholdGate:
    """Compare one softmax statistic with ``threshold``; subclasses name the statistic via ``kind``."""

    threshold: float
    kind = ""

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


GATE_FEATURES = ("confidence", "entropy", "margin", "depth", "logit_norm")


def gate_features(logits: Tensor, depth: float, stats: Stats | None = None) -> Tensor:
    """``(N, 5)`` inputs of a learned gate: max probability, normalised entropy, margin, normalised depth of the
    exit (0 = first, 1 = last), and the L2 norm of the logits."""
    s = stats or softmax_stats(logits)
    cols = [s["confidence"], s["entropy"], s["margin"], torch.full_like(s["margin"], float(depth)),
            logits.float().norm(dim=1)]
    return torch.stack(cols, dim=1)


class GateMLP(torch.nn.Module):
    """Standardise the gate features, then Linear -> ReLU -> Linear -> one logit (probability of exiting)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        n = len(GATE_FEATURES)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))
        self.net = torch.nn.Sequential(torch.nn.Linear(n, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net((features - self.mean) / self.std).squeeze(1)

    def to_dict(self) -> dict[str, list]:
        return {k: v.detach().flatten().tolist() for k, v in self.state_dict().items()}

    @classmethod
    def from_dict(cls, d: dict) -> "GateMLP":
        try:
            hidden = len(d["net.0.bias"])
            mlp = cls(hidden)
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
    """

    kind: str
    mlp: GateMLP
    depth: float
    threshold: float = 0.5
    alpha: float | None = None

    def probability(self, logits: Tensor, stats: Stats | None = None) -> Tensor:
        with torch.no_grad():
            return torch.sigmoid(self.mlp(gate_features(logits, self.depth, stats)))

    def __call__(self, logits: Tensor, stats: Stats | None = None, history: Tensor | None = None) -> Tensor:
        return self.probability(logits, stats) >= self.threshold

    def with_threshold(self, threshold: float) -> "LearnedGate":
        return LearnedGate(self.kind, self.mlp, self.depth, threshold, self.alpha)

    def params(self) -> dict:
        out = {"threshold": self.threshold, "depth": self.depth, "weights": self.mlp.to_dict()}
        if self.alpha is not None:
            out["alpha"] = self.alpha
        return out


def _learned(kind: str):
    def build(p: dict) -> LearnedGate:
        alpha = _number(p, "alpha") if kind == "cost" else None
        return LearnedGate(kind, GateMLP.from_dict(p["weights"]), _number(p, "depth"), _threshold(p), alpha)

    return build


@dataclass(frozen=True)
class ConstantGate:
    """Exit every sample (``always``) or none (``never``); useful to pin a deployment's routing."""

    exit_all: bool

    @property
    def kind(self) -> str:
        return "always" if self.exit_all else "never"

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


_FACTORIES: dict[str, Callable[[dict], Gate]] = {
    "confidence": lambda p: ConfidenceGate(_threshold(p)),
    "entropy": lambda p: EntropyGate(_threshold(p)),
    "margin": lambda p: MarginGate(_threshold(p)),
    "mlp": _learned("mlp"),
    "cost": _learned("cost"),
    "always": lambda p: ConstantGate(True),
    "never": lambda p: ConstantGate(False),
}
_PARAMS = {"confidence": {"threshold"}, "entropy": {"threshold"}, "margin": {"threshold"}, "always": set(),
           "never": set(), "mlp": {"threshold", "depth", "weights"}, "cost": {"threshold", "depth", "weights", "alpha"}}


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
    if set(d) != _PARAMS[kind]:
        raise ConfigError(f"gate {kind!r} takes parameters {sorted(_PARAMS[kind])}, got {sorted(d)}")
    return _FACTORIES[kind](d)


def scalar_params(gate: Gate) -> dict[str, float]:
    """The numeric parameters of ``gate`` (a learned gate's weights left out), e.g. for ``Describe``."""
    return {k: float(v) for k, v in gate.params().items() if isinstance(v, (int, float))}


def format_gate(gate: Gate) -> str:
    """The command-line form of a thresholded or constant gate; ``parse_gate(format_gate(g))`` rebuilds ``g``."""
    if isinstance(gate, LearnedGate):
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
