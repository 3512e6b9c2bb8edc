"""Dynamic batching: concurrent requests to a tier are coalesced into one batch and split apart again.

``DynamicBatcher`` offers the runtime's ``process(batch, bytes_received)`` and sits between the servicer and a
``TierRuntime``. Each request is validated on its own (one bad request never fails its neighbours), queued, and a
worker takes the oldest request plus whatever else is queued or arrives within ``max_delay_s`` of taking it, up to
``max_batch`` samples. Time the samples already spent in earlier tiers' batchers (``Batch.queued_s``, on the wire
``queued_ms``) shortens that window: a chain of batching tiers holds a sample for one delay, not one per tier. The
merged batch gets fresh sample ids 0..N-1 (callers' ids may collide), runs once through the runtime - and so crosses
each link as one request - and every caller receives exactly its own predictions, under its own ids, with its share
of the trace. ``stream`` is the streamed form: each caller receives its own samples as soon as the merged batch's
stream decides them, and its share of the trace in a last part once the merged stream has ended. Up to ``workers`` merged batches are in flight at once, so one waiting on the next tier does not stall
the next one's compute. A worker collecting a batch is woken only when the batch can be completed or its wait is
over, not by every arrival. No gRPC here.
"""
from __future__ import annotations

import bisect
import math
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from common.errors import InvalidRequest
from common.wire.batch import Answer, Batch, merge_answers
from common.serving.runtime import MAX_REQUEST_ID, TierRuntime


@dataclass
class _Pending:
    batch: Batch
    bytes_received: int
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    answer: Answer | None = None
    error: BaseException | None = None
    parts: queue.SimpleQueue | None = None  # a streaming caller's partial answers, then an error or _END


_END = object()


def split_answer(answer: Answer, parts: list[tuple[Batch, int]], offsets: list[int]) -> list[Answer]:
    """Cut the answer of a merged batch into one answer per original request.

    ``parts`` are the original (batch, bytes received) pairs, ``offsets`` the first merged id of each. A caller's
    trace keeps the hops its samples reached; counts are its own, and the divisible costs (compute time, FLOPs,
    bytes) are its share by samples. ``forward_ms`` is wall time and stays whole.
    """
    tiers = [h.tier for h in answer.trace]
    out = []
    for (batch, size), first in zip(parts, offsets):
        preds = answer.predictions[first:first + len(batch.sample_ids)]
        # Hop index each sample was answered at (an exit tier missing from the trace: beyond every hop listed).
        depth = [tiers.index(p.exit_tier) if p.exit_tier in tiers else len(tiers) for p in preds]
        trace = []
        for j, hop in enumerate(answer.trace):
            reached = sum(1 for d in depth if d >= j)
            if reached == 0:
                break
            share = reached / hop.samples_in if hop.samples_in else 0.0
            onward = sum(1 for d in depth if d > j)
            next_in = answer.trace[j + 1].samples_in if j + 1 < len(answer.trace) else 0
            here = [p for p, d in zip(preds, depth) if d == j]
            trace.append(replace(  # times of the shared request itself (forwarding, codecs, link) stay whole
                hop, samples_in=reached, samples_exited=sum(1 for p in here if not p.degraded),
                compute_ms=hop.compute_ms * share,
                bytes_received=size if j == 0 else round(hop.bytes_received * share),
                bytes_sent=round(hop.bytes_sent * onward / next_in) if next_in else 0,
                flops=hop.flops * share, samples_degraded=sum(1 for p in here if p.degraded),
            ))
        ids = batch.sample_ids
        out.append(Answer(batch.request_id, [replace(p, sample_id=ids[i]) for i, p in enumerate(preds)], trace))
    return out


class DynamicBatcher:
    """Coalesce concurrent ``process`` calls into batches of at most ``max_batch`` samples (see module docstring)."""

    def __init__(self, runtime: TierRuntime, max_batch: int, max_delay_s: float, workers: int = 2,
                 on_batch=None) -> None:
        self.runtime = runtime
        self.on_batch = on_batch  # called with the sample count of every batch run (metrics)
        self.spec = runtime.spec
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._queue: deque[_Pending] = deque()
        self._queued_samples = 0
        # Samples the collecting worker still needs to fill its batch (inf: it is not waiting for more); an arrival
        # wakes it only when they are there, or when it waits for a first request (0).
        self._wanted = math.inf
        self._cv = threading.Condition()
        self._collect = threading.Lock()  # one worker gathers a batch at a time; others may be computing
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # samples per batch run -> how often (bounded by max_batch)
        self._threads = [threading.Thread(target=self._work, name=f"batcher-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def check_header(self, request_id: str, model_id: str, sample_ids) -> None:
        self.runtime.check_header(request_id, model_id, sample_ids)

    def process(self, batch: Batch, bytes_received: int = 0) -> Answer:
        """Answer ``batch`` (blocking), possibly as part of a larger batch."""
        self.runtime.validate(batch)
        pending = _Pending(batch, bytes_received)
        self._enqueue(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.answer

    def stream(self, batch: Batch, bytes_received: int = 0) -> Iterator[Answer]:
        """Answer ``batch`` as a stream of partial answers, possibly as part of a larger batch: the caller's own
        samples as they are decided, then (after a merged batch) a last part with its share of the trace."""
        self.runtime.validate(batch)
        pending = _Pending(batch, bytes_received, parts=queue.SimpleQueue())
        self._enqueue(pending)
        return self._drain(pending.parts)

    @staticmethod
    def _drain(parts: queue.SimpleQueue) -> Iterator[Answer]:
        while (item := parts.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _enqueue(self, pending: _Pending) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(pending)
            self._queued_samples += len(pending.batch.sample_ids)
            if self._queued_samples >= self._wanted:
                self._cv.notify()  # only the collecting worker waits on the condition (see _gather)

    def _gather(self) -> list[_Pending] | None:
        # One worker collects at a time (``_collect``), so it is the only thread waiting on ``_cv``.
        with self._collect, self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._wanted = 0
                self._cv.wait()
            group = [self._take()]
            n = len(group[0].batch.sample_ids)
            # The window opens now, shortened by what the samples already waited in earlier tiers' batchers.
            until = time.monotonic() + self.max_delay_s - group[0].batch.queued_s
            while n < self.max_batch:
                if self._queue:
                    if n + len(self._queue[0].batch.sample_ids) > self.max_batch:
                        break
                    group.append(self._take())
                    n += len(group[-1].batch.sample_ids)
                    until = min(until, time.monotonic() + self.max_delay_s - group[-1].batch.queued_s)
                    continue
                left = until - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._wanted = self.max_batch - n
                self._cv.wait(left)
            self._wanted = math.inf
            return group

    def _take(self) -> _Pending:
        p = self._queue.popleft()
        self._queued_samples -= len(p.batch.sample_ids)
        return p

    def _work(self) -> None:
        while (group := self._gather()) is not None:
            self._run(group)

    def _run(self, group: list[_Pending]) -> None:
        # The longest any sample of the batch has waited in batchers so far, this one included: the next tier's
        # batcher counts it against its own window.
        queued = time.monotonic() - min(p.arrived - p.batch.queued_s for p in group)
        try:
            if len(group) == 1:
                self._run_one(group[0], queued)
            else:
                offsets, n = [], 0
                for p in group:
                    offsets.append(n)
                    n += len(p.batch.sample_ids)
                deadlines = [p.batch.deadline for p in group if p.batch.deadline is not None]
                first = group[0].batch
                # The merged id must pass the next tier's length check whatever the callers' ids are.
                merged = Batch(f"{first.request_id[:MAX_REQUEST_ID - 16]}+{len(group) - 1}", first.model_id, list(range(n)),
                               torch.cat([p.batch.tensor for p in group]), min(deadlines) if deadlines else None,
                               queued, _merged_history([p.batch for p in group]))
                # Each part passed validate() on arrival; the merge keeps every check true (fresh unique ids, at
                # most max_batch samples), so the merged tensor is not scanned a second time.
                collected = []
                try:
                    for part in self.runtime.stream_validated(merged, sum(p.bytes_received for p in group)):
                        collected.append(part)
                        self._route(part, group, offsets)
                except InvalidRequest:
                    # Some part's values overflow the segment: find whose, fail only that one. Answers an earlier
                    # exit of this tier already streamed stand (a tier with several exits), and are not sent again.
                    streamed = {pred.sample_id for part in collected for pred in part.predictions}
                    self._run_apart(group, queued, streamed, offsets)
                    return
                self._ran(n)
                answer = merge_answers(merged.request_id, merged.sample_ids, collected)
                for p, a in zip(group, split_answer(answer, [(p.batch, p.bytes_received) for p in group], offsets)):
                    if p.parts is None:
                        p.answer = a
                    else:  # the predictions went out as they were decided: what is left is the trace
                        p.parts.put(Answer(a.request_id, [], a.trace))
        except BaseException as e:  # every caller of the batch gets the error, none waits forever
            for p in group:
                p.error = e
                if p.parts is not None:
                    p.parts.put(e)
        finally:
            for p in group:
                p.done.set()
                if p.parts is not None:
                    p.parts.put(_END)

    @staticmethod
    def _route(part: Answer, group: list[_Pending], offsets: list[int]) -> None:
        """Hand each streaming caller its own predictions of ``part`` (merged ids back to the caller's)."""
        mine: dict[int, list] = {}
        for pred in part.predictions:
            k = bisect.bisect_right(offsets, pred.sample_id) - 1
            if group[k].parts is not None:
                own = group[k].batch.sample_ids[pred.sample_id - offsets[k]]
                mine.setdefault(k, []).append(replace(pred, sample_id=own))
        for k, preds in mine.items():
            group[k].parts.put(Answer(group[k].batch.request_id, preds, []))

    def _run_one(self, p: _Pending, queued: float, sent: frozenset = frozenset()) -> None:
        """Run one caller's batch on its own (validated on arrival): merged for a unary caller, streamed otherwise,
        leaving out the predictions of the caller's samples in ``sent`` (its ids: answers it already has)."""
        p.batch.queued_s = queued
        parts = self.runtime.stream_validated(p.batch, p.bytes_received)
        if p.parts is None:
            p.answer = merge_answers(p.batch.request_id, p.batch.sample_ids, parts)
        else:
            for part in parts:
                if sent:
                    part = Answer(part.request_id, [q for q in part.predictions if q.sample_id not in sent],
                                  part.trace)
                    if not part.predictions and not part.trace:
                        continue
                p.parts.put(part)
        self._ran(len(p.batch.sample_ids))

    def _run_apart(self, group: list[_Pending], queued: float, streamed: set[int] | frozenset[int] = frozenset(),
                   offsets: list[int] | None = None) -> None:
        """Run each request of a merged batch that failed on its own, so one bad request never fails the others.
        ``streamed``: merged ids whose predictions already went to their (streaming) callers; those callers' runs
        leave them out, so every sample is answered once (their trace is the run's own)."""
        for k, p in enumerate(group):
            sent = frozenset()
            if streamed and p.parts is not None:
                ids = p.batch.sample_ids
                sent = frozenset(ids[m - offsets[k]] for m in streamed if offsets[k] <= m < offsets[k] + len(ids))
            try:
                self._run_one(p, queued, sent)
            except BaseException as e:
                p.error = e
                if p.parts is not None:
                    p.parts.put(e)

    def _ran(self, samples: int) -> None:
        self.batch_sizes[samples] += 1
        if self.on_batch is not None:
            self.on_batch(samples)

    def close(self) -> None:
        """Stop the workers once the queue is empty (call after the server has drained)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)


def _merged_history(batches: list[Batch]) -> torch.Tensor | None:
    """The earlier exits' logits of a merged batch: every part's (validated, so all or none carry them)."""
    histories = [b.history for b in batches]
    return None if any(h is None for h in histories) else torch.cat(histories)
