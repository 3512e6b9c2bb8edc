"""The request cost model: curves, per-request arithmetic against hand computation, batching of a run."""
import numpy as np
import pytest

from common.emulation.cost_model import (Curve, LinkCost, TierCost, predict_run, reach_counts, reply_bytes, request_cost)
from common.wire.link import LinkModel


def test_curve_interpolates_and_extends():
    c = Curve((1.0, 4.0, 16.0), (2.0, 5.0, 11.0))
    assert c(0) == 0.0
    assert c(1) == 2.0 and c(16) == 11.0
    assert c(2) == pytest.approx(3.0)  # on the segment 1..4
    assert c(0.5) == pytest.approx(1.0)  # proportional below the first size
    assert c(32) == pytest.approx(11.0 + 16 * 0.5)  # the last segment's slope continued
    assert Curve((8.0,), (4.0,))(16) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        Curve((4.0, 1.0), (1.0, 2.0))


def linear(per_sample: float, fixed: float = 0.0) -> Curve:
    return Curve((1.0, 64.0), (fixed + per_sample, fixed + 64 * per_sample))


def test_request_cost_matches_hand_arithmetic():
    link = LinkModel(8e6, 0.010)  # 1 MB/s, 10 ms round trip
    tiers = [TierCost(linear(0.001), 4.0), TierCost(linear(0.002), 0.5), TierCost(linear(0.003))]
    links = [LinkCost(linear(1000, 100), linear(1e-4), link, 0.002),
             LinkCost(linear(500, 100), linear(1e-4), link, 0.002)]
    cost = request_cost([64, 20, 5], tiers, links)
    expected = (4 * 0.064 + 1 * 0.040 + 0.015  # device stretched x4, edge never below its measured time
                + 20e-4 + 0.002 + 0.010 + (100 + 20_000 + reply_bytes(20, 2)) / 1e6
                + 5e-4 + 0.002 + 0.010 + (100 + 2_500 + reply_bytes(5, 1)) / 1e6)
    assert cost.seconds == pytest.approx(expected)
    assert cost.bytes_sent == [20_100, 2_600]


def test_nothing_forwarded_costs_no_link():
    tiers = [TierCost(linear(0.001)), TierCost(linear(1.0)), TierCost(linear(1.0))]
    links = [LinkCost(linear(1000), link=LinkModel(1e3, 1.0))] * 2
    cost = request_cost([8, 0, 0], tiers, links)
    assert cost.seconds == pytest.approx(0.008) and cost.bytes_sent == [0, 0]


def test_reply_bytes_grow_with_predictions_and_hops():
    assert reply_bytes(10, 1) < reply_bytes(20, 1) < reply_bytes(20, 2)


def test_predict_run_batches_like_a_client():
    exit_of = np.array([0, 1, 2, 2, 0, 0, 1])  # batches of 3: [0,1,2] [2,0,0] [1]
    assert reach_counts(exit_of[:3], 3) == [3, 2, 1]
    tiers = [TierCost(linear(1.0)), TierCost(linear(10.0)), TierCost(linear(100.0))]
    links = [LinkCost(linear(1000)), LinkCost(linear(10))]
    run = predict_run(exit_of, 3, tiers, links)
    per_request = [3 + 20 + 100, 3 + 10 + 100, 1 + 10]
    assert run["requests"] == 3
    assert run["latency_ms_mean"] == pytest.approx(1e3 * np.mean(per_request))
    assert run["bytes_per_sample"] == pytest.approx([(2000 + 1000 + 1000) / 7, (10 + 10) / 7])
