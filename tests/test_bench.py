"""The benchmark's own logic: how the serving-overhead comparison pairs requests, and its command-line checks."""
import pytest
import torch

from common.errors import ConfigError
from scripts.bench_pipeline import paired_seconds, parse_widths


def test_requests_alternate_between_the_compared_deployments_in_rotating_order():
    calls = []

    def recorder(name):
        def forward(batch):
            calls.append((name, batch.sample_ids[0], len(batch.sample_ids)))
        return forward

    images = torch.zeros(10, 3, 2, 2, dtype=torch.uint8)  # two full batches of 4; the last 2 images are left out
    seconds = paired_seconds({"a": recorder("a"), "b": recorder("b")}, images, "m", 4, rounds=2)
    assert calls == [("a", 0, 4), ("b", 0, 4), ("a", 4, 4), ("b", 4, 4),   # round 0: a first
                     ("b", 0, 4), ("a", 0, 4), ("b", 4, 4), ("a", 4, 4)]   # round 1: b first
    assert {k: len(v) for k, v in seconds.items()} == {"a": 4, "b": 4} and all(
        s >= 0 for v in seconds.values() for s in v)


def test_width_sweep_defaults_and_bad_values():
    assert parse_widths(None, quick=False) == [0.25, 1.0] and parse_widths(None, quick=True) == []
    assert parse_widths("none", quick=False) == [] and parse_widths("0.5,2", quick=True) == [0.5, 2.0]
    for bad in ("", "0", "-1", "wide", "1,,2", "5"):
        with pytest.raises(ConfigError, match="--overhead-widths"):
            parse_widths(bad, quick=False)


@pytest.mark.e2e
def test_serving_overhead_section_measures_the_bundle_and_the_width_sweep(tiny_bundle, tmp_path):
    """Three tier processes per model, then torn down: the bundle's own ratio and one freshly initialised width."""
    import json

    from scripts.bench_pipeline import main

    assert main(["--bundle", str(tiny_bundle), "--out", str(tmp_path), "--sections", "serving_overhead",
                 "--limit", "64", "--batch-size", "32", "--overhead-widths", "0.0625"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())["serving_overhead"]
    sweep = result.pop("resnet18_by_width")
    for row in (result, sweep["0.0625"]):
        assert row["requests_each"] == 2 * row["rounds"]  # 64 images in full batches of 32, every round
        assert row["distributed_over_in_process"] > 0 and row["pipelined_over_in_process"] > 0
        lo, mid, hi = row["ms_per_request_p10_p50_p90"]["distributed"]
        assert 0 < lo <= mid <= hi
    assert sweep["0.0625"]["device_to_edge_bytes_per_sample"] == 4 * 4 * 32 * 32  # 4 channels at width 1/16
