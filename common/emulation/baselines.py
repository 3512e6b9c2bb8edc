"""Deployments to measure the split system against, built in one process from the same bundles.

Every baseline is a ``Forward`` function that ``common.emulation.feed`` can drive, so its report has the same fields as a
served run: device-only (the whole network on the device), cloud-only offload of the raw uint8 image or of a PNG /
JPEG file of it (Pillow), and the split chain itself with per-link codecs, emulated links (``common.wire.link``) and
per-tier compute profiles. Links sleep their modelled delay and compute is stretched by sleeping, so latencies are
measured wall times of a system that behaves like the emulated one.
"""
from __future__ import annotations

import io
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from torch import nn

from common.wire import messages
from common.model.bundle import TierBundle
from common.model.gates import ConstantGate, Gate
from common.wire.link import LinkModel
from common.emulation.chain import LocalLink
from common.wire.link import emulate_link
from common.wire.batch import Batch
from common.serving.runtime import Forward, Forwarded, TierRuntime, TierSpec
from common.wire.codecs import FLOAT32, WireCodec


class WholeNetwork(nn.Module):
    """The segments of every tier run back to back: the last one's features and final logits."""

    def __init__(self, segments: list[nn.Module]) -> None:
        super().__init__()
        self.segments = nn.ModuleList(segments)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        previous = None
        for segment in self.segments:
            x, logits = segment(x, previous)
            previous = logits[-1]
        return x, previous


def whole_network_runtime(bundles: list[TierBundle], tier: str, compute_scale: float = 1.0) -> TierRuntime:
    """A runtime that answers every sample with the final exit, running the whole network as tier ``tier``."""
    first, last = (TierSpec.from_manifest(b.manifest) for b in (bundles[0], bundles[-1]))
    flops = sum(b.manifest.segment_flops for b in bundles) + bundles[-1].manifest.exit_head_flops[-1]
    spec = replace(first, tier=tier, exits=(last.exit_index,), exit_flops=(flops,), send_flops=0.0, is_last=True,
                   history=False)
    return TierRuntime(spec, WholeNetwork([b.segment for b in bundles]), ConstantGate(True),
                       compute_scale=compute_scale)


class Direct:
    """Hand a batch to a runtime on the same machine: nothing is encoded or sent (the client lives on the device)."""

    def __init__(self, runtime: TierRuntime) -> None:
        self.runtime = runtime

    def __call__(self, batch: Batch) -> Forwarded:
        return Forwarded(self.runtime.process(batch), 0)


def emulated_chain(bundles: list[TierBundle], gates: list[Gate | None], wires: list[WireCodec],
                   links: list[LinkModel | None], scales: list[float]) -> TierRuntime:
    """Chain the tiers in process; link k (tier k -> k+1) uses ``wires[k]`` and ``links[k]``, tier k ``scales[k]``."""
    runtime = None
    for k in reversed(range(len(bundles))):
        forward = LocalLink(runtime, wires[k], links[k]) if runtime is not None else None
        b = bundles[k]
        runtime = TierRuntime(TierSpec.from_manifest(b.manifest), b.segment, b.select_gates(gates[k]), forward,
                              compute_scale=scales[k])
    return runtime


class ImageFileOffload:
    """Cloud-only offload of compressed images: the device writes each image as a PNG or JPEG file, the files and
    the request's ids cross the emulated link, the cloud decodes them and runs the whole network.

    The device's encoding time is stretched by its compute profile like its compute would be."""

    def __init__(self, runtime: TierRuntime, fmt: str, link: LinkModel | None, device_scale: float = 1.0,
                 quality: int = 90) -> None:
        if fmt not in ("PNG", "JPEG"):
            raise ValueError(f"image format must be PNG or JPEG, not {fmt!r}")
        self.runtime, self.fmt, self.link, self.device_scale, self.quality = runtime, fmt, link, device_scale, quality

    def _encode(self, image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
        pil.save(buf, self.fmt, **({"quality": self.quality} if self.fmt == "JPEG" else {}))
        return buf.getvalue()

    def __call__(self, batch: Batch) -> Forwarded:
        start = time.perf_counter()
        files = [self._encode(img) for img in batch.tensor.permute(0, 2, 3, 1).numpy()]
        spent = time.perf_counter() - start
        if self.device_scale > 1:
            time.sleep((self.device_scale - 1) * spent)
        encode_ms = (time.perf_counter() - start) * 1e3
        # The request carries the same ids and names as an InferRequest, with the files as its payload.
        header = messages.request_from_batch(Batch(batch.request_id, batch.model_id, batch.sample_ids,
                                                   torch.empty(0, dtype=torch.uint8))).ByteSize()
        size = header + sum(len(f) + 2 for f in files)  # + a tag and a length byte per file, as protobuf would
        decoded = torch.from_numpy(np.stack([self._decode(f) for f in files])).permute(0, 3, 1, 2).contiguous()
        answer = self.runtime.process(Batch(batch.request_id, batch.model_id, batch.sample_ids, decoded), size)
        link_ms = emulate_link(self.link, size, messages.reply_from_answer(answer).ByteSize())
        return Forwarded(answer, size, encode_ms, link_ms)

    @staticmethod
    def _decode(data: bytes) -> np.ndarray:
        image = np.asarray(Image.open(io.BytesIO(data)))
        return image[..., None] if image.ndim == 2 else image


def offload_raw(runtime: TierRuntime, link: LinkModel | None) -> Forward:
    """Cloud-only offload of the raw uint8 images over ``link`` (the request exactly as a tier would send it)."""
    return LocalLink(runtime, FLOAT32, link)
