"""Feed a labelled image set through a deployment, one request per batch, and build its report.

The deployment is any ``Forward`` function: ``common.serving.server.NextTierClient`` for a running device tier, or
``common.emulation.chain.LocalLink`` for the in-process chain. Both runs therefore produce the same report fields.
"""
from __future__ import annotations

import time

import torch

from common.emulation.report import RequestRecord, build_report
from common.wire.batch import Batch, merge_answers
from common.serving.runtime import Forward, ForwardStream


def feed(
    forward: Forward, images: torch.Tensor, model_id: str, batch_size: int, run_id: str = "run",
    forward_stream: ForwardStream | None = None,
) -> tuple[list[RequestRecord], float]:
    """Send ``images`` (uint8, N x C x H x W) in order; sample ids are row indices. Returns records and wall time.

    With ``forward_stream`` the requests go by the streamed call instead, and each sample's latency is the time
    from sending its request to receiving the part that answered it."""
    records = []
    start = time.perf_counter()
    for i, lo in enumerate(range(0, len(images), batch_size)):
        hi = min(lo + batch_size, len(images))
        batch = Batch(f"{run_id}-{i}", model_id, list(range(lo, hi)), images[lo:hi])
        t0 = time.perf_counter()
        if forward_stream is not None:
            records.append(receive_stream(forward_stream, batch, t0))
            continue
        forwarded = forward(batch)
        records.append(RequestRecord(forwarded.answer, (time.perf_counter() - t0) * 1e3, forwarded.request_bytes))
    return records, time.perf_counter() - start


def receive_stream(forward_stream: ForwardStream, batch: Batch, t0: float) -> RequestRecord:
    """Send ``batch`` by ``forward_stream`` (started at ``perf_counter()`` ``t0``) and record when each sample's
    answer arrived; the record's answer is the merge of the parts."""
    parts, sample_ms, size = [], {}, 0
    for part in forward_stream(batch):
        now = (time.perf_counter() - t0) * 1e3
        size += part.request_bytes
        sample_ms.update((p.sample_id, now) for p in part.answer.predictions)
        parts.append(part.answer)
    answer = merge_answers(batch.request_id, batch.sample_ids, parts)
    return RequestRecord(answer, (time.perf_counter() - t0) * 1e3, size, sample_ms)


def feed_and_report(
    forward: Forward, images: torch.Tensor, labels: torch.Tensor, model_id: str, batch_size: int,
    tiers: list[str], full_network_flops: float, run_id: str = "run", forward_stream: ForwardStream | None = None,
) -> tuple[dict, list[RequestRecord]]:
    records, wall = feed(forward, images, model_id, batch_size, run_id, forward_stream)
    label_of = dict(enumerate(labels.tolist()))
    return build_report(records, label_of, tiers, full_network_flops, wall), records
