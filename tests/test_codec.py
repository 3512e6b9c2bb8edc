import pytest
import torch

from common.wire import codecs, tensors
from common.wire.tensors import TensorLimits
from common.errors import InvalidRequest
from proto import splitexit_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16,
                                   torch.bfloat16, torch.float32, torch.float64])
def test_round_trip_is_exact(dtype):
    x = (torch.randn(3, 4, 5) * 50).to(dtype)
    msg = codecs.encode(x)
    assert msg.dtype == tensors.dtype_name(dtype)
    assert list(msg.shape) == [3, 4, 5]
    assert len(msg.data) == x.numel() * x.element_size()
    back = codecs.decode(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, x)


def test_little_endian_layout():
    msg = codecs.encode(torch.tensor([1, 256], dtype=torch.int32))
    assert msg.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_non_contiguous_input_is_encoded_in_logical_order():
    x = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    assert torch.equal(codecs.decode(codecs.encode(x)), x)


def test_decoded_tensor_is_a_view_of_the_received_bytes():
    import numpy as np

    data = codecs.encode(torch.arange(1000, dtype=torch.float32)).data
    back = tensors.decode_buffer("float32", (10, 100), data)
    assert back.data_ptr() == np.frombuffer(data, dtype=np.uint8).ctypes.data  # same memory: no copy
    assert torch.equal(back.flatten(), torch.arange(1000, dtype=torch.float32))


def test_empty_tensor():
    x = torch.empty(0, 3)
    assert codecs.decode(codecs.encode(x)).shape == (0, 3)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: setattr(m, "dtype", "object"), "unsupported tensor dtype"),
    (lambda m: setattr(m, "dtype", ""), "unsupported tensor dtype"),
    (lambda m: setattr(m, "data", m.data[:-1]), "needs"),
    (lambda m: setattr(m, "data", m.data + b"\0"), "needs"),
    (lambda m: m.shape.append(2), "needs"),
    (lambda m: m.shape.__setitem__(0, -1), "dimension 0"),
    (lambda m: setattr(m, "codec", "pickle"), "unknown tensor codec"),
])
def test_malformed_tensors_are_rejected(mutate, message):
    msg = codecs.encode(torch.zeros(2, 3))
    mutate(msg)
    with pytest.raises(InvalidRequest, match=message):
        codecs.decode(msg)


def test_limits():
    limits = TensorLimits(max_rank=3, max_dim=10, max_elements=50)
    with pytest.raises(InvalidRequest, match="rank 4"):
        codecs.decode(codecs.encode(torch.zeros(1, 1, 1, 1)), limits)
    with pytest.raises(InvalidRequest, match="dimension 1 is 11"):
        codecs.decode(codecs.encode(torch.zeros(1, 11)), limits)
    with pytest.raises(InvalidRequest, match="60 elements"):
        codecs.decode(codecs.encode(torch.zeros(6, 10)), limits)
    # A huge declared shape is refused before any byte is interpreted.
    msg = pb.Tensor(dtype="float32", shape=[1 << 20, 1 << 20], data=b"")
    with pytest.raises(InvalidRequest, match="elements"):
        codecs.decode(msg)


def test_encode_refuses_unsupported_dtype():
    with pytest.raises(ValueError, match="cannot be sent"):
        codecs.encode(torch.zeros(2, dtype=torch.complex64))
