"""An in-process deployment: the tiers' runtimes chained by direct calls instead of gRPC.

Each link still encodes the forwarded samples into the very ``InferRequest`` a network link would carry and decodes
it on the other side, so bytes are counted identically and the next tier sees the same tensor values.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import torch

from common.wire import messages
from common.model.bundle import TierBundle, find_tier_folders, load_tier_bundle
from common.errors import ConfigError
from common.emulation.feed import feed_and_report
from common.model.gates import Gate
from common.wire.link import LinkModel
from common.wire.link import StreamLinkClock, emulate_link
from common.wire.codecs import FLOAT32, WireCodec
from common.emulation.report import RequestRecord
from common.wire.batch import Batch
from common.serving.handling import answer_request, answer_stream
from common.serving.runtime import Forwarded, TierRuntime, TierSpec


class LocalLink:
    """The ``Forward`` function that hands samples to a runtime in the same process.

    ``wire`` is the link's codec, exactly as a tier's ``--codec`` would use it; ``link`` optionally emulates the
    network delay of the exchange (``common.wire.link``), so in-process runs can stand for a deployment too.
    """

    def __init__(self, runtime: TierRuntime, wire: WireCodec = FLOAT32, link: LinkModel | None = None) -> None:
        self.runtime = runtime
        self.wire, self.link = wire, link

    def __call__(self, batch: Batch) -> Forwarded:
        request, encode_ms = messages.encode_request_timed(batch, self.wire)
        answer = answer_request(self.runtime, messages.Received.parse(request), batch.deadline)
        size = len(request)
        link_ms = emulate_link(self.link, size, messages.reply_from_answer(answer).ByteSize()) if self.link else 0.0
        return Forwarded(answer, size, encode_ms, link_ms)

    def stream(self, batch: Batch) -> Iterator[Forwarded]:
        """The streamed exchange (``ForwardStream``), as ``InferStream`` carries it: one ``Forwarded`` per partial
        answer of the runtime, the request's size and encoding on the first."""
        request, encode_ms = messages.encode_request_timed(batch, self.wire)
        size = len(request)
        clock = StreamLinkClock(self.link)
        up_ms = clock.send(size)
        for k, part in enumerate(answer_stream(self.runtime, messages.Received.parse(request), batch.deadline)):
            link_ms = clock.receive(messages.reply_from_answer(part).ByteSize(), time.monotonic()) if self.link else 0.0
            yield Forwarded(part, size if k == 0 else 0, encode_ms if k == 0 else 0.0,
                            link_ms + (up_ms if k == 0 else 0.0))


def chain_runtimes(bundles: list[TierBundle], gates: list[Gate | list[Gate] | None] | None = None,
                   wires: dict[str, WireCodec] | None = None, streamed: bool = False) -> TierRuntime:
    """Chain tier bundles (first to last) into runtimes; return the first. ``gates`` overrides bundle gates (a gate
    for every early exit of its tier, or a list with one per exit);
    ``wires`` maps a tier to the codec of its outgoing link (where absent: the one its bundle names, else float32);
    ``streamed`` links the tiers by ``LocalLink.stream`` (as served tiers are) instead of the unary exchange."""
    gates = gates or [None] * len(bundles)
    wires = wires or {}
    runtime = None
    for bundle, gate in reversed(list(zip(bundles, gates, strict=True))):
        forward = LocalLink(runtime, bundle.link_codec(wires.get(bundle.tier))) if runtime is not None else None
        runtime = TierRuntime(TierSpec.from_manifest(bundle.manifest), bundle.segment, bundle.select_gates(gate), forward,
                              forward_stream=forward.stream if streamed and forward is not None else None)
    return runtime


def load_local_chain(root: Path, gates: dict[str, Gate] | None = None, policy: str | None = None,
                     wires: dict[str, WireCodec] | None = None,
                     streamed: bool = False) -> tuple[TierRuntime, list[TierBundle]]:
    """Load every tier of the bundle root ``root`` and chain them. ``policy`` selects a stored policy for every
    tier; ``gates`` (tier name -> gate) overrides single tiers on top of that."""
    bundles = [load_tier_bundle(f) for f in find_tier_folders(root)]
    gates = gates or {}
    unknown = set(gates) - {b.tier for b in bundles}
    if unknown:
        raise ConfigError(f"gate overrides name unknown tiers {sorted(unknown)}")
    chosen = [b.select_gates(gates.get(b.tier), policy) for b in bundles]
    return chain_runtimes(bundles, chosen, wires, streamed), bundles


@torch.inference_mode()
def all_exit_logits(bundles: list[TierBundle], images: torch.Tensor, batch_size: int = 500,
                    seconds: list[float] | None = None) -> list[torch.Tensor]:
    """Every exit's logits for every sample, earliest exit first: the segments run in sequence with no sample
    leaving early.

    One forward pass of the whole network, from which any exit policy can be evaluated without running it again.
    ``seconds``, when given, receives each segment's total wall time (blocks and exit heads), one entry per tier.
    """
    chunks: list[list[torch.Tensor]] = []
    spent = [0.0] * len(bundles)
    for lo in range(0, len(images), batch_size):
        x, previous, outs = images[lo:lo + batch_size], None, []
        for k, bundle in enumerate(bundles):
            start = time.perf_counter()
            x, logits = bundle.segment(x, previous)
            spent[k] += time.perf_counter() - start
            outs += logits
            previous = logits[-1]
        chunks.append(outs)
    if seconds is not None:
        seconds[:] = spent
    return [torch.cat([c[e] for c in chunks]) for e in range(len(chunks[0]))]


def exit_names(bundles: list[TierBundle]) -> list[str]:
    """A name for every exit of the chained bundles, earliest first: the tier's name when it holds one exit, else
    ``tier:index`` (``device:0``, ``device:1``, ...)."""
    return [b.tier if len(b.manifest.exits) == 1 else f"{b.tier}:{e}" for b in bundles for e in b.manifest.exits]


def exit_seconds(bundles: list[TierBundle], seconds: list[float]) -> list[float]:
    """Per-tier times (``all_exit_logits``) spread over each tier's exits in proportion to their FLOPs."""
    out = []
    for b, s in zip(bundles, seconds, strict=True):
        flops = b.manifest.exit_flops
        out += [s * f / sum(flops) for f in flops]
    return out


def bundle_costs(bundles: list[TierBundle]) -> tuple[list[float], float]:
    """``(costs, full)`` from the manifests, as ``common.model.split.cost_table`` computes them from a model."""
    costs, total = [], 0.0
    for bundle in bundles:
        m = bundle.manifest
        for flops in m.exit_flops:
            total += flops
            costs.append(total)
        total += m.send_flops
    return costs, bundles[0].manifest.full_network_flops


def evaluate_in_process(root: Path, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                        gates: dict[str, Gate] | None = None, policy: str | None = None,
                        wires: dict[str, WireCodec] | None = None) -> tuple[dict, list[RequestRecord]]:
    """Report of the in-process chain of ``root`` over ``images``, batched exactly as a client would send them."""
    first, bundles = load_local_chain(root, gates, policy, wires)
    m = bundles[0].manifest
    report, records = feed_and_report(LocalLink(first), images, labels, m.model_id, batch_size, list(m.tiers),
                                      m.full_network_flops, run_id="in-process")
    name, record = bundles[0].served_policy(policy, overridden=bundles[0].tier in (gates or {}))
    report["calibration"] = {"policy": name, **record}
    return report, records
