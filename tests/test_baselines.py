"""Baseline deployments on the tiny bundle: same answers where they must agree, bytes where they must differ."""
import pytest

from common.emulation.baselines import Direct, ImageFileOffload, emulated_chain, offload_raw, whole_network_runtime
from common.model.bundle import find_tier_folders, load_tier_bundle
from common.errors import ConfigError
from common.emulation.feed import feed_and_report
from common.model.gates import ConstantGate
from common.wire.link import LinkModel
from common.wire.codecs import FLOAT32
from common.emulation.cost_model import parse_profile

TIERS = ["device", "edge", "cloud"]


def run(forward, bundles, data):
    return feed_and_report(forward, data.images[:32], data.labels[:32], bundles[0].model_id, 16, TIERS, 1.0)[0]


def test_whole_network_baselines_agree_with_the_split_without_exits(tiny_bundle, test_slice):
    bundles = [load_tier_bundle(f) for f in find_tier_folders(tiny_bundle)]
    never = ConstantGate(False)
    split = run(Direct(emulated_chain(bundles, [never, never, None], [FLOAT32] * 3, [None] * 3, [1.0] * 3)),
                bundles, test_slice)
    device = run(Direct(whole_network_runtime(bundles, "device")), bundles, test_slice)
    cloud = whole_network_runtime(bundles, "cloud")
    raw = run(offload_raw(cloud, LinkModel(1e9, 0.001)), bundles, test_slice)
    png = run(ImageFileOffload(cloud, "PNG", None), bundles, test_slice)  # lossless: the same images
    jpeg = run(ImageFileOffload(cloud, "JPEG", None), bundles, test_slice)
    assert split["accuracy"] == device["accuracy"] == raw["accuracy"] == png["accuracy"]
    assert device["exits"]["device"] == raw["exits"]["cloud"] == jpeg["exits"]["cloud"] == 32
    assert 32 * 3 * 32 * 32 < raw["bytes"]["raw_input_offload"] < 32 * 3 * 32 * 32 * 1.05
    assert jpeg["bytes"]["raw_input_offload"] < raw["bytes"]["raw_input_offload"]
    assert raw["latency_ms"]["p50"] >= 1.0  # the emulated round trip is in the measured latency


def test_parse_profile():
    assert parse_profile("device=4,cloud=0.5", TIERS) == [4.0, 1.0, 0.5]
    for bad in ("phone=2", "device", "device=x", "device=0"):
        with pytest.raises(ConfigError):
            parse_profile(bad, TIERS)
