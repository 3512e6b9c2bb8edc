"""The one tier runtime every tier runs: segment -> exit gate -> answer the exits -> forward the rest -> merge.

``TierRuntime`` knows nothing about gRPC or protobuf. The next tier is an injected function (``Forward``) that takes
the declined samples as a ``Batch`` and returns the next tier's ``Answer`` together with the serialized size of the
request it sent, so the runtime is tested in process and served unchanged by ``common.serving.server``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from common.errors import DownstreamError, InvalidRequest, PreconditionFailed, quote
from common.model.bundle import Manifest
from common.model.gates import ConstantGate, Gate, softmax_stats
from common.wire.batch import Answer, Batch, Hop, Prediction
from common.wire.tensors import DTYPES, dtype_name


@dataclass
class Forwarded:
    """The next tier's answer and the serialized size of the request that carried the samples there."""

    answer: Answer
    request_bytes: int
    encode_ms: float = 0.0
    link_ms: float = 0.0


Forward = Callable[[Batch], Forwarded]
ON_DOWNSTREAM_FAILURE = ("degrade", "fail")
MAX_REQUEST_ID = 256


@dataclass(frozen=True)
class TierSpec:
    """Static facts about the tier a runtime serves (read from its bundle manifest)."""

    tier: str
    model_id: str
    exit_index: int
    input_shape: tuple[int, ...]  # per sample
    input_dtype: torch.dtype
    flops_per_sample: float  # segment + exit head
    is_last: bool
    max_batch: int = 512

    @classmethod
    def from_manifest(cls, m: Manifest, max_batch: int = 512) -> "TierSpec":
        return cls(tier=m.tier, model_id=m.model_id, exit_index=m.exit_index, input_shape=m.input_shape,
                   input_dtype=DTYPES[m.input_dtype][0], flops_per_sample=m.flops_per_sample, is_last=m.is_last,
                   max_batch=max_batch)


def all_finite(x: Tensor) -> bool:
    """Whether every element of the floating-point tensor ``x`` is finite.

    NaN and infinities propagate through addition, so a finite sum proves every element finite in one cheap
    reduction; only a sum that is not finite (NaN or Inf inside, or finite values overflowing) needs the
    element-wise test, which is several times slower and allocates a mask as large as ``x``.
    """
    if math.isfinite(x.sum().item()):
        return True
    return bool(torch.isfinite(x).all())


class TierRuntime:
    """Serve one segment: run it, let the gate pick who exits here, forward the rest as one batch."""

    def __init__(self, spec: TierSpec, segment: nn.Module, gate: Gate, forward: Forward | None = None,
                 compute_scale: float = 1.0, on_downstream_failure: str = "degrade") -> None:
        if not spec.is_last and forward is None:
            raise ValueError(f"tier {spec.tier!r} is not the last tier and needs a next tier to forward to")
        if on_downstream_failure not in ON_DOWNSTREAM_FAILURE:
            raise ValueError(f"on_downstream_failure must be one of {ON_DOWNSTREAM_FAILURE}")
        # "degrade": when the next tier is unreachable or the deadline runs out (a DownstreamError with code
        # UNAVAILABLE), answer the forwarded samples with this tier's own exit, marked degraded. "fail": pass the
        # error on. A next tier that *refuses* the samples (any other code) is a broken deployment: always an error.
        self.on_downstream_failure = on_downstream_failure
        self.spec = spec
        self.segment = segment.eval()
        # The last tier always answers, whatever gate its manifest names.
        self.gate: Gate = ConstantGate(True) if spec.is_last else gate
        self.forward = forward
        # Emulate a slower (or faster-looking) machine: compute is stretched to compute_scale x the measured time.
        self.compute_scale = compute_scale

    def check_header(self, request_id: str, model_id: str, sample_ids) -> None:
        """The checks that need no tensor: run before decoding (and so before any decompression), cheapest first."""
        s = self.spec
        if len(request_id) > MAX_REQUEST_ID:  # ids end up in logs and traces: keep them short
            raise InvalidRequest(f"request id of {len(request_id)} characters; the limit is {MAX_REQUEST_ID}")
        if model_id != s.model_id:
            raise PreconditionFailed(f"model id {quote(model_id)} does not match this tier's model {quote(s.model_id)}")
        n = len(sample_ids)
        if n == 0:
            raise InvalidRequest("empty batch: a request needs at least one sample")
        if n > s.max_batch:
            raise InvalidRequest(f"batch of {n} samples exceeds this tier's limit of {s.max_batch}")
        if len(set(sample_ids)) != n:
            raise InvalidRequest("duplicate sample ids in the request")

    def validate(self, batch: Batch) -> None:
        """Raise ``InvalidRequest`` / ``PreconditionFailed`` when ``batch`` cannot be served by this tier."""
        s = self.spec
        self.check_header(batch.request_id, batch.model_id, batch.sample_ids)
        n = len(batch.sample_ids)
        x = batch.tensor
        if x.dim() == 0 or x.shape[0] != n:
            raise InvalidRequest(f"{n} sample ids but the tensor's first dimension is {tuple(x.shape)[:1]}")
        if tuple(x.shape[1:]) != s.input_shape:
            raise PreconditionFailed(
                f"tier {s.tier!r} takes per-sample shape {list(s.input_shape)}, got {list(x.shape[1:])}"
            )
        if x.dtype != s.input_dtype:
            raise PreconditionFailed(f"tier {s.tier!r} takes {dtype_name(s.input_dtype)} tensors, got "
                                     f"{dtype_name(x.dtype)}")
        if x.is_floating_point() and not all_finite(x):
            raise InvalidRequest("tensor contains NaN or Inf values")

    def process(self, batch: Batch, bytes_received: int = 0) -> Answer:
        """Answer every sample of ``batch``: here when the gate accepts it, otherwise via the next tier."""
        self.validate(batch)
        return self.run_validated(batch, bytes_received)

    def run_validated(self, batch: Batch, bytes_received: int = 0) -> Answer:
        """``process`` without the checks, for a batch already known to pass ``validate`` (the dynamic batcher's
        merged batches, whose parts were each validated on arrival)."""
        s = self.spec
        start = time.perf_counter()
        with torch.inference_mode():
            features, logits = self.segment(batch.tensor)
            if not all_finite(logits):
                raise _out_of_range(s.tier, "exit head")
            stats = softmax_stats(logits)
            exits = self.gate(logits, stats).to(torch.bool)
        compute_ms = (time.perf_counter() - start) * 1e3
        if self.compute_scale > 1:
            time.sleep((self.compute_scale - 1) * compute_ms / 1e3)
            compute_ms = (time.perf_counter() - start) * 1e3

        ids = batch.sample_ids
        labels, confidences = stats["label"].tolist(), stats["confidence"].tolist()  # one conversion, not one per sample
        exit_mask = exits.tolist()
        by_id: dict[int, Prediction] = {}
        for i, leaves in enumerate(exit_mask):
            if leaves:
                by_id[ids[i]] = Prediction(ids[i], labels[i], confidences[i], s.tier, s.exit_index)
        hop = Hop(s.tier, len(ids), len(by_id), compute_ms, bytes_received, flops=s.flops_per_sample * len(ids))
        trace = [hop]
        rest = [i for i, leaves in enumerate(exit_mask) if not leaves]
        if rest:
            # Everyone going on (a never gate, a hard batch) needs no gathered copy of the features.
            onward_features = features if len(rest) == len(ids) else features[rest]
            if onward_features.is_floating_point() and not all_finite(onward_features):
                # Finite inputs that overflow in our own segment: the caller's values are out of range. Sent on,
                # the next tier would refuse them, and the caller would see a broken deployment instead.
                raise _out_of_range(s.tier, "segment")
            onward = Batch(batch.request_id, batch.model_id, [ids[i] for i in rest], onward_features,
                           batch.deadline, batch.queued_s)
            t0 = time.perf_counter()
            try:
                forwarded = self.forward(onward)
            except DownstreamError as e:
                hop.forward_ms = (time.perf_counter() - t0) * 1e3
                if e.code != "UNAVAILABLE" or self.on_downstream_failure != "degrade":
                    raise
                # Answer what we would have forwarded with our own exit: worse than the next tier, but an answer.
                for i in rest:
                    by_id[ids[i]] = Prediction(ids[i], labels[i], confidences[i], s.tier, s.exit_index,
                                               degraded=True)
                hop.samples_degraded, hop.downstream_error = len(rest), str(e)
                return Answer(batch.request_id, [by_id[i] for i in ids], trace)
            hop.forward_ms = (time.perf_counter() - t0) * 1e3
            hop.bytes_sent = forwarded.request_bytes
            hop.encode_ms, hop.link_ms = forwarded.encode_ms, forwarded.link_ms
            got = [p.sample_id for p in forwarded.answer.predictions]
            if sorted(got) != sorted(onward.sample_ids):
                raise DownstreamError(
                    f"the next tier answered {len(got)} samples for {len(onward.sample_ids)} sent", "INTERNAL")
            by_id.update((p.sample_id, p) for p in forwarded.answer.predictions)
            trace += forwarded.answer.trace
        return Answer(batch.request_id, [by_id[i] for i in ids], trace)


def _out_of_range(tier: str, part: str) -> InvalidRequest:
    return InvalidRequest(f"input values out of range: the {tier} tier's {part} overflows to NaN or Inf on them")
