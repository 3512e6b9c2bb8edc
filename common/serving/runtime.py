"""The one tier runtime every tier runs: segment -> exit gate -> answer the exits -> forward the rest -> merge.

``TierRuntime`` knows nothing about gRPC or protobuf. The next tier is an injected function (``Forward``) that takes
the declined samples as a ``Batch`` and returns the next tier's ``Answer`` together with the serialized size of the
request it sent, so the runtime is tested in process and served unchanged by ``common.serving.server``.

Answers can also stream (``TierRuntime.stream``): the samples each of this tier's exits answered go out as soon as
its gate has decided, before the next exit runs and before the rest is forwarded, followed by the next tier's partial
answers as they arrive (from an injected ``ForwardStream``). ``process`` is the merge of that stream, so the unary
and the streamed call share one path.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Generator, Iterator

import torch
from torch import Tensor, nn

from common.errors import ConfigError, DownstreamError, InvalidRequest, PreconditionFailed, quote
from common.model.bundle import Manifest
from common.model.gates import ConstantGate, Gate, answer_stats, needs_history
from common.model.split import Segment
from common.wire.batch import Answer, Batch, Hop, Prediction, merge_answers
from common.wire.tensors import DTYPES, dtype_name


@dataclass
class Forwarded:
    """The next tier's answer and the serialized size of the request that carried the samples there."""

    answer: Answer
    request_bytes: int
    encode_ms: float = 0.0
    link_ms: float = 0.0


Forward = Callable[[Batch], Forwarded]
# The next tier answering as a stream: one ``Forwarded`` per partial answer, in arrival order. The first part carries
# the request's size and encoding time, every part its own share of the emulated link delay. A failure raises
# ``DownstreamError`` from the iteration, possibly after some parts.
ForwardStream = Callable[[Batch], Iterator[Forwarded]]
ON_DOWNSTREAM_FAILURE = ("degrade", "fail")
MAX_REQUEST_ID = 256


@dataclass(frozen=True)
class TierSpec:
    """Static facts about the tier a runtime serves (read from its bundle manifest)."""

    tier: str
    model_id: str
    exits: tuple[int, ...]  # the model's exits this tier holds (global indices), earliest first
    input_shape: tuple[int, ...]  # per sample
    input_dtype: torch.dtype
    exit_flops: tuple[float, ...]  # per sample, of each exit's block of stages and its head
    is_last: bool
    max_batch: int = 512
    send_flops: float = 0.0  # per forwarded sample: encoding what is sent (a learned bottleneck)
    # Requests carry the logits of every earlier exit ((N, exits[0], K), "history") when a gate or a cascade head
    # needs them; a tier that receives them passes them on, with its own exits' logits added.
    history: bool = False
    num_classes: int = 0

    @property
    def exit_index(self) -> int:
        """The tier's last exit, where the samples it forwards leave it."""
        return self.exits[-1]

    @property
    def history_in(self) -> int:
        """How many earlier exits' logits a request to this tier carries (0: none)."""
        return self.exits[0] if self.history else 0

    @classmethod
    def from_manifest(cls, m: Manifest, max_batch: int = 512) -> "TierSpec":
        return cls(tier=m.tier, model_id=m.model_id, exits=m.exits, input_shape=m.input_shape,
                   input_dtype=DTYPES[m.input_dtype][0], exit_flops=m.exit_flops, is_last=m.is_last,
                   max_batch=max_batch, send_flops=m.send_flops, history=m.history, num_classes=len(m.class_names))


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

    def __init__(self, spec: TierSpec, segment: nn.Module, gate: Gate | list[Gate], forward: Forward | None = None,
                 compute_scale: float = 1.0, on_downstream_failure: str = "degrade",
                 forward_stream: ForwardStream | None = None) -> None:
        if not spec.is_last and forward is None and forward_stream is None:
            raise ValueError(f"tier {spec.tier!r} is not the last tier and needs a next tier to forward to")
        if on_downstream_failure not in ON_DOWNSTREAM_FAILURE:
            raise ValueError(f"on_downstream_failure must be one of {ON_DOWNSTREAM_FAILURE}")
        # "degrade": when the next tier is unreachable or the deadline runs out (a DownstreamError with code
        # UNAVAILABLE), answer the forwarded samples with this tier's own exit, marked degraded. "fail": pass the
        # error on. A next tier that *refuses* the samples (any other code) is a broken deployment: always an error.
        self.on_downstream_failure = on_downstream_failure
        self.spec = spec
        self.segment = segment.eval() if isinstance(segment, Segment) else segment if isinstance(segment, _OneExit) \
            else _OneExit(segment.eval())
        if self.segment.num_exits != len(spec.exits):
            raise ValueError(f"tier {spec.tier!r} holds exits {list(spec.exits)} but its segment has "
                             f"{self.segment.num_exits}")
        gates = list(gate) if isinstance(gate, (list, tuple)) else [gate] * len(spec.exits)
        if len(gates) != len(spec.exits):
            raise ValueError(f"tier {spec.tier!r} holds {len(spec.exits)} exits, got {len(gates)} gates")
        if spec.is_last:  # the final exit always answers, whatever gate its manifest names
            gates[-1] = ConstantGate(True)
        if spec.exits[0] > 0 and not spec.history and any(needs_history(g) for g in gates):
            raise ConfigError(f"a {', '.join(sorted({g.kind for g in gates if needs_history(g)}))} gate reads the "
                              f"earlier exits' logits, and the {spec.tier} bundle was exported without them on the "
                              "wire: export it with that policy")
        self.gates: list[Gate] = gates
        self.forward = forward
        self.forward_stream = forward_stream  # preferred over ``forward`` when given
        # Emulate a slower (or faster-looking) machine: compute is stretched to compute_scale x the measured time.
        self.compute_scale = compute_scale

    @property
    def gate(self) -> Gate:
        """The gate of the tier's last exit (the one deciding what it forwards)."""
        return self.gates[-1]

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
        if not s.history_in:
            batch.history = None  # nothing here reads earlier exits' logits
            return
        h, want = batch.history, (n, s.history_in, s.num_classes)
        if h is None:
            raise InvalidRequest(f"tier {s.tier!r} needs the logits of exits 0..{s.history_in - 1} in the request's "
                                 "history field")
        if tuple(h.shape) != want or not h.is_floating_point():
            raise InvalidRequest(f"history must be a floating-point tensor of shape {list(want)}, got "
                                 f"{dtype_name(h.dtype)} {list(h.shape)}")
        if not all_finite(h):
            raise InvalidRequest("history contains NaN or Inf values")

    def process(self, batch: Batch, bytes_received: int = 0) -> Answer:
        """Answer every sample of ``batch``: here when the gate accepts it, otherwise via the next tier."""
        self.validate(batch)
        return self.run_validated(batch, bytes_received)

    def run_validated(self, batch: Batch, bytes_received: int = 0) -> Answer:
        """``process`` without the checks, for a batch already known to pass ``validate`` (the dynamic batcher's
        merged batches, whose parts were each validated on arrival)."""
        return merge_answers(batch.request_id, batch.sample_ids, self.stream_validated(batch, bytes_received))

    def stream(self, batch: Batch, bytes_received: int = 0) -> Iterator[Answer]:
        """Answer ``batch`` as a stream of partial answers (see ``stream_validated``); validated first."""
        self.validate(batch)
        return self.stream_validated(batch, bytes_received)

    def _forward_parts(self, onward: Batch) -> Iterator[Forwarded]:
        if self.forward_stream is not None:
            return self.forward_stream(onward)
        return iter((self.forward(onward),))

    @contextmanager
    def _computing(self, hop: Hop) -> Iterator[None]:
        """A piece of this tier's computation: in inference mode, its time added to ``hop``. On an emulated slower
        machine (``compute_scale`` > 1) the piece is stretched before anything it decided goes out."""
        start = time.perf_counter()
        with torch.inference_mode():
            yield
        spent = time.perf_counter() - start
        if self.compute_scale > 1:
            time.sleep((self.compute_scale - 1) * spent)
            spent = time.perf_counter() - start
        hop.compute_ms += spent * 1e3

    def _run_exits(self, batch: Batch, hop: Hop) -> Generator[tuple[list[Prediction], bool], None, _Onward | None]:
        """Run this tier's exits one after the other, each on the samples no earlier exit took. Yields the
        predictions of the samples each exit answers as soon as its gate has decided, before the next exit's stages
        run, with ``True`` on the tier's last answers (its computation complete by then); returns what goes on to
        the next tier (``None`` when nothing does). ``hop`` gathers the compute time, FLOPs and exits."""
        s = self.spec
        ids, x = batch.sample_ids, batch.tensor
        # The logits of every exit so far, when this tier knows them all (it received them, or none came before).
        known, history = bool(s.history_in) or s.exits[0] == 0, batch.history if s.history_in else None
        here = list(range(len(ids)))  # positions in ``batch`` of the samples still here
        for j, (index, gate) in enumerate(zip(s.exits, self.gates)):
            last = j == len(s.exits) - 1
            with self._computing(hop):
                previous = history[:, -1] if history is not None else None
                x, logits = self.segment.run_exit(j, x, previous)
                hop.flops += s.exit_flops[j] * len(here)
                if not all_finite(logits):
                    raise _out_of_range(s.tier, "exit head")
                if known:
                    mine = logits.float().unsqueeze(1)
                    history = mine if history is None else torch.cat([history, mine], dim=1)
                stats = answer_stats(gate, logits, history)
                leaves = gate(logits, stats, history).to(torch.bool).tolist()
                labels, confidences = stats["label"].tolist(), stats["confidence"].tolist()  # one conversion each
                local = [Prediction(ids[here[i]], labels[i], confidences[i], s.tier, index)
                         for i, out in enumerate(leaves) if out]
                stay = [i for i, out in enumerate(leaves) if not out]
                if stay and len(stay) < len(here):  # everyone staying (a never gate, a hard batch): no gathered copy
                    x, here = x[stay], [here[i] for i in stay]
                    history = history[stay] if history is not None else None
                    labels, confidences = [labels[i] for i in stay], [confidences[i] for i in stay]
                if stay and last:
                    hop.flops += s.send_flops * len(here)
                    x = self.segment.send(x)
                    if x.is_floating_point() and not all_finite(x):
                        # Finite inputs that overflow in our own segment: the caller's values are out of range. Sent
                        # on, the next tier would refuse them, and the caller would see a broken deployment instead.
                        # Checked before the tier's last answers go out: with one exit, a refused request has none.
                        raise _out_of_range(s.tier, "segment")
            hop.samples_exited += len(local)
            if stay and not last:
                if local:
                    yield local, False
                continue
            if local:
                yield local, True
            if not stay:
                return None
            onward = Batch(batch.request_id, batch.model_id, [ids[i] for i in here], x, batch.deadline,
                           batch.queued_s, history if s.history and history is not None else None)
            return _Onward(onward, labels, confidences)
        raise AssertionError("unreachable: the last exit returns")

    def stream_validated(self, batch: Batch, bytes_received: int = 0) -> Iterator[Answer]:
        """Partial answers of ``batch``, every sample in exactly one of them: first, exit by exit, the samples this
        tier's exits answered, each exit's yielded as soon as its gate has decided and before the next exit's stages
        run (this tier's hop rides on its last answers, when its computation is complete), then each partial answer
        of the next tier as it arrives, then a closing part with this tier's forwarding figures (a hop of this tier
        with ``samples_in`` 0) and, should the next tier fail, the samples it had not answered yet, answered here
        degraded by the tier's last exit. With no answer at the tier's last exit the hop rides on the first relayed
        part instead. ``merge_answers`` of the parts is the unary answer. Values that overflow a later exit's stages
        refuse the request after an earlier exit's answers have gone out; the unary answer, merged, has none."""
        s = self.spec
        hop = Hop(s.tier, len(batch.sample_ids), 0, 0.0, bytes_received)
        exits = self._run_exits(batch, hop)
        held = [hop]  # this tier's hop goes out with the first part sent once its computation is complete
        while True:
            try:
                local, complete = next(exits)
            except StopIteration as done:
                rest = done.value
                break
            yield Answer(batch.request_id, local, held if complete else [])
            if complete:
                held = []
        if rest is None:
            return
        onward = rest.batch
        closing = Hop(s.tier, 0, 0, 0.0)
        outstanding = set(onward.sample_ids)
        t0 = time.perf_counter()
        parts = None
        try:
            parts = self._forward_parts(onward)
            for part in parts:
                closing.bytes_sent += part.request_bytes
                closing.encode_ms += part.encode_ms
                closing.link_ms += part.link_ms
                got = [p.sample_id for p in part.answer.predictions]
                if len(set(got)) != len(got) or not outstanding.issuperset(got):
                    raise DownstreamError("the next tier answered samples it was not sent or answered twice",
                                          "INTERNAL")
                outstanding.difference_update(got)
                yield Answer(batch.request_id, part.answer.predictions, held + part.answer.trace)
                held = []
            if outstanding:
                sent = len(onward.sample_ids)
                raise DownstreamError(f"the next tier answered {sent - len(outstanding)} samples for {sent} sent",
                                      "INTERNAL")
        except DownstreamError as e:
            closing.forward_ms = (time.perf_counter() - t0) * 1e3
            if e.code != "UNAVAILABLE" or self.on_downstream_failure != "degrade":
                raise
            # Answer what the next tier has not answered with our own last exit: worse than the next tier, but an
            # answer.
            degraded = [Prediction(i, label, confidence, s.tier, s.exit_index, degraded=True)
                        for i, label, confidence in zip(onward.sample_ids, rest.labels, rest.confidences)
                        if i in outstanding]
            closing.samples_degraded, closing.downstream_error = len(degraded), str(e)
            yield Answer(batch.request_id, degraded, held + [closing])
            return
        finally:
            close = getattr(parts, "close", None)
            if close is not None:  # a stream abandoned half way: cancel the call to the next tier
                close()
        closing.forward_ms = (time.perf_counter() - t0) * 1e3
        yield Answer(batch.request_id, [], held + [closing])


@dataclass
class _Onward:
    """What a tier forwards: the batch for the next tier, and its last exit's answers for those samples (given,
    marked degraded, when the next tier cannot answer)."""

    batch: Batch
    labels: list[int]
    confidences: list[float]


class _OneExit:
    """Any module computing ``(features to send, logits)`` in one call, as a segment with a single exit."""

    num_exits = 1

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def run_exit(self, j: int, x: Tensor, previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.module(x)

    def send(self, features: Tensor) -> Tensor:
        return features


def _out_of_range(tier: str, part: str) -> InvalidRequest:
    return InvalidRequest(f"input values out of range: the {tier} tier's {part} overflows to NaN or Inf on them")
