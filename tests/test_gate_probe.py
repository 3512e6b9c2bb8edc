import numpy as np
import pytest
import torch

from training.analysis.gate_probe import ProbeGate, probe_family, probe_features
from training.calibrate import cascade, history_at


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def _agreement_data(n: int, seed: int):
    """Two early exits and a final one over 4 classes. Exit 1 is equally confident whether right or wrong, and it is
    right exactly when it agrees with exit 0: a signal only a gate reading the earlier exit can use."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    right = torch.rand(n, generator=g) < 0.5
    wrong_label = (labels + 1 + torch.randint(0, 3, (n,), generator=g)) % 4
    answer1 = torch.where(right, labels, wrong_label)
    answer0 = torch.where(right, labels, (wrong_label + 1 + torch.randint(0, 3, (n,), generator=g)) % 4)

    def logits(answer, scale):
        return 3 * torch.nn.functional.one_hot(answer, 4).float() + scale * torch.randn(n, 4, generator=g)

    return [logits(answer0, 1.0), logits(answer1, 1.0), 5 * torch.nn.functional.one_hot(labels, 4).float()], labels


def test_probe_features_read_every_earlier_exit():
    history = torch.randn(7, 3, 5)
    f = probe_features(history)
    assert f.shape == (7, 5 + 3 * 2) and torch.isfinite(f).all()
    own = history[:, -1].softmax(1)
    assert torch.allclose(f[:, :3], own.topk(3, dim=1).values)
    # agreement of exit 0 with this exit's answer, in the last column of exit 0's triple
    assert torch.equal(f[:, 7], (history[:, 0].argmax(1) == history[:, -1].argmax(1)).float())


def test_probe_finds_what_the_exit_confidence_cannot():
    train, y_train = _agreement_data(4000, 0)
    test, y_test = _agreement_data(2000, 1)
    family = probe_family(train, y_train, epochs=5)
    right = (test[1].argmax(1) == y_test).numpy()
    probe_score = family[1].score(history_at(test, 1))
    confidence = test[1].softmax(1).max(1).values.numpy()
    assert _auc(probe_score, right) > 0.9 > 0.65 > _auc(confidence, right)
    # As a gate in the cascade: a threshold keeps its promise (what it accepts at exit 1 is mostly right).
    gates = [family[0].make(2.0), family[1].make(0.5)]
    assert isinstance(gates[1], ProbeGate) and gates[1].needs_history
    outcome = cascade(test, y_test, gates)
    assert outcome["exit_counts"][0] == 0 and outcome["exit_counts"][1] > 0.3 * len(y_test)
    taken = (family[1].score(history_at(test, 1)) >= 0.5)
    assert right[taken].mean() > 0.9
    with pytest.raises(ValueError, match="history"):
        gates[1](test[1])
