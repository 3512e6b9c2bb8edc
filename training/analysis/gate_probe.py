"""A probe of the headroom left to exit gates: how much computation could a gate that reads the outputs of every exit
so far save over max-softmax ``confidence`` on the same model?

The probe is a reference for the frontier (``training.analysis.frontier --probe-on SPLIT``), not a policy to deploy:
its gate at exit k is a two-hidden-layer MLP over ``probe_features`` of exits 0..k (the statistics the shipped
``mlp`` gate reads, its agreement feature, and how sure each earlier exit was of this exit's answer) trained on
another split, usually the training split with its tens of
thousands of samples, to predict whether exit k's answer is right. If this gate's frontier is no better than
``confidence``'s, no gate over the exits' outputs is likely to be, and savings must come from the exits themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.model.gates import Stats
from training.calibrate import Thresholdable, history_at

EPOCHS = 20
HIDDEN = 32


def probe_features(history: Tensor) -> Tensor:
    """``(N, 5 + 3k)`` inputs of the probe gate of exit k from ``history`` ``(N, k + 1, K)`` (exits 0..k, this exit
    last): this exit's three largest probabilities, normalised entropy and logit norm; then, for every earlier exit,
    its largest probability, its probability of this exit's answer, and whether its answer is the same (1.0 / 0.0)."""
    logits = history[:, -1].float()
    probs = torch.softmax(history.float(), dim=2)
    own = probs[:, -1]
    label = own.argmax(1, keepdim=True)
    entropy = -(own * own.clamp_min(1e-12).log()).sum(1, keepdim=True) / math.log(max(own.shape[1], 2))
    cols = [own.topk(min(3, own.shape[1]), dim=1).values, entropy, logits.norm(dim=1, keepdim=True)]
    for j in range(history.shape[1] - 1):
        p = probs[:, j]
        cols += [p.max(1, keepdim=True).values, p.gather(1, label), (p.argmax(1, keepdim=True) == label).float()]
    return torch.cat(cols, dim=1)


class ProbeNet(nn.Module):
    """Standardise the features, then two hidden ReLU layers and one logit: P(this exit's answer is right)."""

    def __init__(self, features: Tensor, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.register_buffer("mean", features.mean(0))
        self.register_buffer("std", features.std(0).nan_to_num(1.0).clamp_min(1e-4))
        width = features.shape[1]
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net((features - self.mean) / self.std).squeeze(1)

    @torch.no_grad()
    def probability(self, history: Tensor) -> Tensor:
        return torch.sigmoid(self(probe_features(history)))


@dataclass(frozen=True, eq=False)
class ProbeGate:
    """Exit when the probe's probability that this exit is right is at least ``threshold`` (needs ``history``)."""

    net: ProbeNet
    threshold: float
    kind = "probe"
    needs_history = True

    def __call__(self, logits: Tensor, stats: Stats | None = None, history: Tensor | None = None) -> Tensor:
        if history is None:
            raise ValueError("the probe gate reads the logits of every exit so far (history)")
        return self.net.probability(history) >= self.threshold

    def params(self) -> dict[str, float]:
        return {"threshold": self.threshold}


def fit_probe_net(history: Tensor, labels: Tensor, epochs: int = EPOCHS, hidden: int = HIDDEN,
                  seed: int = 0) -> ProbeNet:
    """Train the probe of the exit ``history`` ends with (binary cross-entropy, Adam, batches of 256, seeded)."""
    features = probe_features(history)
    target = (history[:, -1].argmax(1) == labels).float()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ProbeNet(features, hidden)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for lo in range(0, len(labels), 256):
            idx = order[lo:lo + 256]
            loss = F.binary_cross_entropy_with_logits(net(features[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def probe_family(exit_logits: list[Tensor], labels: Tensor, epochs: int = EPOCHS,
                 seed: int = 0) -> list[Thresholdable]:
    """The probe gate of every early exit, fitted on ``exit_logits`` / ``labels`` (data the frontier is not measured
    on), in the thresholdable form the frontier sweeps."""
    family = []
    for k in range(len(exit_logits) - 1):
        net = fit_probe_net(history_at(exit_logits, k), labels, epochs, seed=seed + k)
        family.append(Thresholdable(lambda h, net=net: net.probability(h).double().numpy(),
                                    lambda t, net=net: ProbeGate(net, t)))
    return family
