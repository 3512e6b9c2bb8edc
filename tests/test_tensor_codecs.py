"""Link codecs: round trips, error bounds, byte counts, and refusal of malformed or hostile payloads."""
import zlib

import pytest
import torch

from common.wire import codecs, messages
from common.wire.tensors import TensorLimits
from common.errors import ConfigError, InvalidRequest
from common.wire.batch import Batch
from common.wire.codecs import WireCodec, parse_wire_codec
from proto import splitexit_pb2 as pb


def features(n=4, c=6, hw=5) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(n, c, hw, hw))
    return x * torch.arange(1, c + 1).view(1, c, 1, 1) ** 2  # channels of very different ranges


def wire_round_trip(x, wire):
    msg = codecs.encode(x, wire)
    return msg, codecs.decode(pb.Tensor.FromString(msg.SerializeToString()))


@pytest.mark.parametrize("compression", ["", "zlib"])
def test_float32_is_exact_and_float16_close(compression):
    x = features()
    msg, back = wire_round_trip(x, WireCodec("float32", compression))
    assert torch.equal(back, x)
    msg16, back16 = wire_round_trip(x, WireCodec("float16", compression))
    assert back16.dtype == torch.float32 and torch.allclose(back16, x, rtol=1e-3, atol=1e-3)
    if not compression:
        assert len(msg.data) == 4 * x.numel() and len(msg16.data) == 2 * x.numel()


@pytest.mark.parametrize("name", ["int8", "int8-tensor"])
def test_int8_error_is_within_half_a_step(name):
    x = features() - 0.5  # negative values too
    msg, back = wire_round_trip(x, WireCodec(name))
    assert len(msg.data) == x.numel() and back.dtype == torch.float32 and back.shape == x.shape
    scale = torch.tensor(list(msg.scale))
    assert len(scale) == (x.shape[1] if name == "int8" else 1)
    step = scale.view(1, -1, 1, 1) if name == "int8" else scale
    assert bool(((back - x).abs() <= step / 2 + 1e-6).all())
    assert bool((back[x == 0] == 0).all()) or not bool((x == 0).any())


def test_per_channel_beats_per_tensor_on_uneven_channels():
    x = features()
    err = {n: (wire_round_trip(x, WireCodec(n))[1] - x).abs()[:, 0].max() for n in ("int8", "int8-tensor")}
    assert err["int8"] < err["int8-tensor"] / 10


def test_zeros_and_constant_channels_and_empty_batches():
    for x in (torch.zeros(2, 3, 4), torch.full((2, 3), 7.0), torch.empty(0, 3, 2)):
        assert torch.allclose(wire_round_trip(x, WireCodec("int8", "zlib"))[1], x, atol=7 / 255)


def test_integer_tensors_stay_raw_and_compress():
    images = torch.randint(0, 4, (3, 3, 8, 8), dtype=torch.uint8)
    msg, back = wire_round_trip(images, WireCodec("int8", "zlib"))
    assert msg.codec == "raw" and msg.compression == "zlib" and len(msg.data) < images.numel()
    assert back.dtype == torch.uint8 and torch.equal(back, images)


def test_messages_carry_the_codec_and_decoding_is_deterministic():
    batch = Batch("r", "m", [0, 1, 2, 3], features())
    wire = WireCodec("int8", "zlib")
    a = messages.batch_from_request(messages.request_from_batch(batch, wire)).tensor
    b = messages.batch_from_request(messages.request_from_batch(batch, wire)).tensor
    assert torch.equal(a, b)
    sizes = {n: messages.request_from_batch(batch, WireCodec(n)).ByteSize() for n in ("float32", "int8")}
    assert sizes["float32"] > 3.5 * sizes["int8"]


@pytest.mark.parametrize("wire", [WireCodec(), WireCodec("float16"), WireCodec("int8"),
                                  WireCodec("int8-tensor", "zlib"), WireCodec("float32", "zlib")], ids=str)
@pytest.mark.parametrize("tensor", [features(), features().transpose(2, 3), torch.zeros(0, 6, 5, 5),
                                    torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8),
                                    torch.randn(3, 4).to(torch.bfloat16)], ids=["features", "strided", "empty",
                                                                                  "images", "bfloat16"])
def test_requests_serialized_with_one_copy_parse_as_the_plain_message(tensor, wire):
    """encode_request writes the tensor field once by hand, its data last: a standard parser must
    read exactly the message built field by field, and the receiver must decode the same tensor."""
    batch = Batch("r-1", "m", list(range(10, 10 + tensor.shape[0])), tensor, queued_s=0.25)
    payload = messages.encode_request(batch, wire)
    plain = pb.InferRequest(request_id="r-1", model_id="m", sample_ids=batch.sample_ids, queued_ms=250.0,
                            tensor=codecs.encode(tensor, wire))
    received = messages.Received.parse(payload)
    assert received.message == plain and received.nbytes == len(payload)
    assert plain.ByteSize() <= len(payload) <= plain.ByteSize() + 2  # the same fields (an empty data field at most)
    decoded = messages.batch_from_request(received.message).tensor
    assert torch.equal(decoded, messages.batch_from_request(plain).tensor)
    if wire.name == "float32" or not tensor.is_floating_point():
        assert torch.equal(decoded, tensor)


def int8_msg():
    return codecs.encode(features(), WireCodec("int8"))


@pytest.mark.parametrize("mutate, words", [
    (lambda m: setattr(m, "codec", "int4"), "unknown tensor codec"),
    (lambda m: setattr(m, "compression", "lzma"), "unknown tensor compression"),
    (lambda m: setattr(m, "dtype", "float64"), "carries float32"),
    (lambda m: m.scale.append(1.0), "scales"),
    (lambda m: m.scale.__setitem__(2, float("nan")), "finite and positive"),
    (lambda m: m.scale.__setitem__(0, float("inf")), "finite and positive"),
    (lambda m: m.scale.__setitem__(0, 0.0), "finite and positive"),
    (lambda m: m.zero_point.__setitem__(0, 1e6), "zero points"),
    (lambda m: setattr(m, "data", m.data[:-1]), "needs"),
])
def test_malformed_int8_is_refused(mutate, words):
    msg = int8_msg()
    mutate(msg)
    with pytest.raises(InvalidRequest, match=words):
        codecs.decode(msg)


def test_compressed_payloads_are_bounded():
    x = torch.zeros(4, 8)
    msg = codecs.encode(x, WireCodec("float32", "zlib"))
    bomb = pb.Tensor(dtype="float32", shape=[4, 8], codec="raw", compression="zlib",
                     data=zlib.compress(bytes(10 << 20)))  # 10 MiB of zeros declared as 128 bytes
    with pytest.raises(InvalidRequest, match="more than the 128 bytes"):
        codecs.decode(bomb)
    short = pb.Tensor(dtype="float32", shape=[4, 8], compression="zlib", data=zlib.compress(bytes(100)))
    with pytest.raises(InvalidRequest, match="inflates to 100 bytes"):
        codecs.decode(short)
    corrupt = pb.Tensor(dtype="float32", shape=[4, 8], compression="zlib", data=b"not zlib at all")
    with pytest.raises(InvalidRequest, match="corrupt"):
        codecs.decode(corrupt)
    huge = pb.Tensor(dtype="float32", shape=[1 << 20, 1 << 7], compression="zlib", data=msg.data)
    with pytest.raises(InvalidRequest, match="decompress to"):
        codecs.decode(huge, TensorLimits(max_decoded_bytes=1 << 20))


def test_float16_overflow_is_clamped_not_infinite():
    x = torch.tensor([[1e6, -1e6, 1.0]])
    assert bool(torch.isfinite(wire_round_trip(x, WireCodec("float16"))[1]).all())


@pytest.mark.parametrize("name, compress, words", [
    ("int4", None, "unknown codec"), ("int8", "lz4", "unknown compression"), ("int8", "zlib:x", "LEVEL"),
    ("int8", "zlib:12", "outside"),
])
def test_bad_codec_settings(name, compress, words):
    with pytest.raises(ConfigError, match=words):
        parse_wire_codec(name, compress)


def test_parse_wire_codec():
    assert parse_wire_codec("int8", "zlib:1") == WireCodec("int8", "zlib", 1)
    assert parse_wire_codec("float16", "none") == WireCodec("float16")
