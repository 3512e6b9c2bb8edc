"""Turn the answers of a run (distributed or in process) into the report users read.

Pure functions over ``Answer``s: what each tier answered and how well, the bytes that crossed each link, the FLOPs
spent against the whole network's, latency percentiles and throughput.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.wire.batch import Answer


@dataclass
class RequestRecord:
    """One request of a run: the answer, its round-trip latency and the serialized size of the request."""

    answer: Answer
    latency_ms: float
    request_bytes: int
    # Streamed requests: sample id -> ms from sending the request to receiving that sample's answer. A sample
    # missing here (every sample of a unary request) waited for the whole request.
    sample_latency_ms: dict[int, float] = field(default_factory=dict)

    def sample_ms(self, sample_id: int) -> float:
        return self.sample_latency_ms.get(sample_id, self.latency_ms)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    q = np.percentile(np.asarray(values, dtype=np.float64), [50, 95, 99])
    return {"p50": round(float(q[0]), 3), "p95": round(float(q[1]), 3), "p99": round(float(q[2]), 3)}


def build_report(
    records: list[RequestRecord],
    labels: dict[int, int],
    tiers: list[str],
    full_network_flops: float,
    wall_s: float,
) -> dict:
    """The report of a run over ``records``; ``labels`` maps sample id to true label."""
    predictions = [p for r in records for p in r.answer.predictions]
    n = len(predictions)
    correct = [p.label == labels[p.sample_id] for p in predictions]
    exits = {t: 0 for t in tiers}
    exit_correct = {t: 0 for t in tiers}
    for p, ok in zip(predictions, correct):
        exits[p.exit_tier] = exits.get(p.exit_tier, 0) + 1
        exit_correct[p.exit_tier] = exit_correct.get(p.exit_tier, 0) + int(ok)
    by_index: dict[int, list[int]] = {}  # exit index -> [samples, right, tier's position]
    for p, ok in zip(predictions, correct):
        row = by_index.setdefault(p.exit_index, [0, 0, p.exit_tier])
        row[0] += 1
        row[1] += int(ok)
    links = {f"{a}_to_{b}": 0 for a, b in zip(tiers, tiers[1:])}
    compute_ms = {t: 0.0 for t in tiers}
    total_flops = 0.0
    for r in records:
        for hop in r.answer.trace:
            total_flops += hop.flops
            compute_ms[hop.tier] = compute_ms.get(hop.tier, 0.0) + hop.compute_ms
            if hop.bytes_sent:
                nxt = tiers[tiers.index(hop.tier) + 1]
                links[f"{hop.tier}_to_{nxt}"] += hop.bytes_sent
    raw = sum(r.request_bytes for r in records)
    mean_flops = total_flops / n if n else 0.0
    latencies = [r.latency_ms for r in records]
    # Per sample: from sending its request to receiving its answer (streamed answers come back as tiers decide).
    by_exit: dict[str, list[float]] = {t: [] for t in tiers}
    by_exit_index: dict[int, list[float]] = {}
    per_sample = []
    for r in records:
        for p in r.answer.predictions:
            ms = r.sample_ms(p.sample_id)
            per_sample.append(ms)
            by_exit.setdefault(p.exit_tier, []).append(ms)
            by_exit_index.setdefault(p.exit_index, []).append(ms)
    return {
        "samples": n,
        "requests": len(records),
        "accuracy": sum(correct) / n if n else None,
        "in_process_accuracy": None,
        "prediction_mismatches": None,
        "exits": exits,
        "exit_fraction": {t: exits[t] / n if n else 0.0 for t in exits},
        "exit_accuracy": {t: (exit_correct[t] / exits[t] if exits[t] else None) for t in exits},
        # Per exit of the model (a tier may hold several), keyed by exit index: who answered there, how well, and
        # how long its samples waited for their answers.
        "exits_by_index": {str(i): {"tier": tier, "samples": k, "fraction": k / n, "accuracy": right / k,
                                    "latency_ms": _percentiles(by_exit_index[i])}
                           for i, (k, right, tier) in sorted(by_index.items())},
        "degraded": sum(1 for p in predictions if p.degraded),
        "bytes": {**links, "raw_input_offload": raw},
        "bytes_per_sample": {**{k: v / n if n else 0.0 for k, v in links.items()}, "raw_input_offload": raw / n if n else 0.0},
        "flops": {
            "full_network_per_sample": full_network_flops,
            "mean_per_sample": mean_flops,
            "saved_fraction": 1.0 - mean_flops / full_network_flops if full_network_flops else None,
        },
        "compute_ms": {t: round(v, 3) for t, v in compute_ms.items()},
        "latency_ms": _percentiles(latencies),
        "sample_latency_ms": {"mean": round(float(np.mean(per_sample)), 3) if per_sample else None,
                              **_percentiles(per_sample)},
        "latency_ms_by_exit": {t: _percentiles(v) for t, v in by_exit.items()},
        "latency_breakdown_ms": latency_breakdown(records, tiers),
        "throughput_samples_per_s": n / wall_s if wall_s > 0 else None,
    }


def latency_breakdown(records: list[RequestRecord], tiers: list[str]) -> dict[str, dict[str, float | None]]:
    """Where each sample's latency went: mean and p50/p95/p99 over samples of each component.

    A sample waits for its whole request, so it carries its request's figures. ``compute_<tier>`` is that tier's
    segment + head + gate time (stretched by ``--compute-scale``), ``encode`` / ``decode`` the link codecs on both
    sides of every link, ``link`` the emulated link delay, and ``queueing`` the rest of the round trip: time in
    gRPC queues and transport, reply (de)serialisation and merging. The components add up to ``total``.
    """
    rows: dict[str, list[float]] = {k: [] for k in
                                    ["total", *(f"compute_{t}" for t in tiers), "encode", "decode", "link", "queueing"]}
    for r in records:
        parts = {f"compute_{t}": 0.0 for t in tiers} | {"encode": 0.0, "decode": 0.0, "link": 0.0}
        for hop in r.answer.trace:
            key = f"compute_{hop.tier}"
            parts[key] = parts.get(key, 0.0) + hop.compute_ms
            parts["encode"] += hop.encode_ms
            parts["decode"] += hop.decode_ms
            parts["link"] += hop.link_ms
        parts["queueing"] = max(0.0, r.latency_ms - sum(parts.values()))
        parts["total"] = r.latency_ms
        for key, value in parts.items():
            rows.setdefault(key, []).extend([value] * len(r.answer.predictions))
    out = {}
    for key, values in rows.items():
        stats = _percentiles(values)
        out[key] = {"mean": round(float(np.mean(values)), 3) if values else None, **stats}
    return out


def predictions_by_id(records: list[RequestRecord]) -> dict[int, tuple[int, str, int]]:
    """``sample id -> (label, exit tier, exit index)`` over a run."""
    return {p.sample_id: (p.label, p.exit_tier, p.exit_index) for r in records for p in r.answer.predictions}


def compare(report: dict, records: list[RequestRecord], reference: list[RequestRecord], ref_report: dict) -> dict:
    """Fill ``in_process_accuracy`` and ``prediction_mismatches`` (label, exit tier or exit differs) from a reference
    run."""
    ours, theirs = predictions_by_id(records), predictions_by_id(reference)
    report["in_process_accuracy"] = ref_report["accuracy"]
    report["prediction_mismatches"] = sum(1 for i, v in ours.items() if theirs.get(i) != v) + len(set(theirs) - set(ours))
    return report


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def describe_calibration(cal: dict) -> str:
    """One line on the policy a run served and how its thresholds were chosen (method, objective, target, delta)."""
    text = cal.get("policy") or "unknown"
    method = cal.get("method")
    if method == "ltt":
        text += (f", thresholds certified by Learn-then-Test: {cal.get('objective')} {cal.get('target')} with "
                 f"probability >= {1 - cal['delta']:.2f} ({cal.get('bound')} bound, {cal.get('samples')} samples)")
    elif method == "naive":
        text += f", thresholds searched on validation data: {cal.get('objective')} {cal.get('target')} (no guarantee)"
    elif method == "alpha":
        text += f", trained trade-off alpha={cal.get('target')}"
    return text


def format_summary(report: dict) -> str:
    """A few readable lines for the terminal (``n/a`` where a figure does not exist, e.g. an empty run)."""
    n = report["samples"]
    first = f"samples {n}   accuracy {_fmt(report['accuracy'], '.4f')}"
    if report["in_process_accuracy"] is not None:
        first += (f"   in-process {_fmt(report['in_process_accuracy'], '.4f')}"
                  f"   mismatches {report['prediction_mismatches']}")
    lines = [first]
    for t, k in report["exits"].items():
        lines.append(f"  {t:>6}: answered {k:6d} ({_fmt(k / n if n else None, '6.1%')})   "
                     f"accuracy {_fmt(report['exit_accuracy'][t], '.4f')}")
    by_index = report.get("exits_by_index") or {}
    if len(by_index) > len(report["exits"]):  # a tier holds several exits: show each
        lines.append("  by exit: " + "   ".join(
            f"{i} ({e['tier']}) {e['fraction']:.1%} acc {e['accuracy']:.4f}"
            + (f" p50 {e['latency_ms']['p50']} ms" if (e.get("latency_ms") or {}).get("p50") is not None else "")
            for i, e in by_index.items()))
    if report.get("degraded"):
        lines.append(f"  degraded answers (next tier unreachable or out of time): {report['degraded']}")
    lines.append("  bytes/sample: " + "   ".join(f"{k} {v:,.0f}" for k, v in report["bytes_per_sample"].items()))
    f = report["flops"]
    lines.append(f"  FLOPs/sample: {f['mean_per_sample'] / 1e6:.2f} M of {f['full_network_per_sample'] / 1e6:.2f} M "
                 f"(saved {_fmt(f['saved_fraction'], '.1%')})")
    cal = report.get("calibration")
    if cal:
        lines.append("  exit policy: " + describe_calibration(cal))
    lat = report["latency_ms"]
    lines.append(f"  latency per request ms: p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}   "
                 f"throughput {_fmt(report['throughput_samples_per_s'], '.1f')} samples/s")
    per_sample = report.get("sample_latency_ms")
    if per_sample and per_sample.get("p50") is not None:
        lines.append(f"  latency per sample ms: mean {per_sample['mean']}  p50 {per_sample['p50']}  "
                     f"p95 {per_sample['p95']}  p99 {per_sample['p99']}")
        lines.append("  latency per sample by exit, p50/p95/p99 ms: " + "   ".join(
            f"{t} {v['p50']}/{v['p95']}/{v['p99']}" for t, v in report["latency_ms_by_exit"].items()
            if v["p50"] is not None))
    parts = report.get("latency_breakdown_ms") or {}
    if parts.get("total", {}).get("mean") is not None:
        lines.append("  latency per sample, mean ms: " + "  ".join(
            f"{k} {v['mean']:.1f}" for k, v in parts.items() if k != "total" and v["mean"]))
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    """Write ``report`` as indented JSON, creating the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
