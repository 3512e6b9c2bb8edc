"""Communication against computation, measured: serving overhead, link codecs, baselines and the planner in one run.

``python -m scripts.bench_pipeline --out DIR [--quick] [--bundle DIR] [--data SPEC] [--links L1 L2 ...]``

Without ``--bundle`` it first trains a small model on the built-in synthetic data (``--quick``: a few seconds of
training and 256 test images; otherwise the demo's recipe and 2,000 images). Then, on loopback:

- ``serving_overhead``: throughput of the three tier processes (float32 links, no emulation) against the same
  bundles chained in one process, same batches, requests alternating between the two; ``distributed_over_in_process``
  is the ratio. ``--overhead-widths`` repeats it for freshly initialised ResNet-18s of other widths (default 0.25 and
  1 without ``--quick``), every sample crossing both links, to show how the ratio depends on the model's size;
- ``codecs``: every link codec, in process (the bytes are those of the very requests a tier would send), with
  every sample sent across every link: bytes per sample on each link, accuracy, ``bytes_ratio_vs_float32``;
- ``baselines``: per emulated link setting (every link of the deployment gets it) and the compute profiles
  (``--compute-scale device=4,edge=2,cloud=1`` by default): device-only, cloud-only raw / PNG / JPEG offload, the
  split without early exits, the split with early exits (float32 and int8 links, in process) and the split with
  early exits served by three real processes;
- ``planner``: ``scripts.plan`` for the first link setting and the compute profile, its chosen split exported and
  served by three processes under that link and profile: predicted against measured mean latency per request
  (``latency_relative_error``), bytes and accuracy. Needs the checkpoint behind the bundle (``--checkpoint``);
- ``streaming``: the bundle served by three processes over the first link setting with the compute profile, answers
  streamed back as each tier decides them (``InferStream`` everywhere) against one reply per request (``Infer``
  everywhere, tiers started with ``--forward-call unary``), requests alternating between the two: per-sample latency
  by exit tier (p50/p95) and its mean; then with never gates (nothing exits early), the throughput of each, whose
  ratio is the cost of streaming. Also writes ``DIR/streaming.png``.

Writes ``DIR/bench.json`` and ``DIR/bench.png`` (``--sections`` measures a subset, JSON only).
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.serving import host

host.tune_environment()  # the tiers' settings, before torch loads: measured in process as they will be served

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.emulation.baselines import Direct, ImageFileOffload, emulated_chain, offload_raw, whole_network_runtime
from training.export import export_bundles
from common.model.bundle import find_tier_folders, load_tier_bundle
from common.cli import positive_int, run
from common.emulation.cost_model import parse_profile
from common.errors import ConfigError
from common.emulation.feed import feed, feed_and_report, receive_stream
from common.emulation.report import RequestRecord, build_report
from common.model.gates import ConstantGate
from common.wire.link import parse_link
from common.emulation.chain import LocalLink, load_local_chain
from common.serving.client import NextTierClient
from common.wire.batch import Batch
from common.serving.runtime import Forward
from common.wire.codecs import ELEMENT_CODECS, FLOAT32, WireCodec, link_args
from common.emulation.deployment import LocalDeployment

NEVER = ConstantGate(False)
WIDTH_SAMPLES = 256  # images per pass of the width sweep: a full-width ResNet-18 runs about 100 per second here


def parse_widths(spec: str | None, quick: bool) -> list[float]:
    """``--overhead-widths``: comma-separated positive widths, ``none``, or the default for the run's size."""
    if spec is None:
        return [] if quick else [0.25, 1.0]
    if spec == "none":
        return []
    try:
        widths = [float(w) for w in spec.split(",")]
    except ValueError:
        widths = []
    if not widths or not all(0 < w <= 4 for w in widths):
        raise ConfigError(f"--overhead-widths takes comma-separated widths in (0, 4] or 'none', got {spec!r}")
    return widths


SECTIONS = {"serving_overhead", "codecs", "baselines", "planner", "streaming"}


def train_small(out: Path, quick: bool) -> Path:
    """Train and export a model on synthetic data; return the bundle root."""
    from training.config import TrainConfig
    from training.export import export
    from training.train import train

    if quick:  # seconds, not minutes: early exits trained just enough to decide something
        cfg = TrainConfig(epochs=2, limit_train=4000, limit_val=1000, target_drop=2.0, epochs_gates=10)
    else:  # the demo's recipe
        cfg = TrainConfig()
    train(cfg, out / "train")
    export(out / "train" / "checkpoint.safetensors", out / "bundle")
    return out / "bundle"


def summarize(report: dict, records, links: list[str]) -> dict:
    """The figures a baseline row needs, from a report and its records."""
    lat = [r.latency_ms for r in records]
    per_link = {k: round(report["bytes_per_sample"].get(k, 0.0), 1) for k in links}
    return {
        "accuracy": report["accuracy"],
        "latency_ms_mean": round(float(np.mean(lat)), 2),
        "latency_ms_p95": round(float(np.percentile(lat, 95)), 2),
        "bytes_per_sample": round(sum(per_link.values()), 1),
        "bytes_per_sample_by_link": per_link,
        "exits": report["exits"],
    }


def warm_up(forward, images, model_id, batch_size, batches: int = 4) -> None:
    """A few batches off the clock: a fresh process pays for lazy initialisation and for faulting its working set in
    on its first calls."""
    feed(forward, images[:batches * batch_size], model_id, batch_size, "warmup")


def throughput(forward, images, model_id, batch_size, inflight: int) -> float:
    """Samples per second over ``images`` with ``inflight`` requests outstanding at once, so that the tiers of a
    pipeline work on different batches at the same time."""
    batches = [Batch(f"timed-{i}", model_id, list(range(lo, min(lo + batch_size, len(images)))),
                     images[lo:lo + batch_size]) for i, lo in enumerate(range(0, len(images), batch_size))]
    start = time.perf_counter()
    with ThreadPoolExecutor(inflight) as pool:
        answered = sum(len(f.answer.predictions) for f in pool.map(forward, batches))
    return answered / (time.perf_counter() - start)


def paired_seconds(forwards: dict[str, Forward], images, model_id, batch_size, rounds: int) -> dict[str, list[float]]:
    """Seconds per request of each forward function over the full batches of ``images``, interleaved request by
    request (the order rotating every round), so that all of them meet the same disturbances of a shared machine."""
    names, seconds = list(forwards), {name: [] for name in forwards}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for i, lo in enumerate(range(0, len(images) - batch_size + 1, batch_size)):
            for name in order:
                ids = list(range(lo, lo + batch_size))
                batch = Batch(f"{name}-{r}-{i}", model_id, ids, images[lo:lo + batch_size])
                start = time.perf_counter()
                forwards[name](batch)
                seconds[name].append(time.perf_counter() - start)
    return seconds


def measure_overhead(bundle_root, bundles, data, batch_size, rounds: int = 3, threads: int | None = None,
                     inflight: int = 2) -> dict:
    """The three tier processes against the same bundles chained in one process, one request at a time.

    Requests alternate between the two (``paired_seconds``) and each side's cost is its median time per request:
    on a shared machine, bursts of other work then fall on both sides alike and barely move the medians, where
    whole passes one after the other were each disturbed differently. The three-process pipeline is also measured
    with ``inflight`` requests outstanding (``pipelined``, the median of ``rounds`` passes), so that its tiers work
    on different batches at once."""
    first, _ = load_local_chain(bundle_root)
    model_id = bundles[0].model_id
    local = LocalLink(first)
    extra = {t: ["--threads", str(threads)] for t in (b.tier for b in bundles)} if threads else {}
    with LocalDeployment(bundle_root, extra_args=extra) as dep:
        client = NextTierClient(dep.device_address, timeout_s=120)
        try:
            warm_up(local, data.images, model_id, batch_size)
            warm_up(client, data.images, model_id, batch_size)
            seconds = paired_seconds({"in_process": local, "distributed": client}, data.images, model_id,
                                     batch_size, rounds)
            pipelined = [throughput(client, data.images, model_id, batch_size, inflight) for _ in range(rounds)]
        finally:
            client.close()
    median = {k: float(np.median(v)) for k, v in seconds.items()}
    rate = {k: batch_size / v for k, v in median.items()}
    return {"batch_size": batch_size, "codec": "float32", "requests_each": len(seconds["in_process"]),
            "rounds": rounds, "torch_threads_per_process": threads or torch.get_num_threads(),
            "in_process_samples_per_s": round(rate["in_process"], 1),
            "distributed_samples_per_s": round(rate["distributed"], 1),
            "distributed_over_in_process": round(median["in_process"] / median["distributed"], 3),
            # What serving adds to a request: calls, copies and transport, and tiers whose caches went cold idling.
            "overhead_ms_per_request": round((median["distributed"] - median["in_process"]) * 1e3, 2),
            "ms_per_request_p10_p50_p90": {k: [round(float(np.percentile(v, q)) * 1e3, 2) for q in (10, 50, 90)]
                                           for k, v in seconds.items()},
            "pipelined_requests_in_flight": inflight,
            "pipelined_samples_per_s": round(float(np.median(pipelined)), 1),
            "pipelined_over_in_process": round(float(np.median(pipelined)) / rate["in_process"], 3)}


def overhead_by_width(out: Path, widths: list[float], data, batch_size: int, threads: int | None) -> dict:
    """``measure_overhead`` for the CIFAR ResNet-18 at each channel width, freshly initialised, with every sample
    crossing both links (never gates). A request's compute grows with the square of the width, the tensors it sends
    only linearly and its number of calls not at all, so this shows from which model size on three processes cost
    little. Training does not change the cost of serving, so the weights are left as initialised."""
    from training.config import TrainConfig
    from training.train import build_model

    rows = {}
    for width in widths:
        torch.manual_seed(0)
        model = build_model(TrainConfig(width=width), 10, tuple(data.images.shape[1:])).eval()
        root = out / f"overhead-width-{width:g}"
        export_bundles(model, [NEVER] * (model.num_exits - 1), root, [str(c) for c in range(10)])
        bundles = [load_tier_bundle(f) for f in find_tier_folders(root)]
        rows[f"{width:g}"] = {"flops_per_sample": bundles[0].manifest.full_network_flops,
                              "device_to_edge_bytes_per_sample": bundles[0].manifest.output_bytes_per_sample,
                              **measure_overhead(root, bundles, data, batch_size, rounds=4, threads=threads)}
        print(f"serving overhead, ResNet-18 width {width:g}:", json.dumps(rows[f"{width:g}"]), flush=True)
    return rows


def measure_codecs(bundles, data, batch_size, tiers, link_names) -> dict:
    rows = {}
    for compression in ("", "zlib"):
        for name in ELEMENT_CODECS:
            wire = WireCodec(name, compression)
            # Every sample crosses every link (no early exit), so each codec's bytes and its accuracy cost are
            # those of the whole tensor and the final exit.
            never = [NEVER] * (len(bundles) - 1) + [None]
            chain = emulated_chain(bundles, never, [wire] * len(bundles), [None] * len(bundles), [1.0] * len(bundles))
            report, records = feed_and_report(Direct(chain), data.images, data.labels, bundles[0].model_id,
                                              batch_size, tiers, bundles[0].manifest.full_network_flops)
            encode = report["latency_breakdown_ms"]["encode"]["mean"]
            decode = report["latency_breakdown_ms"]["decode"]["mean"]
            rows[str(wire)] = {"accuracy": report["accuracy"],
                               "bytes_per_sample": {k: round(report["bytes_per_sample"][k], 1) for k in link_names},
                               "encode_ms_per_request": encode, "decode_ms_per_request": decode}
    base = rows["float32"]["bytes_per_sample"]
    for row in rows.values():
        row["bytes_ratio_vs_float32"] = {k: round(base[k] / v, 3) if v else None
                                         for k, v in row["bytes_per_sample"].items()}
        row["accuracy_delta_points_vs_float32"] = round(100 * (row["accuracy"] - rows["float32"]["accuracy"]), 2)
    return rows


def measure_baselines(bundle_root, bundles, data, batch_size, tiers, link_names, link_spec, scales,
                      threads: int | None = None) -> dict:
    link = parse_link(link_spec)
    n = len(bundles)
    full = bundles[0].manifest.full_network_flops
    model_id = bundles[0].model_id

    def run_one(forward):
        report, records = feed_and_report(forward, data.images, data.labels, model_id, batch_size, tiers, full)
        return report, records

    rows = {}
    device_only = whole_network_runtime(bundles, tiers[0], scales[0])
    rows["device_only"] = summarize(*run_one(Direct(device_only)), link_names)
    cloud = whole_network_runtime(bundles, tiers[-1], scales[-1])
    for name, forward in (("cloud_raw_uint8", offload_raw(cloud, link)),
                          ("cloud_png", ImageFileOffload(cloud, "PNG", link, scales[0])),
                          ("cloud_jpeg_q90", ImageFileOffload(cloud, "JPEG", link, scales[0]))):
        report, records = run_one(forward)
        row = summarize(report, records, link_names)
        row["bytes_per_sample"] = round(report["bytes_per_sample"]["raw_input_offload"], 1)
        row["bytes_per_sample_by_link"] = {"device_to_cloud": row["bytes_per_sample"]}
        rows[name] = row
    links = [link] * (n - 1) + [None]
    never = [NEVER] * (n - 1) + [None]
    split_cases = (("split_no_exits", never, FLOAT32), ("split_exits_float32", [None] * n, FLOAT32),
                   ("split_exits_int8", [None] * n, WireCodec("int8")))
    for name, gates, wire in split_cases:
        chain = emulated_chain(bundles, gates, [wire] * n, links, scales)
        report, records = run_one(Direct(chain))
        rows[name] = summarize(report, records, link_names)
        rows[name]["latency_breakdown_ms"] = {k: v["mean"] for k, v in report["latency_breakdown_ms"].items()}
    # The same split, served by three real processes with the link and compute flags on each tier.
    extra = {t: link_args(FLOAT32, link if k < n - 1 else None) + ["--compute-scale", str(scales[k])]
             + (["--threads", str(threads)] if threads else []) for k, t in enumerate(tiers)}
    with LocalDeployment(bundle_root, extra_args=extra) as dep:
        client = NextTierClient(dep.device_address, timeout_s=300)
        try:
            warm_up(client, data.images, model_id, batch_size)  # fresh processes; the in-process runs are warm
            report, records = run_one(client)
        finally:
            client.close()
    rows["split_exits_float32_served"] = summarize(report, records, link_names)
    rows["split_exits_float32_served"]["latency_breakdown_ms"] = {
        k: v["mean"] for k, v in report["latency_breakdown_ms"].items()}
    return rows


def alternate_calls(calls: dict[str, object], images, model_id, batch_size, rounds: int
                    ) -> tuple[dict[str, list[RequestRecord]], dict[str, float]]:
    """Full batches of ``images`` sent ``rounds`` times, request by request alternating between the ``calls``
    (name -> ("unary", Forward) or ("stream", ForwardStream)), the order rotating every round. Records and busy
    seconds of each."""
    names = list(calls)
    records: dict[str, list[RequestRecord]] = {n: [] for n in names}
    busy = {n: 0.0 for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for i, lo in enumerate(range(0, len(images) - batch_size + 1, batch_size)):
            for name in order:
                kind, call = calls[name]
                ids = list(range(lo, lo + batch_size))
                batch = Batch(f"{name}-{r}-{i}", model_id, ids, images[lo:lo + batch_size])
                t0 = time.perf_counter()
                if kind == "stream":
                    record = receive_stream(call, batch, t0)
                else:
                    forwarded = call(batch)
                    record = RequestRecord(forwarded.answer, (time.perf_counter() - t0) * 1e3,
                                           forwarded.request_bytes)
                busy[name] += time.perf_counter() - t0
                records[name].append(record)
    return records, busy


def measure_streaming(bundle_root, bundles, data, batch_size, tiers, link_spec, scales, threads: int | None = None,
                      rounds: int = 2) -> dict:
    """Streamed against unary answers, served, over ``link_spec`` with compute profile ``scales`` (module doc)."""
    link = parse_link(link_spec)
    n = len(tiers)
    model_id = bundles[0].model_id
    full = bundles[0].manifest.full_network_flops
    labels = dict(enumerate(data.labels.tolist()))

    def flags(forward_call: str) -> dict[str, list[str]]:
        return {t: link_args(FLOAT32, link if k < n - 1 else None) + ["--compute-scale", str(scales[k])]
                + (["--threads", str(threads)] if threads else []) + ["--forward-call", forward_call]
                for k, t in enumerate(tiers)}

    def run_pair(gates: dict) -> tuple[dict[str, list[RequestRecord]], dict[str, float]]:
        # Both deployments up at once, one request at a time: they meet the same disturbances of the machine.
        with LocalDeployment(bundle_root, gates=gates, extra_args=flags("stream")) as streamed, \
                LocalDeployment(bundle_root, gates=gates, extra_args=flags("unary")) as unary:
            clients = {"streamed": NextTierClient(streamed.device_address, timeout_s=300),
                       "unary": NextTierClient(unary.device_address, timeout_s=300)}
            try:
                calls = {"unary": ("unary", clients["unary"]), "streamed": ("stream", clients["streamed"].stream)}
                alternate_calls(calls, data.images[:4 * batch_size], model_id, batch_size, 1)  # warm-up
                return alternate_calls(calls, data.images, model_id, batch_size, rounds)
            finally:
                for c in clients.values():
                    c.close()

    out: dict = {"link": link_spec, "compute_scale": dict(zip(tiers, scales)), "batch_size": batch_size,
                 "rounds": rounds}
    records, busy = run_pair({})
    for name, recs in records.items():
        report = build_report(recs, labels, tiers, full, busy[name])
        out[name] = {
            "exits": report["exits"], "accuracy": report["accuracy"],
            "latency_ms_by_exit": {t: {k: v[k] for k in ("p50", "p95")} for t, v in
                                   report["latency_ms_by_exit"].items()},
            # A tier may hold several exits: each one's samples, streamed, are answered as its gate decides.
            "latency_ms_by_exit_index": {i: {"tier": e["tier"], "samples": e["samples"],
                                             **{k: e["latency_ms"][k] for k in ("p50", "p95")}}
                                         for i, e in report["exits_by_index"].items()},
            "sample_latency_ms": report["sample_latency_ms"],
            "request_latency_ms": report["latency_ms"],
            "throughput_samples_per_s": round(report["throughput_samples_per_s"], 1),
        }
    never = {t: NEVER for t in tiers[:-1]}
    records, busy = run_pair(never)
    out["never_gates"] = {name: {"throughput_samples_per_s": round(sum(len(r.answer.predictions) for r in recs)
                                                                    / busy[name], 1),
                                 "request_latency_ms_mean": round(float(np.mean([r.latency_ms for r in recs])), 2)}
                          for name, recs in records.items()}
    s, u = out["streamed"], out["unary"]
    dev, cloud = s["latency_ms_by_exit"][tiers[0]]["p50"], s["latency_ms_by_exit"][tiers[-1]]["p50"]
    out["checks"] = {
        "device_p50_over_cloud_p50": round(dev / cloud, 3) if dev is not None and cloud else None,
        "mean_sample_latency_streamed_over_unary": round(s["sample_latency_ms"]["mean"]
                                                         / u["sample_latency_ms"]["mean"], 3),
        "never_gates_throughput_streamed_over_unary": round(
            out["never_gates"]["streamed"]["throughput_samples_per_s"]
            / out["never_gates"]["unary"]["throughput_samples_per_s"], 3),
    }
    return out


def plot_streaming(streaming: dict, path: Path) -> None:
    """Per-sample latency by exit tier (p50 bar, p95 tick), unary against streamed; never-gates throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    tiers = list(streaming["unary"]["latency_ms_by_exit"])
    groups = tiers + ["all samples (mean)"]
    for j, name in enumerate(("unary", "streamed")):
        row = streaming[name]
        p50 = [row["latency_ms_by_exit"][t]["p50"] or 0 for t in tiers] + [row["sample_latency_ms"]["mean"]]
        p95 = [row["latency_ms_by_exit"][t]["p95"] or 0 for t in tiers] + [row["sample_latency_ms"]["mean"]]
        x = np.arange(len(groups)) + j * 0.4
        axes[0].bar(x, p50, 0.4, label=f"{name} (p50; tick: p95)")
        axes[0].scatter(x, p95, marker="_", s=200, color="black")
    axes[0].set_xticks(np.arange(len(groups)) + 0.2, [f"answered at {t}" for t in tiers] + groups[-1:])
    axes[0].set_ylabel("ms from sending the request to the sample's answer")
    axes[0].set_title(f"per-sample latency, batch {streaming['batch_size']}, link {streaming['link']}", fontsize=9)
    axes[0].legend()
    never = streaming["never_gates"]
    axes[1].bar(["unary", "streamed"], [never["unary"]["throughput_samples_per_s"],
                                        never["streamed"]["throughput_samples_per_s"]])
    axes[1].set_ylabel("samples/s")
    axes[1].set_title("never gates (no early exit)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def find_checkpoint(bundle_root: Path) -> Path | None:
    """The checkpoint a bundle root was exported from, where the project's commands leave it."""
    for candidate in (bundle_root.parent / "train" / "checkpoint.safetensors",
                      bundle_root.parent / "checkpoint.safetensors"):
        if candidate.is_file():
            return candidate
    return None


def measure_planner(ckpt: Path, data, batch_size: int, link_spec: str, scales: list[float], out: Path,
                    threads: int | None, codecs: tuple[str, ...]) -> dict:
    """Plan for ``link_spec`` and the compute profile, export the chosen split, serve it with three processes
    under the same link and profile, and compare the measured mean latency per request with the prediction."""
    from training import checkpoint
    from common.data.datasets import load
    from training.analysis.planner import Settings, plan
    from scripts.plan import export_choice

    model, meta = checkpoint.load(ckpt)
    cfg = meta.get("config") or {}
    val = load(cfg["data"], "val", val_fraction=cfg.get("val_fraction", 0.1), seed=int(cfg.get("seed", 0)),
               limit=cfg.get("limit_val"))
    link = parse_link(link_spec)
    settings = Settings(link=link, scales=tuple(scales), batch_size=batch_size,
                        target_drop=float(cfg.get("target_drop") or 1.0), policy=cfg.get("policy", "confidence"),
                        codecs=codecs, seed=int(cfg.get("seed", 0)))
    result = plan(model, meta, val, data, settings)
    if result["chosen"] is None:
        return {"chosen": None, "note": "no split keeps the accuracy target"}
    best = result["candidates"][result["chosen"]]
    export_choice(model, meta, best, out, settings.policy, {"link": link_spec, "compute_scale": scales})
    bundles = [load_tier_bundle(f) for f in find_tier_folders(out)]
    tiers = [b.tier for b in bundles]
    # No --codec: each tier uses the link codec its exported bundle names.
    extra = {t: link_args(None, link if k < len(tiers) - 1 else None) + ["--compute-scale", str(scales[k])]
             + (["--threads", str(threads)] if threads else []) for k, t in enumerate(tiers)}
    with LocalDeployment(out, extra_args=extra) as dep:
        client = NextTierClient(dep.device_address, timeout_s=300)
        try:
            warm_up(client, data.images, bundles[0].model_id, batch_size)
            report, records = feed_and_report(client, data.images, data.labels, bundles[0].model_id, batch_size,
                                              tiers, bundles[0].manifest.full_network_flops)
        finally:
            client.close()
    measured = summarize(report, records, [f"{a}_to_{b}" for a, b in zip(tiers, tiers[1:])])
    measured["latency_breakdown_ms"] = {k: v["mean"] for k, v in report["latency_breakdown_ms"].items()}
    predicted = best.predicted
    return {"link": link_spec, "chosen": best.name, "rank": result["chosen"] + 1,
            "fastest_candidate": result["candidates"][0].name,
            "predicted": {k: predicted[k] for k in ("latency_ms_mean", "latency_ms_p95", "latency_parts_ms",
                                                    "bytes_per_sample", "accuracy", "exits")},
            "measured": measured,
            "latency_relative_error": round(abs(predicted["latency_ms_mean"] - measured["latency_ms_mean"])
                                            / measured["latency_ms_mean"], 3)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(result["baselines"])
    names = list(result["baselines"][settings[0]])
    planned = (result.get("planner") or {}).get("measured")
    fig, axes = plt.subplots(1, 4 if planned else 3, figsize=(22 if planned else 17, 5))
    width = 0.8 / len(settings)
    for i, s in enumerate(settings):
        rows = result["baselines"][s]
        axes[0].barh(np.arange(len(names)) + i * width, [rows[k]["latency_ms_mean"] for k in names], width, label=s)
    axes[0].set_yticks(np.arange(len(names)) + width * (len(settings) - 1) / 2, names)
    axes[0].set_xlabel("mean latency per request, ms")
    axes[0].legend(title="link")
    rows = result["baselines"][settings[0]]
    axes[1].barh(names, [max(rows[k]["bytes_per_sample"], 1) for k in names])
    axes[1].set_xscale("log")
    axes[1].set_xlabel("bytes per sample sent (all links)")
    codecs = result["codecs"]
    link_names = list(next(iter(codecs.values()))["bytes_per_sample"])
    for j, link in enumerate(link_names):
        axes[2].bar(np.arange(len(codecs)) + j * 0.4, [c["bytes_per_sample"][link] for c in codecs.values()], 0.4,
                    label=link)
    axes[2].set_xticks(np.arange(len(codecs)) + 0.2, list(codecs), rotation=35, ha="right")
    axes[2].set_ylabel("bytes per sample")
    axes[2].legend()
    axes[2].set_title("link codecs (accuracy: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in codecs.items()
                                                              if k in ("float32", "int8")) + ")", fontsize=9)
    if planned:
        plot_planner(result["planner"], axes[3])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_planner(planner: dict, ax) -> None:
    """Predicted against measured latency of the planner's choice, as stacked parts of a request."""
    pred, meas = planner["predicted"]["latency_parts_ms"], planner["measured"]["latency_breakdown_ms"]
    tiers = [k.removeprefix("compute_") for k in pred if k.startswith("compute_")]
    parts = [(f"compute {t}", pred[f"compute_{t}"], meas[f"compute_{t}"]) for t in tiers] + [
        ("encode + decode", pred["codec"], meas["encode"] + meas["decode"]),
        ("link", pred["link"], meas["link"]),
        ("RPC overhead / queueing", pred["overhead"], meas["queueing"])]
    bottom = [0.0, 0.0]
    for label, p, m in parts:
        ax.bar([0, 1], [p, m], 0.6, bottom=bottom, label=label)
        bottom = [bottom[0] + p, bottom[1] + m]
    ax.set_xticks([0, 1], ["predicted", "measured (3 processes)"])
    ax.set_ylabel("mean latency per request, ms")
    ax.set_title(f"planner's choice on {planner['link']}: error {planner['latency_relative_error']:.0%}", fontsize=9)
    ax.legend(fontsize=7)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for bench.json and bench.png")
    p.add_argument("--quick", action="store_true", help="small model and 256 images: about 5 minutes on 2 cores")
    p.add_argument("--bundle", type=Path, default=None, help="bundle root to measure instead of training one")
    p.add_argument("--data", default="synthetic:test", help="data spec (default synthetic:test)")
    p.add_argument("--limit", type=positive_int, default=None, help="images (default 256 with --quick, else 2000)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per request (default 64)")
    p.add_argument("--links", nargs="+", default=["10mbit,20ms", "100mbit,5ms"],
                   help="link settings (RATE,RTT) for the baselines; each applies to every link")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads of this process and of every tier process (default 1: three processes of "
                        "two threads each oversubscribe a 2-core machine)")
    p.add_argument("--overhead-widths", default=None,
                   help="comma-separated widths of a freshly initialised ResNet-18 whose serving overhead is measured "
                        "too (default 0.25,1 without --quick, none with it; 'none' for none)")
    p.add_argument("--sections", default="serving_overhead,codecs,baselines,planner,streaming",
                   help="comma-separated parts to measure (default: all five)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the planner's checkpoint (default: the one the bundle was exported from, if found)")
    p.add_argument("--compute-scale", default="device=4,edge=2,cloud=1",
                   help="compute profile per tier for the baselines (TIER=S,...)")
    return p


def main(argv: list[str] | None = None) -> int:
    from common.data.datasets import load

    args = get_args_parser().parse_args(argv)
    host.keep_freed_memory()  # the allocator setting of the tier processes, for the in-process side too
    for spec in args.links:
        parse_link(spec)  # fail before any work
    widths = parse_widths(args.overhead_widths, args.quick)
    sections = set(filter(None, args.sections.split(",")))
    if not sections or sections - SECTIONS:
        raise ConfigError(f"--sections takes a comma-separated subset of {', '.join(sorted(SECTIONS))}")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.bundle or train_small(args.out, args.quick)  # trained with torch's own thread count
    if args.threads:
        torch.set_num_threads(args.threads)
    bundles = [load_tier_bundle(f) for f in find_tier_folders(root)]
    tiers = [b.tier for b in bundles]
    scales = parse_profile(args.compute_scale, tiers)
    link_names = [f"{a}_to_{b}" for a, b in zip(tiers, tiers[1:])]
    data = load(args.data, "test", limit=args.limit or (256 if args.quick else 2000))
    print(f"measuring on {len(data.images)} images from {args.data}, batch {args.batch_size}", flush=True)
    result = {"command": "python -m scripts.bench_pipeline " + " ".join(argv or []), "bundle": str(root),
              "samples": len(data.images), "batch_size": args.batch_size,
              "compute_scale": dict(zip(tiers, scales)), "links": args.links,
              "link_model": "delay = RTT + (request bytes + reply bytes) * 8 / rate, per exchange, every link"}
    if "serving_overhead" in sections:
        result["serving_overhead"] = measure_overhead(root, bundles, data, args.batch_size, threads=args.threads)
        print("serving overhead:", json.dumps(result["serving_overhead"]), flush=True)
        if widths:
            result["serving_overhead"]["resnet18_by_width"] = overhead_by_width(
                args.out, widths, data.subset(torch.arange(min(len(data), WIDTH_SAMPLES))),
                args.batch_size, args.threads)
    if "codecs" in sections:
        result["codecs"] = measure_codecs(bundles, data, args.batch_size, tiers, link_names)
        for name, row in result["codecs"].items():
            print(f"codec {name:>18}: accuracy {row['accuracy']:.4f}  bytes/sample {row['bytes_per_sample']}",
                  flush=True)
    result["baselines"] = {}
    for spec in args.links if "baselines" in sections else []:
        rows = measure_baselines(root, bundles, data, args.batch_size, tiers, link_names, spec, scales, args.threads)
        result["baselines"][spec] = rows
        for name, row in rows.items():
            print(f"{spec:>12} {name:>28}: mean {row['latency_ms_mean']:8.1f} ms  p95 {row['latency_ms_p95']:8.1f} ms"
                  f"  bytes/sample {row['bytes_per_sample']:9.0f}  accuracy {row['accuracy']:.4f}", flush=True)
    if "planner" in sections:
        ckpt = args.checkpoint or find_checkpoint(root)
        if ckpt is None:
            raise ConfigError(f"the planner section needs the checkpoint {root} was exported from: --checkpoint FILE")
        codecs = ("float32", "int8") if args.quick else ("float32", "float16", "int8")
        result["planner"] = measure_planner(ckpt, data, args.batch_size, args.links[0], scales,
                                            args.out / "planned", args.threads, codecs)
        print("planner:", json.dumps({k: result["planner"].get(k) for k in
                                      ("chosen", "predicted", "latency_relative_error")}), flush=True)
    if "streaming" in sections:
        result["streaming"] = measure_streaming(root, bundles, data, args.batch_size, tiers, args.links[0], scales,
                                                args.threads)
        print("streaming:", json.dumps(result["streaming"]), flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    written = [args.out / "bench.json"]
    if {"codecs", "baselines"} <= sections:
        plot(result, args.out / "bench.png")
        written.append(args.out / "bench.png")
    if "streaming" in sections:
        plot_streaming(result["streaming"], args.out / "streaming.png")
        written.append(args.out / "streaming.png")
    print(f"wrote {' and '.join(map(str, written))} in {result['seconds']:.0f} s")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
