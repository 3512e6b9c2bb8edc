import json

import pytest

from common.emulation.chain import evaluate_in_process
from training.analysis import frontier
from training.calibrate import PRICES


def test_frontier_cli_on_a_bundle(tiny_bundle, test_slice, tmp_path):
    assert frontier.main(["--bundle", str(tiny_bundle), "--data", "synthetic:test", "--limit", "192",
                          "--points", "11", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "frontier.json").read_text())
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert set(result["policies"]) == {"confidence", "entropy", "margin", "mlp", "cost", "ensemble"}
    assert len(result["policies"]["cost"]["points"]) == 1 and len(result["policies"]["mlp"]["points"]) > 5
    assert len(result["policies"]["ensemble"]["points"]) > 5
    # The frontier's reach at 1, 2 and 5 points of drop: a swept policy's never-exit point is always within it (the
    # cost policy here is one point, which may be outside).
    assert set(result["at_drop"]) == set(result["policies"])
    for name, reach in result["at_drop"].items():
        assert list(reach) == ["1", "2", "5"]
        if name == "cost":
            continue
        assert all(r is not None for r in reach.values())
        flops = [r["flops_fraction"] for r in reach.values()]
        assert flops == sorted(flops, reverse=True)  # a looser drop never costs more
        assert all(r["accuracy"] >= result["final_accuracy"] - float(d) / 100 - 1e-9 for d, r in reach.items())
    # The calibrated point is what the deployed chain actually does on the same data.
    report, _ = evaluate_in_process(tiny_bundle, test_slice.images, test_slice.labels, batch_size=64)
    cal = result["calibrated"]
    assert cal["accuracy"] == pytest.approx(report["accuracy"])
    assert cal["exits"] == report["exits"]
    assert cal["flops_fraction"] == pytest.approx(report["flops"]["mean_per_sample"]
                                                  / report["flops"]["full_network_per_sample"])
    for name, policy in result["policies"].items():
        pts = policy["points"]
        if name == "cost":
            continue
        assert all(sum(p["exits"].values()) == 192 for p in pts)
        assert [p["flops_fraction"] for p in pts] == sorted(p["flops_fraction"] for p in pts)
        # Sending everything to the final exit reproduces the final exit's accuracy at the highest cost.
        assert pts[-1]["parameter"] is None and pts[-1]["accuracy"] == pytest.approx(result["final_accuracy"])
        assert pts[-1]["flops_fraction"] > 1.0 > pts[0]["flops_fraction"]
        # Latency follows where samples leave: the never-exit point pays every segment, and cumulative compute
        # time to each exit is increasing.
        assert pts[-1]["compute_ms_per_sample"] == pytest.approx(result["compute_ms_to_exit"]["cloud"])
        assert all(p["compute_ms_per_sample"] <= pts[-1]["compute_ms_per_sample"] + 1e-9 for p in pts)
    ms = list(result["compute_ms_to_exit"].values())
    assert 0 < ms[0] < ms[1] < ms[2]
    assert result["calibrated"]["calibration"]["method"] == "ltt"
    assert report["calibration"]["policy"] == "confidence" and report["calibration"]["method"] == "ltt"
    # Every stored policy at its calibrated thresholds, as the chain serves it with --policy.
    assert set(result["stored"]) == set(result["policies"])
    ensemble, _ = evaluate_in_process(tiny_bundle, test_slice.images, test_slice.labels, 64, policy="ensemble")
    assert result["stored"]["ensemble"]["exits"] == ensemble["exits"]
    assert result["stored"]["ensemble"]["accuracy"] == pytest.approx(ensemble["accuracy"])


def test_per_exit_sweep_calibrates_on_another_split(tiny_bundle, tmp_path):
    """The seed projects' sweep: per-exit thresholds calibrated on validation data to desired accuracies."""
    from common.errors import ConfigError

    assert frontier.main(["--bundle", str(tiny_bundle), "--data", "synthetic", "--split", "test", "--limit", "192",
                          "--points", "6", "--calibrate-on", "val", "--probe-on", "train", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "frontier.json").read_text())
    assert result["calibration_samples"] == 192 and result["probe_samples"] == 192
    assert "probe" in result["at_drop"] and "probe" not in result["stored"]  # a reference, not a stored policy
    for name in ("confidence", "entropy", "margin", "mlp", "ensemble", "probe"):
        pe = result["policies"][name]["per_exit"]
        assert sorted(p["parameter"] for p in pe) == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        assert all(sum(p["exits"].values()) == 192 for p in pe)
        # A higher desired accuracy never lowers the first exit's threshold, so it never lets more samples leave there.
        by_target = sorted(pe, key=lambda p: p["parameter"])
        device = [p["exits"]["device"] for p in by_target]
        early = [p["exits"]["device"] + p["exits"]["edge"] for p in by_target]
        assert device == sorted(device, reverse=True) and early[0] > early[-1]
        # The priced sweep: one point per exchange rate, from "the first exit takes everything" to cautious ones.
        priced = result["policies"][name]["priced"]
        assert len(priced) == len(PRICES) and all(sum(p["exits"].values()) == 192 for p in priced)
        cheapest = min(priced, key=lambda p: p["parameter"])
        # A lost answer worth a tenth of a network: the first exit takes every validation sample, so nearly every test
        # sample (a few may score below them all).
        assert cheapest["exits"]["device"] >= 0.9 * 192
        assert max(p["flops_fraction"] for p in priced) > cheapest["flops_fraction"]
    # The cost policy is a curve: its gates refitted on the validation split for each alpha, measured on test.
    curve = result["policies"]["cost"]["curve"]
    assert sorted(p["parameter"] for p in curve) == sorted(frontier.COST_ALPHAS) and len(curve) >= 5
    assert all(sum(p["exits"].values()) == 192 for p in curve)
    by_alpha = sorted(curve, key=lambda p: p["parameter"])
    # Computation weighs more as alpha grows: the cheapest refit is never the alpha = 0 one, the dearest never the
    # largest alpha (each fit is a small stochastic optimisation, so only the ends are compared).
    assert by_alpha[-1]["flops_fraction"] <= by_alpha[0]["flops_fraction"]
    with pytest.raises(ConfigError, match="another split"):
        frontier.main(["--bundle", str(tiny_bundle), "--data", "synthetic:test", "--calibrate-on", "val",
                       "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="a split of its own"):
        frontier.main(["--bundle", str(tiny_bundle), "--data", "synthetic", "--split", "test", "--calibrate-on", "val",
                       "--probe-on", "val", "--out", str(tmp_path)])


def test_oracles_on_a_known_cascade():
    """Three samples, three exits costing 1, 2, 4 (whole network 4)."""
    import torch

    from training.analysis.frontier import Cached, oracles

    def onehot(labels):
        return torch.nn.functional.one_hot(torch.tensor(labels), 3).float()

    # sample 0: every exit right; sample 1: only the edge and the final right; sample 2: device right, final wrong
    logits = [onehot([0, 2, 2]), onehot([0, 1, 0]), onehot([0, 1, 1])]
    cached = Cached(logits, torch.tensor([0, 1, 2]), [1.0, 2.0, 4.0], 4.0, ["device", "edge", "cloud"], [0, 0, 0])
    o = oracles(cached)
    # agreeing with the final: sample 0 at the device, 1 at the edge, 2 at the cloud (the final's wrong 1)
    assert o["agree_with_final"]["exits"] == {"device": 1, "edge": 1, "cloud": 1}
    assert o["agree_with_final"]["flops_fraction"] == pytest.approx((1 + 2 + 4) / 3 / 4)
    assert o["agree_with_final"]["accuracy"] == pytest.approx(2 / 3)
    # first correct: 0 and 2 at the device, 1 at the edge; every sample right
    assert o["first_correct"]["exits"] == {"device": 2, "edge": 1, "cloud": 0}
    assert o["first_correct"]["accuracy"] == 1.0
    assert o["first_correct"]["flops_fraction"] == pytest.approx((1 + 2 + 1) / 3 / 4)
