"""Raw tensors on the wire: torch tensors <-> the raw little-endian bytes of a ``splitexit.v1.Tensor``, never pickled.

The link codecs (``common.wire.codecs``) build on this module; ``codecs.encode`` / ``codecs.decode`` are the entry
points for any tensor message.

Decoding checks, before any memory is interpreted, that the dtype is on the allow-list, that rank and every
dimension are within limits, and that the byte length equals ``prod(shape) * itemsize``. The decoded tensor wraps the
bytes object protobuf hands out for the field without a further copy, and is therefore read-only by contract:
nothing downstream writes into its input in place.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import InvalidRequest, quote
from proto import splitexit_pb2 as pb

# Wire dtype name -> (torch dtype, little-endian numpy dtype or None when numpy has no equivalent).
DTYPES: dict[str, tuple[torch.dtype, np.dtype | None]] = {
    "uint8": (torch.uint8, np.dtype("u1")),
    "int8": (torch.int8, np.dtype("i1")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int64": (torch.int64, np.dtype("<i8")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, None),
    "float32": (torch.float32, np.dtype("<f4")),
    "float64": (torch.float64, np.dtype("<f8")),
}
_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}
RAW_CODECS = ("", "raw")
LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass(frozen=True)
class TensorLimits:
    """Bounds a received tensor must respect; the defaults admit any sane batch of CNN activations."""

    max_rank: int = 8
    max_dim: int = 1 << 20
    max_elements: int = 1 << 28
    max_decoded_bytes: int = 256 << 20  # bound on what a compressed payload may inflate to (zip bombs)

    def check_shape(self, shape: tuple[int, ...]) -> int:
        """Validate ``shape``; return its number of elements."""
        if len(shape) > self.max_rank:
            raise InvalidRequest(f"tensor rank {len(shape)} exceeds the limit of {self.max_rank}")
        for i, d in enumerate(shape):
            if d < 0 or d > self.max_dim:
                raise InvalidRequest(f"tensor dimension {i} is {d}; allowed range is 0..{self.max_dim}")
        n = math.prod(shape)
        if n > self.max_elements:
            raise InvalidRequest(f"tensor has {n} elements; the limit is {self.max_elements}")
        return n


DEFAULT_LIMITS = TensorLimits()


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent on the wire; allowed: {', '.join(DTYPES)}") from None


def encode_parts(tensor: torch.Tensor) -> tuple[pb.Tensor, memoryview]:
    """The ``Tensor`` message of ``tensor`` without its ``data``, and the raw little-endian elements as a flat byte
    view of the tensor's memory (no copy when the tensor is contiguous): a sender that serializes the message itself
    copies the elements once, straight into the request (``common.wire.messages.encode_request``)."""
    name = dtype_name(tensor.dtype)
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy()
        arr = arr if LITTLE_ENDIAN else arr.byteswap()
    else:
        arr = t.numpy().astype(DTYPES[name][1], copy=False)
    return pb.Tensor(dtype=name, shape=list(t.shape), codec="raw"), byte_view(arr)


def byte_view(arr: np.ndarray) -> memoryview:
    """The bytes of the C-contiguous array ``arr`` as a flat read-only view (no copy)."""
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    flat.flags.writeable = False
    return memoryview(flat)


def decode_buffer(dtype: str, shape: tuple[int, ...], data: bytes, codec: str = "raw",
                  limits: TensorLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Validate ``(dtype, shape, data)`` and view ``data`` as a tensor without copying it."""
    if codec not in RAW_CODECS:
        raise InvalidRequest(f"unknown tensor codec {quote(codec)}; this tier accepts: raw")
    if dtype not in DTYPES:
        raise InvalidRequest(f"unsupported tensor dtype {quote(dtype)}; allowed: {', '.join(DTYPES)}")
    n = limits.check_shape(shape)
    torch_dtype, np_dtype = DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    if len(data) != n * itemsize:
        raise InvalidRequest(
            f"tensor data has {len(data)} bytes but shape {list(shape)} of {dtype} needs {n * itemsize}"
        )
    if n == 0:
        return torch.empty(shape, dtype=torch_dtype)
    if np_dtype is None or LITTLE_ENDIAN:
        with warnings.catch_warnings():
            # The bytes object is immutable; the tensor is read-only by contract (see module docstring).
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(data, dtype=torch_dtype)
        if np_dtype is None and not LITTLE_ENDIAN:
            flat = flat.view(torch.int16).byteswap().view(torch_dtype)  # pragma: no cover (big-endian hosts)
    else:  # pragma: no cover - big-endian hosts need one byte-swapping copy
        flat = torch.from_numpy(np.frombuffer(data, dtype=np_dtype).astype(np_dtype.newbyteorder("=")))
    return flat.view(shape)
