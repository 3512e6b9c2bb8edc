"""Several exits per tier: a cascade model with four early exits, two on the device and two on the edge.

The tiers run their exits one after the other, remove what each takes, and forward only the rest together with the
logits of every exit so far (the cascade heads read the previous exit's). In process, streamed and unary chains agree
with a direct computation on the model; three served tier processes agree with the in-process chain.
"""
from __future__ import annotations

import json

import pytest
import torch

from common.emulation.chain import LocalLink, load_local_chain
from common.emulation.feed import feed_and_report
from common.emulation.deployment import LocalDeployment
from common.emulation.report import predictions_by_id
from common.model.bundle import find_tier_folders, load_tier_bundle
from common.serving.client import NextTierClient
from device.client import run_client
from training import checkpoint
from training.config import TrainConfig

TIMEOUT = 60


@pytest.fixture(scope="module")
def four_exit_run(tmp_path_factory):
    from training.train import train

    out = tmp_path_factory.mktemp("four-exit-run")
    cfg = TrainConfig(width=0.125, exit_conv_channels=8, epochs=1, max_batches=25, limit_train=3200, limit_val=400,
                      batch_size=128, target_drop=5.0, exit_points=[1, 2, 3, 4], loss_weights=[0.3] * 4 + [1.0],
                      cascade=True, epochs_gates=5)
    train(cfg, out)
    return out / "checkpoint.safetensors"


def _halving_thresholds(logits: list[torch.Tensor]) -> list[float]:
    """Per early exit, the median confidence of the samples no earlier exit took: every exit answers a share."""
    here = torch.ones(len(logits[0]), dtype=torch.bool)
    thresholds = []
    for lg in logits[:-1]:
        confidence = lg.softmax(1).max(1).values
        t = float(confidence[here].median())
        thresholds.append(t)
        here &= confidence < t
    return thresholds


@pytest.fixture(scope="module")
def four_exit_bundle(four_exit_run, test_slice, tmp_path_factory):
    """Exported with the default split (device: exits 0 and 1, edge: 2 and 3, cloud: the final classifier) and
    per-exit confidence gates that give every exit a share of the test slice. Returns (root, model, thresholds)."""
    from training.engine import collect_logits
    from training.export import export

    model, _ = checkpoint.load(four_exit_run)
    thresholds = _halving_thresholds(collect_logits(model, test_slice))
    root = tmp_path_factory.mktemp("four-exit-bundle")
    export(four_exit_run, root, [f"confidence:{t!r}" for t in thresholds])
    return root, model.eval(), thresholds


def _expected(model, images: torch.Tensor, thresholds: list[float]) -> dict[int, tuple[int, int]]:
    """Sample index -> (label, exit index), computed on the whole model: the first exit whose confidence reaches its
    threshold answers; the final classifier answers the rest."""
    with torch.no_grad():
        probs = [lg.softmax(1) for lg in model(images)]
    out = {}
    for i in range(len(images)):
        for e, p in enumerate(probs):
            if e == len(probs) - 1 or p[i].max() >= thresholds[e]:
                out[i] = (int(p[i].argmax()), e)
                break
    return out


def test_default_export_puts_two_exits_on_the_device_and_two_on_the_edge(four_exit_bundle):
    root, model, _ = four_exit_bundle
    manifests = [json.loads((f / "manifest.json").read_text()) for f in find_tier_folders(root)]
    assert [[e["index"] for e in m["segment"]["exits"]] for m in manifests] == [[0, 1], [2, 3], [4]]
    assert all(m["history"] for m in manifests)  # cascade heads read the previous exit: the logits travel
    bundles = [load_tier_bundle(f) for f in find_tier_folders(root)]
    assert [len(b.segment.heads) for b in bundles] == [2, 2, 1]
    assert [len(b.gates) for b in bundles] == [2, 2, 1]


@pytest.mark.parametrize("streamed", [False, True])
def test_in_process_chain_answers_like_the_model(four_exit_bundle, test_slice, streamed):
    root, model, thresholds = four_exit_bundle
    first, bundles = load_local_chain(root, streamed=streamed)
    link = LocalLink(first)
    report, records = feed_and_report(link, test_slice.images, test_slice.labels, first.spec.model_id, 32,
                                      ["device", "edge", "cloud"], bundles[0].manifest.full_network_flops,
                                      forward_stream=link.stream if streamed else None)
    got = {i: (label, index) for i, (label, _, index) in predictions_by_id(records).items()}
    assert got == _expected(model, test_slice.images, thresholds)
    by_index = report["exits_by_index"]
    assert sorted(by_index) == ["0", "1", "2", "3", "4"] and all(e["samples"] > 0 for e in by_index.values())
    assert [by_index[str(e)]["tier"] for e in range(5)] == ["device", "device", "edge", "edge", "cloud"]
    assert sum(e["samples"] for e in by_index.values()) == len(test_slice)
    assert all(0 < e["latency_ms"]["p50"] <= e["latency_ms"]["p95"] for e in by_index.values())
    # FLOPs follow the exits: a sample leaving at exit 0 paid for exit 0's block and head only.
    assert 0 < report["flops"]["saved_fraction"] < 1


@pytest.mark.parametrize("policy", ["ensemble", "mlp"])
def test_policies_reading_earlier_exits_answer_alike_streamed_and_unary(four_exit_bundle, test_slice, policy):
    """The stored ensemble and agreement-mlp gates read the device's exits on the edge: both calls agree."""
    root, _, _ = four_exit_bundle
    runs = {}
    for streamed in (False, True):
        first, bundles = load_local_chain(root, policy=policy, streamed=streamed)
        link = LocalLink(first)
        _, records = feed_and_report(link, test_slice.images, test_slice.labels, first.spec.model_id, 32,
                                     ["device", "edge", "cloud"], bundles[0].manifest.full_network_flops,
                                     forward_stream=link.stream if streamed else None)
        runs[streamed] = predictions_by_id(records)
    assert runs[True] == runs[False]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("policy", [None, "ensemble"])
def test_served_tiers_with_two_exits_each_answer_as_in_process(four_exit_bundle, test_slice, policy):
    root, _, _ = four_exit_bundle
    with LocalDeployment(root, policy=policy, startup_timeout_s=TIMEOUT) as dep:
        streamed = run_client(dep.device_address, test_slice.images, test_slice.labels, 32, root, policy=policy)
        unary = run_client(dep.device_address, test_slice.images, test_slice.labels, 32, root, policy=policy,
                           streamed=False)
        described = []
        for tier in ("device", "edge"):
            client = NextTierClient(dep.addresses[tier], timeout_s=TIMEOUT)
            try:
                described.append(client.describe())
            finally:
                client.close()
    for report in (streamed, unary):
        assert report["prediction_mismatches"] == 0 and report["accuracy"] == report["in_process_accuracy"]
        if policy is None:  # the exported gates give every exit a share
            assert sorted(report["exits_by_index"]) == ["0", "1", "2", "3", "4"]
    assert [[x.index for x in d.exits] for d in described] == [[0, 1], [2, 3]]
    assert [d.history for d in described] == [False, True]  # the edge receives the device's exits' logits
