"""Gates that read the earlier exits (``history``): the ensemble gate, the mlp gate's agreement feature, and the
contract every gate keeps (``needs_history``, ``answer_stats``, clear errors for a missing or misshapen history)."""
import json
import math

import pytest
import torch

from common.errors import ConfigError
from common.model.gates import (AGREEMENT, GATE_FEATURES, ConfidenceGate, ConstantGate, EnsembleGate, GateMLP,
                                LearnedGate, agreement, answer_stats, gate_from_dict, gate_to_dict, needs_history,
                                parse_gate, softmax_stats)
from training.calibrate import history_at
from training.policies import ensemble_nll, fit_ensemble_gates, fit_mlp_gates


def _exits(n=64, k=3, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [3 * torch.randn(n, classes, generator=g) for _ in range(k)]


def test_existing_gates_ignore_history_and_answer_with_their_own_softmax():
    exits = _exits()
    history = history_at(exits, 1)
    for gate in (ConfidenceGate(0.5), ConstantGate(True), parse_gate("entropy:0.3"), parse_gate("margin:0.2")):
        assert needs_history(gate) is False and gate.needs_history is False
        assert torch.equal(gate(exits[1], None, history), gate(exits[1]))
        s = answer_stats(gate, exits[1], history)
        assert all(torch.equal(s[key], v) for key, v in softmax_stats(exits[1]).items())
    assert needs_history(object()) is False  # a gate written before the attribute existed


def test_one_hot_ensemble_is_the_plain_confidence_gate():
    exits = _exits()
    history = history_at(exits, 2)
    gate = EnsembleGate((0.0, 0.0, 1.0), (0.0,) * 5, 0.6)
    assert gate.needs_history and needs_history(gate) and gate.exit == 2
    assert torch.equal(gate(exits[2], None, history), ConfidenceGate(0.6)(exits[2]))
    s, plain = answer_stats(gate, exits[2], history), softmax_stats(exits[2])
    assert torch.equal(s["label"], plain["label"])
    assert torch.allclose(s["confidence"], plain["confidence"], atol=1e-6)


def test_ensemble_answers_with_the_ensembles_label_and_confidence():
    # Exit 0 is sure of class 0, exit 1 slightly prefers class 1: an equal-weight ensemble answers class 0.
    e0 = torch.tensor([[6.0, 0.0, 0.0]])
    e1 = torch.tensor([[0.0, 0.5, 0.0]])
    history = torch.stack([e0, e1], dim=1)
    gate = EnsembleGate((1.0, 1.0), (0.0, 0.0, 0.0), 0.9)
    s = answer_stats(gate, e1, history)
    assert s["label"].tolist() == [0] and softmax_stats(e1)["label"].tolist() == [1]
    q = torch.softmax(torch.log_softmax(e0, 1) + torch.log_softmax(e1, 1), 1)
    assert s["confidence"].item() == pytest.approx(q.max().item(), abs=1e-6)
    assert gate(e1, s, history).tolist() == [q.max().item() >= 0.9]
    # The bias shifts the answer: a large bias on class 2 wins.
    biased = EnsembleGate((1.0, 1.0), (0.0, 0.0, 20.0), 0.9)
    assert answer_stats(biased, e1, history)["label"].tolist() == [2]


def test_ensemble_round_trips_as_json_numbers():
    gate = EnsembleGate((0.25, 0.75), (0.1, -0.2, 0.0), 0.8)
    d = json.loads(json.dumps(gate_to_dict(gate)))
    assert d == {"kind": "ensemble", "threshold": 0.8, "weights": [0.25, 0.75], "bias": [0.1, -0.2, 0.0]}
    again = gate_from_dict(d)
    assert isinstance(again, EnsembleGate) and again.params() == gate.params()


@pytest.mark.parametrize("bad", [
    {"threshold": 0.8, "weights": [1.0]},                                    # no bias
    {"threshold": 0.8, "weights": [], "bias": [0.0]},                        # no weights
    {"threshold": 0.8, "weights": [1.0, math.nan], "bias": [0.0]},           # not finite
    {"threshold": 0.8, "weights": [1.0], "bias": [math.inf, 0.0]},
    {"threshold": 0.8, "weights": "1.0", "bias": [0.0]},                     # not a list
    {"threshold": 0.8, "weights": [True], "bias": [0.0]},                    # a bool is no weight
    {"threshold": 0.8, "weights": [1.0], "bias": [0.0], "temperature": 1.0},  # unknown key
    {"threshold": "high", "weights": [1.0], "bias": [0.0]},
])
def test_malformed_ensemble_dicts_are_config_errors(bad):
    with pytest.raises(ConfigError):
        gate_from_dict({"kind": "ensemble", **bad})


def test_gates_that_need_history_refuse_a_missing_or_misshapen_one():
    exits = _exits()
    gate = EnsembleGate((0.5, 0.5), (0.0,) * 5, 0.5)
    with pytest.raises(ConfigError, match="needs the logits of exits 0..1"):
        gate(exits[1])  # the runtime's older call, gate(logits, stats), must fail loudly, not threshold something
    with pytest.raises(ConfigError, match=r"shape \(N, 2, K\)"):
        gate(exits[2], None, history_at(exits, 2))  # one exit too many
    with pytest.raises(ConfigError, match="shape"):
        gate(exits[1], None, history_at(exits, 1)[:10])  # other samples
    with pytest.raises(ConfigError, match="bias for 4 classes"):
        EnsembleGate((0.5, 0.5), (0.0,) * 4, 0.5)(exits[1], None, history_at(exits, 1))
    mlp = fit_mlp_gates(exits, torch.zeros(64, dtype=torch.long), epochs=1, use_agreement=True)[1]
    with pytest.raises(ConfigError, match="history"):
        mlp(exits[1])
    with pytest.raises(ConfigError, match="shape"):
        mlp(exits[1], None, history_at(exits, 0).expand(-1, 1, -1))


def test_agreement_feature():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert agreement(torch.stack([a, b], 1)).tolist() == [1.0, 0.0]
    assert agreement(a[:, None]).tolist() == [1.0, 1.0]  # the first exit: nothing to disagree with


def test_agreement_mlp_needs_history_and_round_trips():
    exits, labels = _exits(n=300), torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(1))
    assert not any(needs_history(g) for g in fit_mlp_gates(exits, labels, epochs=1))  # the default: five inputs
    gates = fit_mlp_gates(exits, labels, epochs=2, use_agreement=True)
    assert [g.exit for g in gates] == [0, 1] and all(needs_history(g) for g in gates)
    assert len(gates[1].mlp.mean) == len(GATE_FEATURES) + 1 and AGREEMENT == "agreement"
    d = json.loads(json.dumps(gate_to_dict(gates[1])))
    assert d["exit"] == 1 and len(d["weights"]["mean"]) == 6
    again = gate_from_dict(d)
    h = history_at(exits, 1)
    assert torch.equal(again.probability(exits[1], history=h), gates[1].probability(exits[1], history=h))
    with pytest.raises(ConfigError, match="exit index"):
        gate_from_dict({k: v for k, v in d.items() if k != "exit"})
    with pytest.raises(ConfigError):
        gate_from_dict({**d, "exit": -1})


def test_an_old_five_feature_mlp_gate_still_loads_and_runs_without_history():
    mlp = GateMLP(4)
    old = {"kind": "mlp", "threshold": 0.5, "depth": 0.0, "weights": mlp.to_dict()}  # the pre-agreement form
    assert len(old["weights"]["mean"]) == 5
    gate = gate_from_dict(json.loads(json.dumps(old)))
    assert isinstance(gate, LearnedGate) and not needs_history(gate) and gate.exit is None
    logits = _exits()[0]
    assert gate(logits).shape == (64,)
    assert torch.equal(gate(logits, softmax_stats(logits)), gate(logits, None, history_at([logits], 0)))
    assert gate_to_dict(gate) == old  # and it is written back in the same form
    with pytest.raises(ConfigError, match="takes no exit index"):
        gate_from_dict({**old, "exit": 0})
    with pytest.raises(ConfigError, match="5 or 6 features"):
        gate_from_dict({**old, "weights": {**old["weights"], "mean": [0.0] * 7}})


def test_ensemble_fit_starts_at_the_plain_exit_and_lowers_the_nll():
    # Three noisy views of the label: combining them beats any one, so the fit must lower the NLL.
    g = torch.Generator().manual_seed(0)
    n, classes = 2000, 4
    labels = torch.randint(0, classes, (n,), generator=g)
    exits = []
    for noise in (2.0, 1.6, 1.4):
        lg = noise * torch.randn(n, classes, generator=g)
        lg[torch.arange(n), labels] += 1.5
        exits.append(lg)
    gates = fit_ensemble_gates(exits, labels)
    assert [len(gt.weights) for gt in gates] == [1, 2] and all(len(gt.bias) == classes for gt in gates)
    for k, gate in enumerate(gates):
        lp = torch.log_softmax(history_at(exits, k), 2)
        start = torch.zeros(k + 1)
        start[k] = 1
        before = float(ensemble_nll(start, torch.zeros(classes), lp, labels))
        after = float(ensemble_nll(torch.tensor(gate.weights), torch.tensor(gate.bias), lp, labels))
        assert after <= before
    lp = torch.log_softmax(history_at(exits, 1), 2)
    before = float(ensemble_nll(torch.tensor([0.0, 1.0]), torch.zeros(classes), lp, labels))
    after = float(ensemble_nll(torch.tensor(gates[1].weights), torch.tensor(gates[1].bias), lp, labels))
    assert after < before - 0.05  # the second exit gains from the first
    assert gates[1].weights[0] > 0
    assert [gt.params() for gt in fit_ensemble_gates(exits, labels)] == [gt.params() for gt in gates]  # deterministic
