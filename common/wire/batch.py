"""What travels between tiers, in memory: a batch of samples going on, and the answers and hop traces coming back.

Plain dataclasses with no protobuf in them: ``common.wire.messages`` converts them to and from the wire, and the
runtime, the batcher and the in-process chain work on them directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from torch import Tensor


@dataclass
class Batch:
    """Samples travelling between tiers: one row of ``tensor`` per entry of ``sample_ids``."""

    request_id: str
    model_id: str
    sample_ids: list[int]
    tensor: Tensor
    # time.monotonic() by which the caller needs the answer (None = no deadline); forwarded batches inherit it.
    deadline: float | None = None
    # Seconds the longest-waiting sample already spent in batching queues before this tier (dynamic batching spends
    # one delay budget per sample along the chain, not one per tier); forwarded batches carry it on.
    queued_s: float = 0.0
    # The logits of every exit before the receiving tier, (N, exits, K), when its gates or exit heads read them.
    history: Tensor | None = None


@dataclass
class Prediction:
    sample_id: int
    label: int
    confidence: float
    exit_tier: str
    exit_index: int
    degraded: bool = False  # answered by this exit only because the next tier could not be reached in time


@dataclass
class Hop:
    """What one tier did with one request (mirrors ``HopTrace`` on the wire)."""

    tier: str
    samples_in: int
    samples_exited: int
    compute_ms: float
    bytes_received: int = 0
    bytes_sent: int = 0
    forward_ms: float = 0.0
    flops: float = 0.0
    encode_ms: float = 0.0  # encoding the forwarded request
    decode_ms: float = 0.0  # decoding the received request (set by whoever decoded it)
    link_ms: float = 0.0  # emulated delay of the outgoing link
    handle_ms: float = 0.0  # receiving the request to the reply being ready (set by the server or local link)
    samples_degraded: int = 0
    downstream_error: str = ""


@dataclass
class Answer:
    request_id: str
    predictions: list[Prediction]
    trace: list[Hop] = field(default_factory=list)


def combine_hops(a: Hop, b: Hop) -> Hop:
    """One hop from two partial hops of the same tier (a streamed answer sends a tier's figures in two parts):
    numbers add up, error texts are joined."""
    values = {}
    for f in fields(Hop):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "tier":
            values[f.name] = x
        elif isinstance(x, str):
            values[f.name] = "; ".join(v for v in (x, y) if v)
        else:
            values[f.name] = x + y
    return Hop(**values)


def merge_answers(request_id: str, sample_ids: list[int], parts) -> Answer:
    """The one answer of a request from the partial answers of its stream: predictions in request order, and one
    hop per tier (in order of first appearance) adding up that tier's partial hops. ``ValueError`` when a sample is
    answered twice or not at all."""
    by_id: dict[int, Prediction] = {}
    hops: dict[str, Hop] = {}
    for part in parts:
        for p in part.predictions:
            if p.sample_id in by_id:
                raise ValueError(f"sample {p.sample_id} answered twice")
            by_id[p.sample_id] = p
        for h in part.trace:
            hops[h.tier] = combine_hops(hops[h.tier], h) if h.tier in hops else replace(h)
    missing = [i for i in sample_ids if i not in by_id]
    if missing or len(by_id) != len(sample_ids):
        raise ValueError(f"{len(missing)} of {len(sample_ids)} samples not answered, "
                         f"{len(by_id) - len(sample_ids) + len(missing)} answered that were not asked")
    return Answer(request_id, [by_id[i] for i in sample_ids], list(hops.values()))
