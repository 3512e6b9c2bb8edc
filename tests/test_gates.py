import math

import pytest
import torch

from common.errors import ConfigError
from common.model.gates import (ConfidenceGate, ConstantGate, EntropyGate, MarginGate, format_gate, gate_from_dict, gate_to_dict, parse_gate, softmax_stats)

# Row 0: confident; row 1: uniform; row 2: two-way tie.
LOGITS = torch.tensor([[10.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [5.0, 5.0, -20.0, -20.0]])


def test_softmax_stats():
    s = softmax_stats(LOGITS)
    assert s["label"][0] == 0
    assert s["confidence"][1] == pytest.approx(0.25)
    assert s["entropy"][1] == pytest.approx(1.0, abs=1e-6)  # uniform = maximal normalised entropy
    assert s["entropy"][0] < 0.01
    assert s["margin"][2] == pytest.approx(0.0, abs=1e-6)
    assert s["margin"][0] > 0.99


def test_confidence_gate_is_inclusive_and_batchwise():
    conf = softmax_stats(LOGITS)["confidence"]
    assert ConfidenceGate(0.9)(LOGITS).tolist() == [True, False, False]
    assert ConfidenceGate(float(conf[2]))(LOGITS).tolist() == [True, False, True]
    assert ConfidenceGate(0.0)(LOGITS).all()
    assert not ConfidenceGate(1.01)(LOGITS).any()


def test_entropy_gate():
    assert EntropyGate(0.1)(LOGITS).tolist() == [True, False, False]
    assert EntropyGate(0.6)(LOGITS).tolist() == [True, False, True]  # two-way tie: entropy log2/log4 = 0.5
    assert EntropyGate(1.0)(LOGITS).all()


def test_constant_gates():
    assert ConstantGate(True)(LOGITS).tolist() == [True] * 3
    assert ConstantGate(False)(LOGITS).tolist() == [False] * 3
    assert ConstantGate(True)(torch.empty(0, 4)).shape == (0,)


def test_margin_gate():
    assert MarginGate(0.5)(LOGITS).tolist() == [True, False, False]
    assert MarginGate(0.0)(LOGITS).all()


@pytest.mark.parametrize("gate", [ConfidenceGate(0.7), EntropyGate(0.3), MarginGate(0.1234567891234),
                                  ConstantGate(True), ConstantGate(False)])
def test_dict_and_command_line_round_trips(gate):
    d = gate_to_dict(gate)
    again = gate_from_dict(d)
    assert gate_to_dict(again) == d
    assert torch.equal(again(LOGITS), gate(LOGITS))
    assert parse_gate(format_gate(gate)) == gate  # exact, so tiers started with --gate behave identically


def test_parse_gate():
    assert parse_gate("confidence:0.8") == ConfidenceGate(0.8)
    assert parse_gate("entropy:0.25") == EntropyGate(0.25)
    assert parse_gate("never") == ConstantGate(False)
    for bad in ("confidence", "confidence:x", "confidence:nan", "bogus:0.5", "always:1", "entropy:inf"):
        with pytest.raises(ConfigError):
            parse_gate(bad)


def test_gate_from_dict_rejects_bad_keys():
    with pytest.raises(ConfigError, match="unknown gate kind"):
        gate_from_dict({"kind": "mystery"})
    with pytest.raises(ConfigError, match="takes parameters"):
        gate_from_dict({"kind": "confidence", "threshold": 0.5, "extra": 1})
    with pytest.raises(ConfigError, match="takes parameters"):
        gate_from_dict({"kind": "confidence"})


def test_entropy_normalisation_two_classes():
    logits = torch.zeros(1, 2)
    assert softmax_stats(logits)["entropy"].item() == pytest.approx(1.0)
    assert math.isclose(softmax_stats(torch.tensor([[50.0, 0.0]]))["entropy"].item(), 0.0, abs_tol=1e-6)
