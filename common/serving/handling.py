"""Handling one received request: decode it, let the tier's runtime answer it, stamp this tier's hop.

Shared by the gRPC servicer and the in-process chain, so both decode, validate and time a request the same way.
"""
from __future__ import annotations

import time
from typing import Iterator

from common.errors import InvalidRequest
from common.serving.runtime import TierRuntime
from common.wire.batch import Answer, Batch
from common.wire.messages import Received, batch_from_request


def _receive(runtime: TierRuntime, received: Received, deadline: float | None) -> Batch:
    """The received request as a ``Batch``: refused first if it did not parse, then on everything that needs no
    tensor, so that a request refused anyway is never decoded (or inflated)."""
    if received.error:
        raise InvalidRequest(received.error)
    request = received.message
    runtime.check_header(request.request_id, request.model_id, request.sample_ids)
    batch = batch_from_request(request)
    batch.deadline = deadline
    return batch


def answer_request(runtime: TierRuntime, received: Received, deadline: float | None = None) -> Answer:
    """Decode the received request, let ``runtime`` answer it, and stamp this tier's hop with decode and handling
    time. ``deadline`` (``time.monotonic()``) is when the caller needs the answer; the runtime passes it on."""
    start = time.perf_counter()
    batch = _receive(runtime, received, deadline)
    decoded = time.perf_counter()
    answer = runtime.process(batch, bytes_received=received.nbytes)
    hop = answer.trace[0]
    hop.decode_ms = (decoded - start) * 1e3
    hop.handle_ms = (time.perf_counter() - start) * 1e3
    return answer


def answer_stream(runtime: TierRuntime, received: Received, deadline: float | None = None) -> Iterator[Answer]:
    """``answer_request`` as a stream of partial answers (``runtime.stream``). This tier's hop gets the decode time
    in its first part; its ``handle_ms`` is spread over the parts carrying a hop of this tier so that they add up to
    the time from receiving the request to the last such part."""
    start = time.perf_counter()
    batch = _receive(runtime, received, deadline)
    decoded = time.perf_counter()
    tier, counted, first = runtime.spec.tier, 0.0, True
    for part in runtime.stream(batch, bytes_received=received.nbytes):
        for hop in part.trace:
            if hop.tier == tier:
                elapsed = (time.perf_counter() - start) * 1e3
                hop.handle_ms, counted = elapsed - counted, elapsed
                if first:
                    hop.decode_ms, first = (decoded - start) * 1e3, False
        yield part
