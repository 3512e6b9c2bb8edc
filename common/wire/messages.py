"""Runtime dataclasses <-> protobuf messages. Pure conversion, no networking."""
from __future__ import annotations

import time
from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from common.wire import codecs, tensors
from common.wire.tensors import TensorLimits
from common.wire.codecs import FLOAT32, WireCodec
from common.errors import InvalidRequest
from common.wire.batch import Answer, Batch, Hop, Prediction
from proto import splitexit_pb2 as pb

MAX_QUEUED_MS = 3_600_000.0  # an hour: far beyond any batching delay, small enough to be plainly bogus above


def _varint(n: int) -> bytes:
    """``n`` >= 0 as a protobuf base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_delimited_tag(field: FieldDescriptor) -> bytes:
    assert field.number < 16, "a one-byte tag needs a field number below 16"
    return bytes([field.number << 3 | 2])  # wire type 2: length-delimited


_TENSOR_TAG = _length_delimited_tag(pb.InferRequest.DESCRIPTOR.fields_by_name["tensor"])
_DATA_TAG = _length_delimited_tag(pb.Tensor.DESCRIPTOR.fields_by_name["data"])


def encode_request(batch: Batch, wire: WireCodec = FLOAT32) -> bytes:
    """The serialized ``InferRequest`` carrying ``batch`` over a link that uses ``wire``.

    The encoded tensor is copied once, straight into the result, instead of into a message, then into its
    serialization. Protobuf serializes the request without its tensor and the tensor without its ``data``; the
    ``tensor`` field is then written by hand, exactly once: its tag and length, the tensor's other fields, and
    ``data`` last. Field order is free in the protobuf encoding, and every field occurs once, so every mainstream
    decoder reads the message ``request_from_batch`` returns (protobufjs 7, for one, does not merge a repeated
    occurrence of an embedded message, which an earlier two-occurrence encoding relied on).
    """
    header, data = codecs.encode_parts(batch.tensor, wire)
    head = pb.InferRequest(request_id=batch.request_id, model_id=batch.model_id, sample_ids=batch.sample_ids,
                           queued_ms=batch.queued_s * 1e3)
    if batch.history is not None:  # a few floats per sample: encoded the usual way, with the link's codec
        head.history.CopyFrom(codecs.encode(batch.history, wire))
    head = head.SerializeToString()
    inner = header.SerializeToString() + _DATA_TAG + _varint(len(data))
    return b"".join((head, _TENSOR_TAG, _varint(len(inner) + len(data)), inner, data))


def encode_request_timed(batch: Batch, wire: WireCodec = FLOAT32) -> tuple[bytes, float]:
    """``encode_request`` and the milliseconds it took (a hop reports its encoding time in its trace)."""
    start = time.perf_counter()
    request = encode_request(batch, wire)
    return request, (time.perf_counter() - start) * 1e3


def request_from_batch(batch: Batch, wire: WireCodec = FLOAT32) -> pb.InferRequest:
    """The ``InferRequest`` message ``encode_request`` serializes."""
    return pb.InferRequest.FromString(encode_request(batch, wire))


@dataclass(frozen=True)
class Received:
    """An ``InferRequest`` as a tier received it: the parsed message and its serialized size (what the link carried,
    known without serializing the message again)."""

    message: pb.InferRequest
    nbytes: int
    error: str = ""  # why the bytes are not an InferRequest (``message`` is then empty)

    @classmethod
    def parse(cls, data: bytes) -> "Received":
        """Parse a request body. Bytes that are not an ``InferRequest`` give a ``Received`` carrying ``error`` instead
        of raising: gRPC would turn a deserializer's exception into INTERNAL with a logged traceback, where the
        caller should get INVALID_ARGUMENT and the tier one warning line."""
        try:
            return cls(pb.InferRequest.FromString(data), len(data))
        except DecodeError:
            return cls(pb.InferRequest(), len(data), f"the request body ({len(data)} bytes) is not a valid "
                                                      f"splitexit.v1.InferRequest")


def batch_from_request(request: pb.InferRequest, limits: TensorLimits = tensors.DEFAULT_LIMITS) -> Batch:
    if not request.HasField("tensor"):
        raise InvalidRequest("request has no tensor")
    queued_ms = request.queued_ms
    if not 0 <= queued_ms <= MAX_QUEUED_MS:  # NaN, negative or absurd: a bad request
        raise InvalidRequest(f"queued_ms must be between 0 and {MAX_QUEUED_MS:g}, got {queued_ms!r}")
    history = codecs.decode(request.history, limits) if request.HasField("history") else None
    return Batch(request.request_id, request.model_id, list(request.sample_ids), codecs.decode(request.tensor, limits),
                 queued_s=queued_ms / 1e3, history=history)


def reply_from_answer(answer: Answer) -> pb.InferReply:
    return pb.InferReply(
        request_id=answer.request_id,
        predictions=[
            pb.Prediction(
                sample_id=p.sample_id, label=p.label, confidence=p.confidence,
                exit_tier=p.exit_tier, exit_index=p.exit_index, degraded=p.degraded,
            )
            for p in answer.predictions
        ],
        trace=[
            pb.HopTrace(
                tier=h.tier, samples_in=h.samples_in, samples_exited=h.samples_exited, compute_ms=h.compute_ms,
                bytes_received=h.bytes_received, bytes_sent=h.bytes_sent, forward_ms=h.forward_ms, flops=h.flops,
                encode_ms=h.encode_ms, decode_ms=h.decode_ms, link_ms=h.link_ms, handle_ms=h.handle_ms,
                samples_degraded=h.samples_degraded, downstream_error=h.downstream_error,
            )
            for h in answer.trace
        ],
    )


def answer_from_reply(reply: pb.InferReply) -> Answer:
    return Answer(
        reply.request_id,
        [Prediction(p.sample_id, p.label, p.confidence, p.exit_tier, p.exit_index, p.degraded)
         for p in reply.predictions],
        [
            Hop(h.tier, h.samples_in, h.samples_exited, h.compute_ms, h.bytes_received, h.bytes_sent,
                h.forward_ms, h.flops, h.encode_ms, h.decode_ms, h.link_ms, h.handle_ms, h.samples_degraded,
                h.downstream_error)
            for h in reply.trace
        ],
    )
