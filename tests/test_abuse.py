"""Hostile callers: decompression bombs, unparseable bodies, huge or forged strings, out-of-range values, a caller
abandoning its call while the tier shuts down. Each gets a precise refusal; none gets INTERNAL or a traceback."""
from __future__ import annotations

import contextlib
import logging
import tracemalloc
import zlib

import grpc
import pytest
import torch
from torch import nn

from common.errors import DownstreamError, InvalidRequest, PreconditionFailed
from common.model.gates import ConfidenceGate, ConstantGate
from common.serving.client import NextTierClient
from common.serving.metrics import TierMetrics
from common.serving.runtime import TierRuntime
from common.serving.server import TierServicer, create_server
from common.wire import codecs
from common.wire.batch import Batch
from common.wire.codecs import WireCodec
from proto import splitexit_pb2 as pb
from tests.conftest import mark_serving
from tests.test_runtime import FakeNext, ToySegment, spec

INFER = "/splitexit.v1.Tier/Infer"


@contextlib.contextmanager
def _device_tier():
    """An in-process device tier (2 float32 features per sample) with metrics; yields (channel, metrics)."""
    metrics = TierMetrics("device")
    runtime = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), FakeNext())
    server, port, health = create_server(TierServicer(runtime, pb.TierDescription(tier="device"), metrics),
                                         "127.0.0.1:0", max_workers=4)
    server.start()
    mark_serving(health)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, metrics
    finally:
        channel.close()
        server.stop(0).wait()


@pytest.fixture(scope="module")
def served():
    """The device tier's raw ``Infer`` and its metrics."""
    with _device_tier() as (channel, metrics):
        yield channel.unary_unary(INFER), metrics


def _errors(metrics: TierMetrics, code: str) -> float:
    return metrics.registry.get_sample_value("splitexit_requests_total", {"tier": "device", "code": code}) or 0.0


def _call(infer, body: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        infer(body, timeout=10)
    return err.value


def _bomb(shape, inflated: int, **fields) -> pb.InferRequest:
    tensor = pb.Tensor(dtype="float32", shape=shape, codec="raw", compression="zlib",
                       data=zlib.compress(bytes(inflated), 9))
    fields = {"request_id": "bomb", "model_id": "m1", "sample_ids": [1], **fields}
    return pb.InferRequest(tensor=tensor, **fields)


# 1. Decompression bombs --------------------------------------------------------------------------------------------

def _refused_within_4_mib(msg: pb.Tensor, match: str) -> None:
    """Decoding ``msg`` is refused (``InvalidRequest`` matching ``match``) having allocated under 4 MiB."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest, match=match):
            codecs.decode(msg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"decoding allocated {peak} bytes"


@pytest.mark.parametrize("shape", [[0, 3, 32, 32], [1, 0, 16, 16]])
def test_zero_element_compressed_tensors_are_refused_without_inflating(shape):
    _refused_within_4_mib(_bomb(shape, 64 << 20).tensor, "no elements")  # 64 MiB of zeros in ~64 KiB


def test_inflation_is_bounded_by_the_declared_shape():
    _refused_within_4_mib(_bomb([1, 4, 8], 64 << 20).tensor, "more than the 128 bytes")  # 128 bytes declared


def test_trailing_bytes_after_the_zlib_stream_are_refused():
    msg = codecs.encode(torch.ones(2, 3), WireCodec("float32", "zlib"))
    assert torch.equal(codecs.decode(msg), torch.ones(2, 3))
    msg.data += b"trailing garbage"
    with pytest.raises(InvalidRequest, match="after the compressed stream"):
        codecs.decode(msg)


def test_empty_tensors_still_round_trip_every_codec():
    for wire in (WireCodec("float32", "zlib"), WireCodec("int8", "zlib"), WireCodec("int8"), WireCodec("float16")):
        for x in (torch.empty(0, 3, 2), torch.empty(2, 0, 4, 4)):
            assert codecs.decode(codecs.encode(x, wire)).shape == x.shape


@pytest.mark.parametrize("fields, code, words", [
    ({"model_id": "another-export"}, grpc.StatusCode.FAILED_PRECONDITION, "model id"),
    ({"sample_ids": []}, grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    ({"request_id": "x" * 1000}, grpc.StatusCode.INVALID_ARGUMENT, "request id"),
    ({"sample_ids": list(range(17))}, grpc.StatusCode.INVALID_ARGUMENT, "exceeds"),
])
def test_request_checks_run_before_any_decompression(served, fields, code, words):
    infer, _ = served
    err = _call(infer, _bomb([1, 4, 8], 16 << 20, **fields).SerializeToString())
    assert err.code() == code and words in err.details()


# 2. int8 with zero channels ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [[1, 0, 4, 4], [0, 0]])
def test_int8_without_scales_is_an_invalid_argument(served, shape):
    infer, _ = served
    request = pb.InferRequest(request_id="q", model_id="m1", sample_ids=[1],
                              tensor=pb.Tensor(dtype="float32", shape=shape, codec="int8"))
    err = _call(infer, request.SerializeToString())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "scale" in err.details()


# 3. Bodies that are not an InferRequest ----------------------------------------------------------------------------

def test_an_unparseable_body_is_an_invalid_argument_counted_and_logged_once(served, caplog):
    infer, metrics = served
    before = _errors(metrics, "INVALID_ARGUMENT")
    with caplog.at_level(logging.DEBUG):
        err = _call(infer, b"\xff\xff\xff\xff not a protobuf \n" * 3)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "InferRequest" in err.details()
    assert _errors(metrics, "INVALID_ARGUMENT") == before + 1
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage() and not warnings[0].exc_info


# 4. Caller strings: bounded and escaped, in replies and logs --------------------------------------------------------

def test_quote_truncates_and_escapes():
    from common.errors import quote

    assert quote("float32") == "'float32'"
    q = quote("a\nb" + "x" * 10_000)
    assert "\n" not in q and len(q) < 120 and q.startswith("'a\\nb") and "10003 characters" in q


@pytest.mark.parametrize("field", ["dtype", "codec", "compression", "model_id"])
def test_long_strings_are_not_echoed_whole(served, field, caplog):
    infer, _ = served
    request = pb.InferRequest(request_id="long", model_id="m1", sample_ids=[1],
                              tensor=codecs.encode(torch.ones(1, 2)))
    if field == "model_id":
        request.model_id = "m" * (1 << 20)
    else:
        setattr(request.tensor, field, "z" * (1 << 20))
    with caplog.at_level(logging.INFO):
        err = _call(infer, request.SerializeToString())
    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), err
    assert len(err.details()) < 1000
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)


def test_a_newline_in_a_request_id_cannot_forge_a_log_line(served, caplog):
    infer, _ = served
    request = pb.InferRequest(request_id="r1\n2026-01-01 device ERROR forged", model_id="other", sample_ids=[1],
                              tensor=codecs.encode(torch.ones(1, 2)))
    with caplog.at_level(logging.INFO):
        err = _call(infer, request.SerializeToString())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all("\n" not in m for m in messages), messages


# 5. Finite inputs that overflow inside the segment ------------------------------------------------------------------

class Amplify(nn.Module):
    """Features = 10 x input: finite inputs near float32's limit overflow to Inf."""

    def forward(self, x):
        return x * 10, torch.zeros(len(x), 3)


def test_inputs_that_overflow_the_segment_are_refused_as_out_of_range():
    nxt = FakeNext()
    runtime = TierRuntime(spec(), Amplify(), ConstantGate(False), nxt)
    with pytest.raises(InvalidRequest, match="out of range"):
        runtime.process(Batch("big", "m1", [1, 2], torch.tensor([[3e38, 1.0], [1.0, 1.0]])))
    assert nxt.calls == []
    assert len(runtime.process(Batch("ok", "m1", [1], torch.tensor([[3e30, 1.0]]))).predictions) == 1


def test_non_finite_logits_are_refused_too():
    class NanLogits(nn.Module):
        def forward(self, x):
            return x, torch.full((len(x), 3), float("inf")) * x[:, :1]

    runtime = TierRuntime(spec(is_last=True), NanLogits(), ConstantGate(True))
    with pytest.raises(InvalidRequest, match="out of range"):
        runtime.process(Batch("inf", "m1", [1], torch.tensor([[1.0, 1.0]])))


# 6. Forwarding on a closed channel ---------------------------------------------------------------------------------

def test_forwarding_on_a_closed_channel_is_unavailable_not_internal():
    client = NextTierClient("127.0.0.1:9", timeout_s=1.0)
    client.close()
    with pytest.raises(DownstreamError) as err:
        client(Batch("late", "m1", [1], torch.ones(1, 2)))
    assert err.value.code == "UNAVAILABLE" and "closed" in str(err.value)


def test_a_tier_whose_next_tier_channel_closed_answers_degraded():
    client = NextTierClient("127.0.0.1:9", timeout_s=1.0)
    client.close()
    runtime = TierRuntime(spec(), ToySegment(), ConstantGate(False), client)
    answer = runtime.process(Batch("late", "m1", [1], torch.ones(1, 2)))
    assert [p.degraded for p in answer.predictions] == [True]


# Error messages name wire dtypes -----------------------------------------------------------------------------------

def test_dtype_refusal_names_wire_dtypes():
    runtime = TierRuntime(spec(input_dtype=torch.uint8), ToySegment(), ConstantGate(True), FakeNext())
    with pytest.raises(PreconditionFailed) as err:
        runtime.process(Batch("d", "m1", [1], torch.ones(1, 2)))
    assert "takes uint8 tensors, got float32" in str(err.value) and "torch." not in str(err.value)


def test_with_dynamic_batching_an_overflowing_request_fails_alone():
    from common.serving.batching import DynamicBatcher

    runtime = TierRuntime(spec(), Amplify(), ConstantGate(False), FakeNext())
    batcher = DynamicBatcher(runtime, max_batch=16, max_delay_s=0.2, workers=1)
    try:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(batcher.process, Batch("bad", "m1", [1], torch.tensor([[3e38, 1.0]])))
            good = pool.submit(batcher.process, Batch("good", "m1", [1, 2], torch.ones(2, 2)))
            with pytest.raises(InvalidRequest, match="out of range"):
                bad.result(timeout=10)
            assert len(good.result(timeout=10).predictions) == 2
    finally:
        batcher.close()


# 10. A fuzz of the classes above, mixed ----------------------------------------------------------------------------

def _hostile(rng) -> bytes:
    """A request drawn from the abuse classes above: compressed payloads of any declared shape (zero dims, bombs,
    trailing bytes), int8 with any scale count, long or control-character strings, huge finite values, garbage."""
    n = rng.randint(0, 3)
    shape = [n, *rng.choice([[2], [0], [2, 1], [0, 4, 4], [1 << 20]])]
    values = rng.choice([1.0, 3e38, -3e38, 1e-38])
    x = torch.full((n, 2), values)
    r = pb.InferRequest(request_id=rng.choice(["r", "r\nforged", "x" * 300, "\x00\x1b[31m"]),
                        model_id=rng.choice(["m1", "m1", "m" * 20_000, "m1\n"]), sample_ids=list(range(n)),
                        tensor=codecs.encode(x, rng.choice([WireCodec(), WireCodec("int8"), WireCodec("float16")])))
    pick = rng.randrange(6)
    if pick == 0:  # compression with an arbitrary declared shape
        del r.tensor.shape[:]
        r.tensor.shape.extend(shape)
        r.tensor.compression = "zlib"
        r.tensor.data = zlib.compress(bytes(rng.choice([0, 8, 1 << 16, 1 << 22])))
    elif pick == 1:  # trailing bytes or a truncated stream
        r.tensor.compression = "zlib"
        body = zlib.compress(r.tensor.data)
        r.tensor.data = body + b"x" * rng.randint(1, 9) if rng.random() < 0.5 else body[:-rng.randint(1, 4)]
    elif pick == 2:  # int8 with any number of scales
        r.tensor.codec, r.tensor.dtype = "int8", "float32"
        del r.tensor.scale[:], r.tensor.zero_point[:]
        k = rng.randint(0, 3)
        r.tensor.scale.extend([rng.choice([1.0, 0.0, float("nan")])] * k)
        r.tensor.zero_point.extend([0.0] * k)
    elif pick == 3:  # long strings in every string field of the tensor
        setattr(r.tensor, rng.choice(["dtype", "codec", "compression"]), "q\n" * rng.randint(1, 20_000))
    elif pick == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    return r.SerializeToString()


def test_hostile_mix_never_gets_internal_and_stays_bounded(served, caplog):
    import random

    infer, _ = served
    rng = random.Random(20261204)
    codes: dict[str, int] = {}
    with caplog.at_level(logging.INFO):
        for _ in range(600):
            try:
                infer(_hostile(rng), timeout=10)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
                assert len(e.details()) <= 520 and "\n" not in e.details(), e.details()[:200]
            codes[code] = codes.get(code, 0) + 1
    assert set(codes) <= {"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION"}, codes
    assert codes.get("INVALID_ARGUMENT", 0) > 100, codes
    assert [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert all(len(r.getMessage()) < 1200 and "\n" not in r.getMessage() for r in caplog.records)
    reply = pb.InferReply.FromString(infer(pb.InferRequest(request_id="ok", model_id="m1", sample_ids=[1],
                                                           tensor=codecs.encode(torch.ones(1, 2))).SerializeToString(),
                                           timeout=10))
    assert len(reply.predictions) == 1


# 11. The streamed call gets the same refusals as the unary one ---------------------------------------------------

@pytest.fixture(scope="module")
def served_stream():
    """The device tier's ``InferStream``, as a raw call returning every reply, and its metrics."""
    with _device_tier() as (channel, metrics):
        stream = channel.unary_stream("/splitexit.v1.Tier/InferStream")
        yield (lambda body, timeout=10: list(stream(body, timeout=timeout))), metrics


def test_the_streamed_call_checks_the_header_before_inflating(served_stream):
    infer, _ = served_stream
    bad = _bomb([1, 2], 8, model_id="another-export")
    bad.tensor.data = b"not zlib at all"
    err = _call(infer, bad.SerializeToString())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "model id" in err.details()
    err = _call(infer, b"\xff\xff\xff")  # not an InferRequest at all
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_streamed_call_bounds_and_escapes_caller_strings(served_stream, caplog):
    infer, metrics = served_stream
    before = _errors(metrics, "FAILED_PRECONDITION")
    body = pb.InferRequest(request_id="x\ninjected", model_id="m" * 20_000, sample_ids=[1],
                           tensor=codecs.encode(torch.zeros(1, 2))).SerializeToString()
    with caplog.at_level(logging.WARNING, logger="splitexit.server"):
        err = _call(infer, body)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and len(err.details()) <= 520
    assert _errors(metrics, "FAILED_PRECONDITION") == before + 1
    assert all("\n" not in r.getMessage() and len(r.getMessage()) < 1_000 for r in caplog.records)


def test_a_merged_batch_of_long_ids_keeps_its_id_within_the_limit():
    """Two callers whose ids are at the limit share a batch: the batch sent on must pass the next tier's checks."""
    import threading

    from common.serving.batching import DynamicBatcher
    from common.serving.runtime import MAX_REQUEST_ID

    nxt = FakeNext()
    runtime = TierRuntime(spec(), ToySegment(), ConstantGate(False), nxt)
    checked = TierRuntime(spec(), ToySegment(), ConstantGate(True), FakeNext())
    batcher = DynamicBatcher(runtime, max_batch=8, max_delay_s=5.0, workers=1)
    results = []

    def caller(k: int) -> None:
        ids = [2 * k, 2 * k + 1]
        results.append(batcher.process(Batch("r" * (MAX_REQUEST_ID - 1) + str(k), "m1", ids, torch.ones(2, 2))))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]  # 4 x 2 samples fill the batch
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    batcher.close()
    assert len(results) == 4 and nxt.calls, "the callers were not answered"
    for sent in nxt.calls:
        checked.check_header(sent.request_id, sent.model_id, sent.sample_ids)  # would raise on a too-long id


def test_a_stream_on_a_closed_channel_is_unavailable_not_internal():
    client = NextTierClient("127.0.0.1:9", timeout_s=5)
    client.close()
    with pytest.raises(DownstreamError) as err:
        list(client.stream(Batch("r", "m1", [1], torch.zeros(1, 2))))
    assert err.value.code == "UNAVAILABLE"
