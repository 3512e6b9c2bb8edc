"""Link codecs for intermediate tensors: what a tier sends its float32 features as, and how the receiver reads them.

A link codec (``WireCodec``) is an element encoding plus an optional lossless compression of the encoded bytes:

- ``float32``: the raw little-endian elements, exact (the wire format of ``common.wire.tensors``);
- ``float16``: half precision, values clamped to float16's finite range;
- ``int8``: affine, ``q = round(x / scale) + zero_point`` clamped to [-128, 127], one ``(scale, zero_point)`` per
  channel (dim 1) so that channels of very different ranges keep their resolution; ``int8-tensor`` uses one pair
  for the whole tensor. The range always contains 0.0, so zero (most of a ReLU feature map) is exact, and every
  other in-range value comes back within ``scale / 2``;
- compression ``zlib`` (standard library, ``zlib:LEVEL`` for another level than 6) over the encoded bytes.

Only floating tensors are transformed; integer tensors (the device's uint8 images) keep their raw elements and are
only compressed. The receiver always gets float32 (or the original integer dtype) back. Decoding validates
everything the sender chose — codec and compression names, scale count and finiteness, the decompressed size,
bounded before inflating so that a small compressed message cannot expand into gigabytes — and raises
``InvalidRequest`` naming what is wrong. Encoding and decoding are deterministic, so the in-process chain that uses
the same codec sees exactly the tensor a remote tier sees.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from common.wire import tensors
from common.wire.tensors import DEFAULT_LIMITS, TensorLimits
from common.errors import ConfigError, InvalidRequest, quote
from proto import splitexit_pb2 as pb

ELEMENT_CODECS = ("float32", "float16", "int8", "int8-tensor")
COMPRESSIONS = ("", "zlib")
ACCEPTED_CODECS = ("raw", "float16", "int8")  # Tensor.codec values ``decode`` reads ("" means "raw")
_WIRE_ITEMSIZE = {"float16": 2, "int8": 1}
_F16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class WireCodec:
    """How one link encodes the tensors it carries."""

    name: str = "float32"
    compression: str = ""
    level: int = 6

    def __post_init__(self) -> None:
        if self.name not in ELEMENT_CODECS:
            raise ConfigError(f"unknown codec {self.name!r}; choose one of {', '.join(ELEMENT_CODECS)}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"unknown compression {self.compression!r}; choose zlib or none")
        if not 0 <= self.level <= 9:
            raise ConfigError(f"zlib level {self.level} is outside 0..9")

    def __str__(self) -> str:
        return self.name + (f"+{self.compression}" if self.compression else "")


FLOAT32 = WireCodec()


def parse_wire_codec(name: str = "float32", compress: str | None = None) -> WireCodec:
    """``--codec NAME`` and ``--compress zlib[:LEVEL]|none`` -> ``WireCodec`` (``ConfigError`` on a bad value)."""
    kind, _, level = (compress or "").partition(":")
    kind = "" if kind in ("", "none") else kind
    if level and not level.isdigit():
        raise ConfigError(f"bad compression {compress!r}: expected zlib or zlib:LEVEL with LEVEL 0..9")
    return WireCodec(name, kind, int(level) if level else 6)


def wire_to_dict(wire: WireCodec) -> dict:
    return {"codec": wire.name, "compression": wire.compression, "level": wire.level}


def wire_from_dict(d: dict | None) -> WireCodec:
    """A codec stored by ``wire_to_dict`` (float32 when nothing is stored)."""
    d = d or {}
    try:
        return WireCodec(d.get("codec", "float32"), d.get("compression", ""), int(d.get("level", 6)))
    except (TypeError, ValueError):
        raise ConfigError(f"bad link codec record {d!r}") from None


def add_codec_args(parser) -> None:
    """``--codec`` and ``--compress`` for commands that choose (or must know) a link's codec. Without either, a
    tier uses the codec its bundle names (a planner export names one), else float32."""
    parser.add_argument("--codec", default=None, choices=ELEMENT_CODECS,
                        help="encoding of the tensors sent on the outgoing link(s) (default: the bundle's, else "
                             "float32, exact)")
    parser.add_argument("--compress", default=None, help="lossless compression of the encoded bytes: zlib[:LEVEL]")


def wire_from_args(args) -> WireCodec | None:
    """The codec ``--codec`` / ``--compress`` choose, or ``None`` when neither is given (use the bundle's)."""
    if args.codec is None and args.compress is None:
        return None
    return parse_wire_codec(args.codec or "float32", args.compress)


def link_args(wire: WireCodec | None, link=None) -> list[str]:
    """The tier command-line flags that select ``wire`` (none: the bundle's) and the emulated ``link``, a
    ``LinkModel``."""
    args = [] if wire is None else ["--codec", wire.name]
    if wire is not None and wire.compression:
        args += ["--compress", f"{wire.compression}:{wire.level}"]
    if link is not None:
        args += ["--link", str(link)]
    return args


def _affine_params(x: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(scale, zero_point)`` per channel (dim 1) or for the whole tensor; 0.0 always in range."""
    per_channel = per_channel and x.dim() >= 2
    if x.numel() == 0:  # no elements: neutral pairs, at least one (a receiver needs at least one scale)
        ones = torch.ones(max(x.shape[1], 1) if per_channel else 1)
        return ones, torch.zeros(len(ones))
    flat = x.transpose(0, 1).reshape(x.shape[1], -1) if per_channel else x.reshape(1, -1)
    lo = flat.amin(1).clamp(max=0.0)
    hi = flat.amax(1).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = (-128.0 - torch.round(lo / scale)).clamp(-128, 127)
    return scale, zero_point


def _broadcast(v: torch.Tensor, x_dim: int) -> torch.Tensor:
    """Shape a per-channel vector to broadcast along dim 1 of a rank-``x_dim`` tensor."""
    return v.view(1, -1, *([1] * (x_dim - 2))) if len(v) > 1 else v.view(())


def encode(tensor: torch.Tensor, wire: WireCodec = FLOAT32) -> pb.Tensor:
    """Encode ``tensor`` for a link using ``wire``; see the module docstring for the formats."""
    header, data = encode_parts(tensor, wire)
    header.data = bytes(data)
    return header


def encode_parts(tensor: torch.Tensor, wire: WireCodec = FLOAT32) -> tuple[pb.Tensor, bytes | memoryview]:
    """``encode`` as the message without ``data`` and the encoded bytes (for float32, a view of the tensor's own
    memory), so that a sender serializing the request itself copies the payload only once."""
    x = tensor.detach().to("cpu")
    if wire.name == "float32" or not x.is_floating_point():
        msg, data = tensors.encode_parts(x)
    else:
        x = x.to(torch.float32).contiguous()
        msg = pb.Tensor(dtype="float32", shape=list(x.shape))
        if wire.name == "float16":
            msg.codec = "float16"
            data = tensors.byte_view(x.clamp(-_F16_MAX, _F16_MAX).to(torch.float16).numpy().astype("<f2", copy=False))
        else:
            scale, zero_point = _affine_params(x, per_channel=wire.name == "int8")
            s, z = _broadcast(scale, x.dim()), _broadcast(zero_point, x.dim())
            q = (torch.round(x / s) + z).clamp(-128, 127).to(torch.int8)
            msg.codec = "int8"
            data = tensors.byte_view(q.numpy())
            msg.scale.extend(scale.tolist())
            msg.zero_point.extend(zero_point.tolist())
    if wire.compression == "zlib" and x.numel() > 0:  # nothing to compress; receivers refuse empty compressed data
        data = zlib.compress(data, wire.level)
        msg.compression = "zlib"
    return msg, data


def _inflate(data: bytes, expected: int) -> bytes:
    """zlib-decompress ``data`` into exactly ``expected`` bytes, never producing more than ``expected + 1`` (enough
    to tell that it would inflate to more), and refuse anything after the end of the compressed stream."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, expected + 1)  # max_length 0 would mean "unlimited": never pass it
    except zlib.error as e:
        raise InvalidRequest(f"compressed tensor data is corrupt: {e}") from None
    if len(out) > expected:
        raise InvalidRequest(f"compressed tensor data inflates to more than the {expected} bytes its shape needs")
    if not inflater.eof or len(out) != expected:
        raise InvalidRequest(f"compressed tensor data inflates to {len(out)} bytes but its shape needs {expected}")
    if inflater.unused_data:
        raise InvalidRequest(f"compressed tensor data has {len(inflater.unused_data)} bytes after the compressed "
                             f"stream")
    return out


def decode(msg: pb.Tensor, limits: TensorLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Validate and decode any link codec's ``Tensor`` message; raise ``InvalidRequest`` naming the problem."""
    name, compression, dtype = msg.codec, msg.compression, msg.dtype
    shape = tuple(int(d) for d in msg.shape)
    if compression not in COMPRESSIONS:
        raise InvalidRequest(f"unknown tensor compression {quote(compression)}; this tier accepts: zlib")
    if name in tensors.RAW_CODECS:
        if not compression:
            return tensors.decode_buffer(dtype, shape, msg.data, name, limits)
        if dtype not in tensors.DTYPES:
            raise InvalidRequest(f"unsupported tensor dtype {quote(dtype)}; allowed: {', '.join(tensors.DTYPES)}")
        itemsize = torch.empty((), dtype=tensors.DTYPES[dtype][0]).element_size()
    elif name in _WIRE_ITEMSIZE:
        if dtype != "float32":
            raise InvalidRequest(f"codec {quote(name)} carries float32 tensors, not {quote(dtype)}")
        itemsize = _WIRE_ITEMSIZE[name]
    else:
        raise InvalidRequest(f"unknown tensor codec {quote(name)}; this tier accepts: {', '.join(ACCEPTED_CODECS)}")
    n = limits.check_shape(shape)
    data = msg.data
    if compression:
        if n == 0:  # a sender has nothing to compress; inflating into zero bytes cannot be bounded by the shape
            raise InvalidRequest(f"compressed tensor of shape {list(shape)} has no elements; send empty tensors "
                                 f"uncompressed")
        if n * itemsize > limits.max_decoded_bytes:
            raise InvalidRequest(f"tensor would decompress to {n * itemsize} bytes; the limit is "
                                 f"{limits.max_decoded_bytes}")
        data = _inflate(data, n * itemsize)
    if name in tensors.RAW_CODECS:
        return tensors.decode_buffer(dtype, shape, data, "raw", limits)
    if len(data) != n * itemsize:
        raise InvalidRequest(f"tensor data has {len(data)} bytes but shape {list(shape)} as {name} needs "
                             f"{n * itemsize}")
    if name == "float16":
        if n == 0:
            return torch.empty(shape, dtype=torch.float32)
        return torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32)).view(shape)
    return _dequantize(data, shape, list(msg.scale), list(msg.zero_point))


def _dequantize(data: bytes, shape: tuple[int, ...], scale: list[float], zero_point: list[float]) -> torch.Tensor:
    channels = shape[1] if len(shape) >= 2 else 1
    if len(scale) not in (1, channels) or not scale or len(zero_point) != len(scale):
        raise InvalidRequest(f"int8 tensor of shape {list(shape)} needs 1 or {channels} scales and as many zero "
                             f"points; got {len(scale)} and {len(zero_point)}")
    if not all(math.isfinite(s) and s > 0 for s in scale):
        raise InvalidRequest("int8 scales must be finite and positive")
    if not all(math.isfinite(z) and -128 <= z <= 127 for z in zero_point):
        raise InvalidRequest("int8 zero points must be finite and within -128..127")
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=torch.float32)
    q = torch.from_numpy(np.frombuffer(data, dtype=np.int8).astype(np.float32)).view(shape)
    s = _broadcast(torch.tensor(scale, dtype=torch.float32), len(shape))
    z = _broadcast(torch.tensor(zero_point, dtype=torch.float32), len(shape))
    return (q - z) * s
