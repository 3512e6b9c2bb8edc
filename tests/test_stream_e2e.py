"""Streamed answers end to end: streamed == unary == in process, in process and across three tier processes."""
from __future__ import annotations

import threading

import pytest

from common.emulation.chain import LocalLink, evaluate_in_process, load_local_chain
from common.emulation.deployment import LocalDeployment
from common.emulation.feed import feed
from common.emulation.report import format_summary, predictions_by_id
from common.serving.client import NextTierClient
from common.wire.batch import Batch
from common.wire.codecs import WireCodec, link_args
from device.client import run_client

TIMEOUT = 60
TIERS = ("device", "edge", "cloud")


@pytest.mark.parametrize("policy, codec", [(None, "float32"), (None, "int8"), ("mlp", "int8"), ("cost", "float32")])
def test_in_process_streamed_chain_equals_unary_chain(tiny_bundle, mixed_gates, test_slice, policy, codec):
    gates = mixed_gates if policy is None else None
    wires = {t: WireCodec(codec) for t in TIERS[:-1]}
    runs = {}
    for streamed in (False, True):
        first, bundles = load_local_chain(tiny_bundle, gates, policy, wires, streamed=streamed)
        link = LocalLink(first)
        records, _ = feed(link, test_slice.images, bundles[0].model_id, 32, forward_stream=link.stream if streamed
                          else None)
        runs[streamed] = records
    assert predictions_by_id(runs[True]) == predictions_by_id(runs[False])
    exits = {p.exit_tier for r in runs[True] for p in r.answer.predictions}
    assert len(exits) >= 2, exits  # the gates did route
    unary, streamed = runs[False][0].answer.trace, runs[True][0].answer.trace
    assert [(h.tier, h.samples_in, h.samples_exited, h.bytes_sent) for h in streamed] == [
        (h.tier, h.samples_in, h.samples_exited, h.bytes_sent) for h in unary]


def _concurrent_streams(address: str, images, model_id: str, per_request: int, threads: int = 4) -> dict:
    """Send ``images`` as requests of ``per_request`` samples from ``threads`` threads at once over the streamed
    call; sample id -> every prediction received for it."""
    client = NextTierClient(address, timeout_s=TIMEOUT)
    got: dict[int, list] = {}
    lock, errors = threading.Lock(), []
    starts = list(range(0, len(images), per_request))

    def send(k: int) -> None:
        try:
            for lo in starts[k::threads]:
                ids = list(range(lo, min(lo + per_request, len(images))))
                for part in client.stream(Batch(f"c{lo}", model_id, ids, images[ids[0]:ids[-1] + 1])):
                    with lock:
                        for p in part.answer.predictions:
                            got.setdefault(p.sample_id, []).append(p)
        except Exception as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=send, args=(k,)) for k in range(threads)]
    try:
        for w in workers:
            w.start()
    finally:
        for w in workers:
            w.join(TIMEOUT)
        client.close()
    assert not errors, errors
    return got


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("policy, codec, batching", [(None, "float32", False), ("mlp", "int8", True),
                                                     ("cost", "float32", True)])
def test_served_streamed_equals_unary_equals_in_process(tiny_bundle, mixed_gates, test_slice, policy, codec,
                                                        batching):
    gates = mixed_gates if policy is None else {}
    wires = {t: WireCodec(codec) for t in TIERS[:-1]}
    extra = {t: link_args(w, None) for t, w in wires.items()}
    if batching:
        for t in TIERS:
            extra[t] = extra.get(t, []) + ["--max-queue-delay-ms", "20"]
    images, labels = test_slice.images, test_slice.labels
    with LocalDeployment(tiny_bundle, gates=gates, policy=policy, extra_args=extra, startup_timeout_s=TIMEOUT) as dep:
        streamed = run_client(dep.device_address, images, labels, 32, tiny_bundle, gates, policy=policy, wires=wires)
        unary = run_client(dep.device_address, images, labels, 32, tiny_bundle, gates, policy=policy, wires=wires,
                           streamed=False)
        concurrent = _concurrent_streams(dep.device_address, images, streamed["model_id"], 16) if batching else None
    for report in (streamed, unary):
        assert report["prediction_mismatches"] == 0
        assert report["accuracy"] == report["in_process_accuracy"]
    assert streamed["exits"] == unary["exits"] and sum(1 for n in streamed["exits"].values() if n) >= 2
    by_exit = streamed["latency_ms_by_exit"]
    assert set(by_exit) == set(TIERS) and streamed["sample_latency_ms"]["p50"] is not None
    assert "latency per sample by exit" in format_summary(streamed)
    if concurrent is not None:
        # Merged batches of several callers: every sample answered exactly once, under its own id.
        assert sorted(concurrent) == list(range(len(images)))
        assert all(len(v) == 1 for v in concurrent.values())
        # Batch composition can move an int8 link's quantization steps: the same predictions up to a few samples.
        _, ref = evaluate_in_process(tiny_bundle, images, labels, 32, gates, policy, wires)
        reference = predictions_by_id(ref)
        differ = sum(1 for i, v in concurrent.items() if (v[0].label, v[0].exit_tier, v[0].exit_index) != reference[i])
        assert differ <= (0 if codec == "float32" else len(images) // 20), differ
