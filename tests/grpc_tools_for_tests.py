"""Test helpers that talk gRPC at the byte level, independent of the product's own client code."""
from __future__ import annotations

from concurrent import futures

import grpc

from common.serving.options import grpc_options

INFER = "/splitexit.v1.Tier/Infer"
INFER_STREAM = "/splitexit.v1.Tier/InferStream"


class CountingProxy:
    """A pass-through ``Tier.Infer`` and ``Tier.InferStream`` server that records the size of every request body it relays.

    It never parses the messages: what it counts are the serialized bytes that actually crossed the link.
    """

    def __init__(self, upstream: str) -> None:
        self.sizes: list[int] = []
        self.channel = grpc.insecure_channel(upstream, options=grpc_options())
        self._call = self.channel.unary_unary(INFER)  # no (de)serializers: raw bytes in, raw bytes out
        self._stream = self.channel.unary_stream(INFER_STREAM)
        handler = grpc.method_handlers_generic_handler(
            "splitexit.v1.Tier", {"Infer": grpc.unary_unary_rpc_method_handler(self._relay),
                                  "InferStream": grpc.unary_stream_rpc_method_handler(self._relay_stream)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=grpc_options())
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    def _relay(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.sizes.append(len(request))
        return self._call(request, timeout=60)

    def _relay_stream(self, request: bytes, context: grpc.ServicerContext):
        self.sizes.append(len(request))
        yield from self._stream(request, timeout=60)

    def stop(self) -> None:
        self.server.stop(0).wait()
        self.channel.close()
