"""Bad input over gRPC: every named problem gets its status code and message, and a fuzz of ≥ 5,000 random and
mutated requests never gets an internal error from the tier, which then still answers a valid request correctly."""
from __future__ import annotations

import random
import struct

import grpc
import pytest
import torch

from common.wire import codecs, tensors
from common.model.gates import ConfidenceGate
from tests.conftest import mark_serving
from common.serving.server import TierServicer, create_server
from common.serving.runtime import TierRuntime
from proto import splitexit_pb2 as pb
from tests.test_runtime import FakeNext, ToySegment, spec

INFER = "/splitexit.v1.Tier/Infer"
FUZZ_REQUESTS = 5000
REJECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def tier():
    """An in-process device tier (2 float32 features per sample, batches up to 16) with an in-process next tier."""
    runtime = TierRuntime(spec(), ToySegment(), ConfidenceGate(0.9), FakeNext())
    server, port, health = create_server(TierServicer(runtime, pb.TierDescription(tier="device")), "127.0.0.1:0",
                                         max_workers=4)
    server.start()
    mark_serving(health)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel.unary_unary(INFER)  # raw bytes in and out: the fuzz may send anything
    channel.close()
    server.stop(0).wait()


def valid(n: int = 3, request_id: str = "ok") -> pb.InferRequest:
    x = torch.tensor([[5.0, 0.0], [-5.0, 1.0], [2.0, 3.0], [-1.0, -1.0]][:n])
    return pb.InferRequest(request_id=request_id, model_id="m1", sample_ids=list(range(7, 7 + n)),
                           tensor=codecs.encode(x))


def _with(**changes) -> pb.InferRequest:
    r = valid()
    for key, value in changes.items():
        if key.startswith("tensor_"):
            field = key[len("tensor_"):]
            if field == "shape":
                del r.tensor.shape[:]
                r.tensor.shape.extend(value)
            else:
                setattr(r.tensor, field, value)
        elif key == "sample_ids":
            del r.sample_ids[:]
            r.sample_ids.extend(value)
        else:
            setattr(r, key, value)
    return r


def _nan_request(value: float) -> pb.InferRequest:
    return _with(tensor_data=struct.pack("<6f", 1.0, value, 2.0, 3.0, 4.0, 5.0))


@pytest.mark.parametrize("request_, code, words", [
    (_with(tensor_dtype="complex128"), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    (_with(tensor_data=b"\0" * 20), grpc.StatusCode.INVALID_ARGUMENT, "needs 24"),
    (_with(tensor_shape=[3] + [1] * 9), grpc.StatusCode.INVALID_ARGUMENT, "rank"),
    (_with(tensor_shape=[3, 1 << 40]), grpc.StatusCode.INVALID_ARGUMENT, "dimension"),
    (_with(tensor_shape=[1 << 15, 1 << 15]), grpc.StatusCode.INVALID_ARGUMENT, "elements"),
    (_nan_request(float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    (_nan_request(float("-inf")), grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    (_with(sample_ids=[], tensor_shape=[0, 2], tensor_data=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    (_with(model_id="another-export"), grpc.StatusCode.FAILED_PRECONDITION, "model id"),
    (_with(sample_ids=[7, 7, 8]), grpc.StatusCode.INVALID_ARGUMENT, "duplicate"),
    (_with(sample_ids=[7, 8]), grpc.StatusCode.INVALID_ARGUMENT, "first dimension"),
    (_with(tensor_shape=[3, 1, 2]), grpc.StatusCode.FAILED_PRECONDITION, "per-sample shape"),
    (_with(tensor_dtype="float64", tensor_shape=[3, 1]), grpc.StatusCode.FAILED_PRECONDITION, "per-sample shape"),
    (_with(tensor_dtype="int32"), grpc.StatusCode.FAILED_PRECONDITION, "float32"),
    (_with(request_id="x" * 1000), grpc.StatusCode.INVALID_ARGUMENT, "request id"),
    (_with(queued_ms=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "queued_ms"),
    (_with(queued_ms=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "queued_ms"),
    (_with(queued_ms=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "queued_ms"),
    (pb.InferRequest(model_id="m1", sample_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT, "no tensor"),
])
def test_each_problem_is_named(tier, request_, code, words):
    with pytest.raises(grpc.RpcError) as err:
        tier(request_.SerializeToString(), timeout=10)
    assert err.value.code() == code
    assert words in err.value.details()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.4 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.6 and b:
            pos = rng.randrange(len(b))
            del b[pos:pos + rng.randint(1, 8)]
        elif op < 0.8:
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            b = b[:rng.randrange(len(b) + 1)]
    return bytes(b)


def _structured(rng: random.Random) -> pb.InferRequest:
    """A request with plausible fields in implausible combinations."""
    r = valid(rng.randint(1, 4), request_id=str(rng.randrange(10**6)))
    pick = rng.randrange(8)
    if pick == 0:
        r.tensor.dtype = rng.choice([*tensors.DTYPES, "", "float8", "object", "pickle"])
    elif pick == 1:
        del r.tensor.shape[:]
        r.tensor.shape.extend(rng.choice([-1, 0, 1, 2, 3, 2**31, 2**62]) for _ in range(rng.randint(0, 10)))
    elif pick == 2:
        r.tensor.data = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 8, 12, 24, 100])))
    elif pick == 3:
        del r.sample_ids[:]
        r.sample_ids.extend(rng.randrange(-3, 3) for _ in range(rng.randint(0, 5)))
    elif pick == 4:
        r.model_id = rng.choice(["", "m2", "m1 ", "\u00e9"])
    elif pick == 5:
        r.tensor.codec = rng.choice(["zstd", "pickle", "RAW", " "])
    elif pick == 6:
        r.ClearField("tensor")
    else:  # raw random floats: NaN and Inf bit patterns included
        r.tensor.data = bytes(rng.randrange(256) for _ in range(len(r.tensor.data)))
    return r


def test_fuzz_then_a_valid_request_is_still_answered_correctly(tier):
    rng = random.Random(1234)
    seeds = [valid(n).SerializeToString() for n in (1, 2, 3, 4)]
    outcomes: dict[str, int] = {}
    for i in range(FUZZ_REQUESTS):
        kind = i % 3
        if kind == 0:
            body = _mutate(rng, rng.choice(seeds))
        elif kind == 1:
            body = _structured(rng).SerializeToString()
        else:
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        try:
            pb.InferRequest.FromString(body)
            parses = True
        except Exception:
            parses = False
        try:
            reply = pb.InferReply.FromString(tier(body, timeout=10))
            code = grpc.StatusCode.OK
            assert len(reply.predictions) == len(pb.InferRequest.FromString(body).sample_ids)
        except grpc.RpcError as e:
            code = e.code()
        outcomes[code.name] = outcomes.get(code.name, 0) + 1
        if parses:
            assert code in REJECTED | {grpc.StatusCode.OK}, (code, body[:80])
        else:  # bytes that are not an InferRequest are the caller's fault, not an internal error
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, body[:80])
    assert sum(outcomes.values()) == FUZZ_REQUESTS
    assert outcomes.get("INVALID_ARGUMENT", 0) > 500 and outcomes.get("OK", 0) > 10, outcomes

    reply = pb.InferReply.FromString(tier(valid(4).SerializeToString(), timeout=10))
    assert [(p.sample_id, p.label, p.exit_tier) for p in reply.predictions] == [
        (7, 1, "device"), (8, 2, "cloud"), (9, 1, "device"), (10, 2, "cloud")]
