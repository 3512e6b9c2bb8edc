"""Load benchmark: many concurrent single-image clients against one deployment, dynamic batching off and on.

``python -m scripts.bench_load --out DIR [--bundle DIR] [--clients 8] [--requests 500] [--max-batch 8]
[--max-queue-delay-ms 2] [--width 1.0]``

Runs the three tiers twice as local processes - once plain, once with ``--max-queue-delay-ms`` on every tier - and
each time lets ``--clients`` threads send ``--requests`` one-image requests each (every sample id unique across the
run). Dynamic batching pays where the model's compute, not per-request overhead, dominates; the default model is therefore
a full-width ResNet-18 trained for a few batches (accuracy does not matter here). Writes ``DIR/bench_load.json`` (per mode: throughput, latency percentiles, errors, lost and duplicated
answers, degraded answers, each tier's resident memory after the first and the last quarter of the run; and
``batching_speedup``) and ``DIR/bench_load.png``. Without ``--bundle`` a small model is trained into ``DIR`` first.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

from common.cli import non_negative_float, positive_int, run, tier_gates
from common.serving.client import NextTierClient
from common.wire.batch import Batch
from common.emulation.deployment import LocalDeployment


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def load_run(dep: LocalDeployment, images, clients: int, requests: int) -> dict:
    """Drive ``dep`` with ``clients`` threads x ``requests`` one-image requests; count what came back."""
    info_client = NextTierClient(dep.device_address, timeout_s=60)
    model_id = info_client.describe().model_id
    info_client.close()
    total = clients * requests
    answers: dict[int, int] = {}
    latencies: list[float] = []
    errors: list[str] = []
    degraded = [0]
    done = [0]
    lock = threading.Lock()
    quarter_rss: dict[str, dict[str, int]] = {}
    pids = {p.tier: p.process.pid for p in dep.processes}

    def note_progress() -> None:
        if done[0] == total // 4 and "first_quarter" not in quarter_rss:
            quarter_rss["first_quarter"] = {t: rss_bytes(pid) for t, pid in pids.items()}

    def client(c: int) -> None:
        stub = NextTierClient(dep.device_address, timeout_s=60)
        try:
            for i in range(requests):
                sid = c * requests + i
                t0 = time.perf_counter()
                try:
                    reply = stub(Batch(f"c{c}-{i}", model_id, [sid], images[sid % len(images)].unsqueeze(0))).answer
                except Exception as e:  # counted, the run goes on
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                        done[0] += 1
                        note_progress()
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                with lock:
                    latencies.append(ms)
                    for p in reply.predictions:
                        answers[p.sample_id] = answers.get(p.sample_id, 0) + 1
                        degraded[0] += int(p.degraded)
                    done[0] += 1
                    note_progress()
        finally:
            stub.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    quarter_rss["last_quarter"] = {t: rss_bytes(pid) for t, pid in pids.items()}
    first = quarter_rss.get("first_quarter", quarter_rss["last_quarter"])
    growth = {t: (quarter_rss["last_quarter"][t] - first[t]) / first[t] if first[t] else None for t in pids}
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [None] * 3
    return {
        "requests": total, "wall_s": round(wall, 3), "throughput_samples_per_s": round(len(latencies) / wall, 2),
        "latency_ms": {k: (round(float(v), 3) if v is not None else None) for k, v in zip(("p50", "p95", "p99"), q)},
        "errors": len(errors), "error_examples": sorted(set(errors))[:5],
        "lost": sum(1 for sid in range(total) if sid not in answers),
        "duplicated": sum(n - 1 for n in answers.values() if n > 1),
        "degraded": degraded[0],
        "rss_bytes": quarter_rss, "rss_growth": growth,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["off", "on"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.bar(modes, [result[m]["throughput_samples_per_s"] for m in modes], color=["#999999", "#3b7dd8"])
    a.set_title(f"throughput (speedup {result['batching_speedup']:.2f}x)")
    a.set_xlabel("dynamic batching")
    a.set_ylabel("samples / s")
    width = 0.25
    for k, pct in enumerate(("p50", "p95", "p99")):
        b.bar(np.arange(2) + (k - 1) * width, [result[m]["latency_ms"][pct] or 0 for m in modes], width, label=pct)
    b.set_xticks(range(2), modes)
    b.set_xlabel("dynamic batching")
    b.set_ylabel("ms per request")
    b.set_title("client latency")
    b.legend()
    fig.suptitle(f"{result['clients']} clients x {result['requests_per_client']} one-image requests")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quick_bundle(out: Path, width: float) -> Path:
    """Train a model for a few batches and export it: enough for a load test, not for accuracy."""
    from training.config import TrainConfig
    from training.export import export
    from training.train import train

    cfg = TrainConfig(width=width, epochs=1, max_batches=20, limit_train=2560, limit_val=400, batch_size=128,
                      target_drop=5.0)
    train(cfg, out / "train")
    export(out / "train" / "checkpoint.safetensors", out / "bundle")
    return out / "bundle"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_load", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for bench_load.json and bench_load.png")
    p.add_argument("--bundle", type=Path, default=None, help="bundle root (default: train a small one into --out)")
    p.add_argument("--width", type=float, default=1.0,
                   help="ResNet-18 width of the model trained when no --bundle is given (default 1.0)")
    p.add_argument("--clients", type=positive_int, default=8)
    p.add_argument("--requests", type=positive_int, default=500, help="one-image requests per client")
    p.add_argument("--max-batch", type=positive_int, default=8, help="--max-batch of every tier (default 8)")
    p.add_argument("--max-queue-delay-ms", type=non_negative_float, default=2.0,
                   help="batching on: the tiers' --max-queue-delay-ms (default 2)")
    p.add_argument("--batch-workers", type=positive_int, default=2)
    p.add_argument("--gate", action="append", default=[],
                   help="TIER=SPEC gate override for both runs, e.g. device=never (repeatable)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads per tier (default: torch's)")
    return p


def main(argv: list[str] | None = None) -> int:
    from common.data.datasets import load

    args = get_args_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or quick_bundle(args.out, args.width)
    images = load("synthetic:test", "test", limit=2000).images
    result = {"bundle": str(bundle), "width": None if args.bundle else args.width, "clients": args.clients, "requests_per_client": args.requests,
              "max_batch": args.max_batch, "max_queue_delay_ms": args.max_queue_delay_ms,
              "batch_workers": args.batch_workers, "torch_threads": args.threads, "gates": args.gate}
    for mode in ("off", "on"):
        flags = ["--max-batch", str(args.max_batch), "--workers", str(max(8, args.clients * 2))]
        flags += ["--threads", str(args.threads)] if args.threads else []
        if mode == "on":
            flags += ["--max-queue-delay-ms", str(args.max_queue_delay_ms), "--batch-workers", str(args.batch_workers)]
        extra = {t: flags for t in ("device", "edge", "cloud")}
        with LocalDeployment(bundle, gates=tier_gates(args.gate), extra_args=extra, log_dir=args.out / f"logs-{mode}") as dep:
            result[mode] = load_run(dep, images, args.clients, args.requests)
        r = result[mode]
        print(f"batching {mode}: {r['throughput_samples_per_s']} samples/s, p50 {r['latency_ms']['p50']} ms, "
              f"errors {r['errors']}, lost {r['lost']}, duplicated {r['duplicated']}, "
              f"RSS growth {', '.join(f'{t} {g:+.1%}' for t, g in r['rss_growth'].items() if g is not None)}",
              flush=True)
    result["batching_speedup"] = round(result["on"]["throughput_samples_per_s"]
                                       / result["off"]["throughput_samples_per_s"], 3)
    for key in ("errors", "lost", "duplicated"):
        result[key] = result["off"][key] + result["on"][key]
    result["max_rss_growth"] = max(g for m in ("off", "on") for g in result[m]["rss_growth"].values() if g is not None)
    (args.out / "bench_load.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "bench_load.png")
    print(f"batching_speedup {result['batching_speedup']}  errors {result['errors']}  lost {result['lost']}  "
          f"duplicated {result['duplicated']}  -> {args.out / 'bench_load.json'}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
