"""Seconds per CPU training step of a config's model: the current recipe against candidate speed-ups, alternating.

``python -m scripts.bench_training --out DIR [--config FILE.toml] [--rounds N] [--steps N] [--variants A,B,...]``

A step is what ``training.engine.train_step`` does on one batch: crop + flip augmentation of the uint8 images,
forward through every exit, the joint loss, backward, an SGD step and a one-cycle scheduler step. The batches are
random uint8 images and labels of the config's shape (a step's cost does not depend on the pixels), so no data is
needed. Every variant runs in a process of its own (OpenMP settings are read once, when torch loads) with the same
initial model (same seed) and its own optimizer; after ``--warmup`` steps each, the variants take turns on the same
batches (``--steps`` steps each per round, ``--rounds`` rounds: A B C A B C ...; one variant computes while the
others wait on a pipe), so a change in host load touches all of them alike. Reported per variant: the median over rounds of the mean seconds per step,
its ratio to ``baseline`` and the implied seconds per epoch (steps per epoch of the config's training split, without
the per-epoch validation pass).

Variants (``--variants``, default all but ``compile``), each a set of the switches below:

- ``baseline``: the recipe before this benchmark: OpenMP's default waiting (``OMP_WAIT_POLICY`` unset: idle threads
  spin a while before they sleep), NCHW tensors, the gather-based augmentation (``augment_crop_flip_gather``), SGD's
  per-parameter loop, torch's default thread count;
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep at once: a thread spinning for a peer that
  another process's job has descheduled wastes the core);
- ``passive_channels_last``: + model and batch in NHWC memory format;
- ``passive_slice_augment``: + the crop + flip by one slice copy per sample (``augment_crop_flip``, same output);
- ``passive_foreach``: + SGD with ``foreach=True`` (one multi-tensor update);
- ``passive_all``: all three (what ``training.train`` does by default);
- ``passive_all_one_thread``: ``passive_all`` with ``torch.set_num_threads(1)``;
- ``all_spin``: ``passive_all`` with the default waiting;
- ``compile``: ``passive_all`` with the model through ``torch.compile`` (its compile time is in ``warmup_seconds``).

Writes ``DIR/bench_training.json`` and ``DIR/bench_training.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.cli import positive_int, run
from common.config import resolve_config
from common.errors import ConfigError
from training.config import TrainConfig
from training.engine import augment_crop_flip, augment_crop_flip_gather, train_step, weighted_exit_loss

ALL = {"passive", "channels_last", "slice_augment", "foreach"}
SWITCHES = {
    "baseline": set(), "passive": {"passive"}, "passive_channels_last": {"passive", "channels_last"},
    "passive_slice_augment": {"passive", "slice_augment"}, "passive_foreach": {"passive", "foreach"},
    "passive_all": ALL, "passive_all_one_thread": ALL | {"one_thread"}, "all_spin": ALL - {"passive"},
    "compile": ALL | {"compile"},
}
VARIANTS = tuple(SWITCHES)
NUM_CLASSES, SHAPE = 10, (3, 32, 32)
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "compile")


class Variant:
    """One training recipe: its own model copy, optimizer and scheduler."""

    def __init__(self, name: str, model: torch.nn.Module, cfg: TrainConfig, total_steps: int) -> None:
        self.name = name
        on = SWITCHES[name]
        self.channels_last = "channels_last" in on
        self.augment_fn = augment_crop_flip if "slice_augment" in on else augment_crop_flip_gather
        self.threads = 1 if "one_thread" in on else None
        self.model = copy.deepcopy(model).train()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        params = list(self.model.parameters())
        self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                   weight_decay=cfg.weight_decay, foreach="foreach" in on)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=cfg.lr, total_steps=total_steps)
        self.run_model = self.model
        self.compile_seconds = None
        weights, distill = cfg.loss_weights, cfg.distill
        self.loss_fn = lambda outs, y: weighted_exit_loss(outs, y, weights, distill)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        if "compile" in on:
            self.run_model = torch.compile(self.model)

    def steps(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Seconds per step over ``batches``."""
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            start = time.perf_counter()
            for images, labels in batches:
                loss, _ = train_step(self.run_model, images, labels, self.loss_fn, self.opt, self.sched,
                                     generator=self.gen, augment=True, channels_last=self.channels_last,
                                     augment_fn=self.augment_fn)
                loss.item()  # as the training loop does: the step is over when its loss is known
            return (time.perf_counter() - start) / len(batches)
        finally:
            torch.set_num_threads(before)


def random_batches(cfg: TrainConfig, shape: tuple[int, int, int], num_classes: int, count: int,
                   seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (cfg.batch_size, *shape), dtype=torch.uint8, generator=g),
             torch.randint(0, num_classes, (cfg.batch_size,), generator=g)) for _ in range(count)]


def worker(name: str, config: Path | None, warmup: int, total_steps: int) -> None:
    """A variant's process: build, warm up (timed: that is when torch.compile compiles), print the seconds; then for
    each ``seed count`` line on stdin run ``count`` steps on batches drawn from ``seed`` and print seconds per step."""
    from training.train import build_model

    cfg = resolve_config(TrainConfig, config, None)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, NUM_CLASSES, SHAPE)
    runner = Variant(name, model, cfg, total_steps)
    start = time.perf_counter()
    runner.steps(random_batches(cfg, SHAPE, NUM_CLASSES, warmup, seed=1))
    print(f"{time.perf_counter() - start:.6f} {torch.get_num_threads()}", flush=True)
    for line in sys.stdin:
        seed, count = (int(v) for v in line.split())
        print(f"{runner.steps(random_batches(cfg, SHAPE, NUM_CLASSES, count, seed=seed)):.6f}", flush=True)


def measure(config: Path | None, variants: list[str], rounds: int, steps: int, warmup: int, train_samples: int) -> dict:
    cfg = resolve_config(TrainConfig, config, None)
    total = warmup + rounds * steps + 1
    procs: dict[str, subprocess.Popen] = {}
    warmups: dict[str, float] = {}
    threads = None
    try:
        for name in variants:  # one at a time: a compiling or warming variant does not slow another's warm-up
            # Not ACTIVE for the others: with that set explicitly, libgomp's idle threads spin forever, so a waiting
            # variant would burn the cores the measured one needs. Unset is the runtime's default (spin a while).
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if "passive" in SWITCHES[name]:
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            cmd = [sys.executable, "-m", "scripts.bench_training", "--worker", name, "--warmup", str(warmup),
                   "--total-steps", str(total)] + (["--config", str(config)] if config else [])
            procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            line = procs[name].stdout.readline()
            if not line:
                raise ConfigError(f"variant {name} failed to start (see its error above)")
            seconds, threads = line.split()
            warmups[name] = float(seconds)
        per_round: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(rounds):
            for name in variants:  # the same batches for every variant, in turn
                procs[name].stdin.write(f"{100 + r} {steps}\n")
                procs[name].stdin.flush()
                per_round[name].append(float(procs[name].stdout.readline()))
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {per_round[n][-1]:.3f} s" for n in variants),
                  flush=True)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=60)
    steps_per_epoch = -(-train_samples // cfg.batch_size)
    base = statistics.median(per_round["baseline"]) if "baseline" in per_round else None
    rows = {}
    for name in variants:
        med = statistics.median(per_round[name])
        rows[name] = {"seconds_per_step": med, "ratio_to_baseline": med / base if base else None,
                      "seconds_per_epoch": med * steps_per_epoch, "warmup_seconds": warmups[name],
                      "per_round": per_round[name]}
    return {"variants": rows, "steps_per_epoch": steps_per_epoch, "train_samples": train_samples,
            "batch_size": cfg.batch_size, "architecture": cfg.architecture, "width": cfg.width,
            "exit_points": list(cfg.exit_points), "torch": torch.__version__, "threads": int(threads),
            "cpu_count": os.cpu_count(), "rounds": rounds, "steps_per_round": steps, "warmup_steps": warmup}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, name in enumerate(names):
        ys = result["variants"][name]["per_round"]
        ax.scatter([i] * len(ys), ys, s=12, color="0.6")
        ax.bar(i, result["variants"][name]["seconds_per_step"], alpha=0.6)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("s per step (bar: median; dots: rounds)")
    ax.set_title(f"{result['architecture']} width {result['width']:g}, batch {result['batch_size']}, "
                 f"{result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_training", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="folder for bench_training.json and bench_training.png")
    p.add_argument("--config", type=Path, default=Path("configs/cifar10_resnet18.toml"),
                   help="training config whose model, batch size and loss are measured")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (baseline first gives the ratios)")
    p.add_argument("--rounds", type=positive_int, default=7, help="turns each variant takes")
    p.add_argument("--steps", type=positive_int, default=8, help="steps per variant per turn")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed steps per variant first")
    p.add_argument("--train-samples", type=positive_int, default=40_000,
                   help="training split size, for seconds per epoch (CIFAR-10 here: 40,000)")
    p.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--total-steps", type=positive_int, default=1000, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.worker:
        worker(args.worker, args.config, args.warmup, args.total_steps)
        return 0
    if args.out is None:
        raise ConfigError("--out is required: the folder for bench_training.json and bench_training.png")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ConfigError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    result = measure(args.config, variants, args.rounds, args.steps, args.warmup, args.train_samples)
    result["command"] = "python -m scripts.bench_training " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_training.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "bench_training.png")
    for name, row in result["variants"].items():
        ratio = f"{row['ratio_to_baseline']:.2f}" if row["ratio_to_baseline"] else "-"
        print(f"{name:>14}: {row['seconds_per_step']:.3f} s/step  x{ratio}  {row['seconds_per_epoch']:.0f} s/epoch")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
