"""Compute profiles stretch measured compute; the report's latency breakdown adds up per sample."""
import time

import pytest
import torch
from torch import nn

from common.model.gates import ConstantGate
from common.emulation.report import RequestRecord, latency_breakdown
from common.wire.batch import Answer, Batch, Hop, Prediction
from common.serving.runtime import TierRuntime
from tests.test_runtime import spec


class SlowSegment(nn.Module):
    def forward(self, x):
        time.sleep(0.02)
        return x, torch.zeros(len(x), 3)


def test_compute_scale_stretches_compute():
    batch = Batch("r", "m1", [0, 1], torch.zeros(2, 2))
    plain = TierRuntime(spec(is_last=True), SlowSegment(), ConstantGate(True)).process(batch)
    slow = TierRuntime(spec(is_last=True), SlowSegment(), ConstantGate(True), compute_scale=3).process(batch)
    assert plain.trace[0].compute_ms >= 20 and slow.trace[0].compute_ms >= 3 * 20 * 0.95


def test_breakdown_components_add_up_and_are_per_sample():
    def record(n, latency, **kw):
        preds = [Prediction(i, 0, 1.0, "device", 0) for i in range(n)]
        hops = [Hop("device", n, n, 10.0, encode_ms=1.0, link_ms=kw.get("link", 0.0)),
                Hop("edge", n, n, 20.0, decode_ms=2.0)]
        return RequestRecord(Answer("r", preds, hops), latency, 0)

    parts = latency_breakdown([record(3, 50.0, link=5.0), record(1, 100.0)], ["device", "edge", "cloud"])
    assert parts["total"]["mean"] == pytest.approx((3 * 50 + 100) / 4)  # weighted by samples
    assert parts["compute_edge"]["p50"] == 20.0 and parts["compute_cloud"]["mean"] == 0.0
    assert parts["queueing"]["p50"] == pytest.approx(50 - 10 - 20 - 1 - 2 - 5)
    assert parts["link"]["mean"] == pytest.approx(5 * 3 / 4)
    keys = ("compute_device", "compute_edge", "compute_cloud", "encode", "decode", "link", "queueing")
    assert sum(parts[k]["mean"] for k in keys) == pytest.approx(parts["total"]["mean"])
