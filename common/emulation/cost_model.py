"""What a request costs on a deployment, predicted from measured pieces: per-tier compute, per-link bytes and codec
time, and the emulated link model. Pure arithmetic over numbers measured elsewhere (``training.analysis.planner``), no I/O.

A request of ``B`` samples enters the first tier; ``reached[k]`` of them reach tier ``k`` (the rest left at an
earlier exit). The request takes, summed over the tiers it reaches,

    tier k:  max(scale_k, 1) * compute_k(reached[k])
    link k:  codec_k(m) + overhead_k + RTT_k + (request_k(m) + reply(m, hops)) * 8 / rate_k,   m = reached[k + 1]

which is what the tiers do when served: a tier stretches its measured compute by ``--compute-scale`` (never
shrinks it), encodes the declined samples once, and sleeps the modelled delay of the exchange (``common.wire.link``),
whose reply carries one prediction per forwarded sample and one trace entry per tier that worked on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np

from common.errors import ConfigError
from common.wire.link import LinkModel


@dataclass(frozen=True)
class Curve:
    """A measured quantity against batch size: piecewise linear through the measured points, continued along the
    last segment past the largest one, proportional below the smallest, and 0 for 0 samples."""

    sizes: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.values) or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"a curve needs increasing sizes with one value each, got {self.sizes}, {self.values}")
        if self.sizes[0] <= 0:
            raise ValueError("curve sizes must be positive")

    def __call__(self, n: float) -> float:
        xs, ys = self.sizes, self.values
        if n <= 0:
            return 0.0
        if n < xs[0]:
            return ys[0] * n / xs[0]
        if n > xs[-1] and len(xs) > 1:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            return ys[-1] + slope * (n - xs[-1])
        if n > xs[-1]:
            return ys[0] * n / xs[0]
        return float(np.interp(n, xs, ys))

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "values": [round(v, 9) for v in self.values]}


ZERO = Curve((1.0,), (0.0,))


@dataclass(frozen=True)
class TierCost:
    """One tier: its runtime's seconds for ``n`` samples on this machine and the compute profile that stretches it."""

    compute_s: Curve
    scale: float = 1.0


@dataclass(frozen=True)
class LinkCost:
    """One link: serialized request bytes for ``n`` samples, seconds to encode and decode them, the emulated link
    (``None``: loopback, no delay) and a fixed per-call overhead of the RPC machinery."""

    request_bytes: Curve
    codec_s: Curve = ZERO
    link: LinkModel | None = None
    overhead_s: float = 0.0


@lru_cache(maxsize=4096)
def reply_bytes(samples: int, hops: int) -> int:
    """Serialized size of a reply carrying ``samples`` predictions and ``hops`` trace entries, with values of
    typical magnitude (ids and labels below 2^14, every float and counter set)."""
    from common.wire import messages
    from common.wire.batch import Answer, Hop, Prediction

    preds = [Prediction(10_000 + i, 7, 0.5, "cloud", 2) for i in range(samples)]
    trace = [Hop("cloud", samples, samples, 1.5, 100_000, 100_000, 2.5, 1e7, 0.5, 0.5, 1.5, 3.5)
             for _ in range(hops)]
    return messages.reply_from_answer(Answer("request-000000", preds, trace)).ByteSize()


@dataclass
class RequestCost:
    seconds: float
    bytes_sent: list[int] = field(default_factory=list)  # request bytes per link
    # Where the seconds go: "compute" per tier (a list), "codec", "link" (emulated delay) and "overhead".
    parts: dict = field(default_factory=dict)


def request_cost(reached: Sequence[int], tiers: Sequence[TierCost], links: Sequence[LinkCost],
                 entry: LinkCost | None = None) -> RequestCost:
    """Predicted seconds of one request in which ``reached[k]`` samples reach tier ``k``, and its bytes per link.
    ``entry`` is the client's call into the first tier (its codec time and overhead; it is not emulated)."""
    if len(reached) != len(tiers) or len(links) != len(tiers) - 1:
        raise ValueError(f"{len(tiers)} tiers need {len(tiers)} reach counts and {len(tiers) - 1} links")
    compute = [0.0] * len(tiers)
    parts = {"compute": compute, "codec": 0.0, "link": 0.0, "overhead": 0.0}
    sent = [0] * len(links)
    if entry is not None and reached[0] > 0:
        parts["codec"] += entry.codec_s(reached[0])
        parts["overhead"] += entry.overhead_s
    for k, n in enumerate(reached):
        if n <= 0:
            break
        compute[k] = max(tiers[k].scale, 1.0) * tiers[k].compute_s(n)
        if k < len(links) and reached[k + 1] > 0:
            m, link = reached[k + 1], links[k]
            hops = sum(1 for r in reached[k + 1:] if r > 0)
            req = int(round(link.request_bytes(m)))
            parts["codec"] += link.codec_s(m)
            parts["overhead"] += link.overhead_s
            if link.link is not None:
                parts["link"] += link.link.delay_s(req, reply_bytes(m, hops))
            sent[k] = req
    total = sum(compute) + parts["codec"] + parts["link"] + parts["overhead"]
    return RequestCost(total, sent, parts)


def reach_counts(exit_of: np.ndarray, tiers: int) -> list[int]:
    """How many of a request's samples reach each tier, given the exit (= tier) index each sample leaves at."""
    return [int((exit_of >= k).sum()) for k in range(tiers)]


def predict_run(exit_of: np.ndarray, batch_size: int, tiers: Sequence[TierCost], links: Sequence[LinkCost],
                entry: LinkCost | None = None) -> dict:
    """Latency per request (mean, p50, p95 and the mean of each part, ms) and request bytes per sample on each link
    when the samples, whose exit (tier) indices are ``exit_of`` in order, are sent ``batch_size`` at a time as the
    clients do."""
    if batch_size < 1 or len(exit_of) == 0:
        raise ValueError("need a positive batch size and at least one sample")
    latencies, sent = [], np.zeros(len(links))
    parts = {"compute": np.zeros(len(tiers)), "codec": 0.0, "link": 0.0, "overhead": 0.0}
    for lo in range(0, len(exit_of), batch_size):
        cost = request_cost(reach_counts(exit_of[lo:lo + batch_size], len(tiers)), tiers, links, entry)
        latencies.append(cost.seconds * 1e3)
        sent += cost.bytes_sent
        for key, value in cost.parts.items():
            parts[key] = parts[key] + np.asarray(value) * 1e3
    lat = np.asarray(latencies)
    mean_parts = {k: (v / len(lat)).tolist() if k == "compute" else float(v) / len(lat) for k, v in parts.items()}
    return {"latency_ms_mean": float(lat.mean()), "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p95": float(np.percentile(lat, 95)), "requests": len(lat), "latency_parts_ms": mean_parts,
            "bytes_per_sample": [float(b) / len(exit_of) for b in sent]}


def parse_profile(text: str, tiers: Sequence[str]) -> list[float]:
    """A compute profile ``device=4,edge=2,cloud=1`` -> one stretch factor per tier (1 where not named)."""
    scales = dict.fromkeys(tiers, 1.0)
    for item in filter(None, text.split(",")):
        tier, sep, value = item.partition("=")
        if not sep or tier not in scales:
            raise ConfigError(f"bad compute profile {item!r}: expected TIER=S with TIER one of {list(tiers)}")
        try:
            scales[tier] = float(value)
        except ValueError:
            raise ConfigError(f"bad compute scale {value!r} for {tier}") from None
        if not 0 < scales[tier] < float("inf"):
            raise ConfigError(f"compute scale of {tier} must be a positive number, got {value}")
    return [scales[t] for t in tiers]
