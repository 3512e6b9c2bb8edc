"""Train a multi-exit network, then fit and calibrate its exit policies on held-out validation data.

``python -m training.train --data SPEC --out DIR [--config FILE.toml] [--flag value ...]``

Modes:
* ``joint``  - every exit trained together on the weighted sum of their losses (``--loss-weights``);
* ``staged`` - the backbone alone (final exit), then the exit heads on the frozen backbone.
Either way the last stage fits the learned exit policies (``training.policies``) and calibrates every policy on the
validation split. Writes
``DIR/checkpoint.safetensors`` (weights + JSON metadata; also after every epoch, uncalibrated, so an interrupted run
can be calibrated with ``training.calibrate`` and exported), ``DIR/config.json`` and ``DIR/history.json``.
"""
from __future__ import annotations

import os

from common.serving.host import ENVIRONMENT  # no torch: the setting below still comes first

# Before torch loads (its OpenMP runtime reads this once): idle OpenMP threads sleep instead of spin-waiting, the
# tiers' setting. On a shared 2-core host a spinning team waits on a peer thread that is descheduled; measured with
# scripts.bench_training (docs/benchmarks.md#training-speed-on-2-cpu-cores). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", ENVIRONMENT["OMP_WAIT_POLICY"])

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common.cli import run  # noqa: E402
from common.config import add_config_args, resolve_config, save_config  # noqa: E402
from common.model import BottleneckSpec, ExitHeadSpec, ModelSpec, MultiExitNet  # noqa: E402
from common.model.convert import load_pretrained  # noqa: E402
from common.model.split import cost_table  # noqa: E402
from training import checkpoint  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from common.data.datasets import ImageSet, normalization  # noqa: E402
from training.engine import collect_logits, evaluate, train_one_epoch, weighted_exit_loss  # noqa: E402
from training.policies import build_policies  # noqa: E402


def build_model(cfg: TrainConfig, num_classes: int, input_shape: tuple[int, int, int]) -> MultiExitNet:
    mean, std = normalization(cfg.data)
    spec = ModelSpec(
        architecture=cfg.architecture, num_classes=num_classes, width=cfg.width, input_shape=input_shape,
        exit_points=tuple(cfg.exit_points), mean=mean, std=std,
        exit_head=ExitHeadSpec(conv_channels=cfg.exit_conv_channels, conv_stride=cfg.exit_conv_stride,
                               conv_layers=cfg.exit_conv_layers),
        bottleneck=BottleneckSpec(channels=cfg.bottleneck_channels, stride=cfg.bottleneck_stride),
        cascade=cfg.cascade,
    )
    model = MultiExitNet(spec)
    if cfg.pretrained:
        skipped = load_pretrained(model.backbone, Path(cfg.pretrained))
        print(f"backbone weights from {cfg.pretrained}" + (f"; left as initialised: {skipped}" if skipped else ""))
    return model


def _fit(model: MultiExitNet, params: list[nn.Parameter], weights: list[float], epochs: int, train: ImageSet,
         val: ImageSet, cfg: TrainConfig, gen: torch.Generator, stage: str, freeze_backbone: bool,
         on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """SGD with a one-cycle schedule over ``params`` for ``epochs``; returns one history entry per epoch."""
    if epochs <= 0:
        return []
    steps_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    if cfg.max_batches:
        steps_per_epoch = min(steps_per_epoch, cfg.max_batches)
    # foreach: one multi-tensor update instead of a loop over parameters (scripts.bench_training)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay,
                          foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=epochs * steps_per_epoch)
    augment = cfg.augments()
    history = []
    for epoch in range(epochs):
        model.train()
        if freeze_backbone:  # frozen BatchNorm statistics too: the backbone must stay exactly as trained
            model.backbone.eval()
            model.normalize.eval()
        stats = train_one_epoch(
            model, train, lambda outs, y: weighted_exit_loss(outs, y, weights, cfg.distill), opt, sched,
            batch_size=cfg.batch_size, generator=gen, augment=augment, max_batches=cfg.max_batches,
            desc=f"{stage} {epoch + 1}/{epochs}", channels_last=cfg.channels_last,
        )
        stats.update(stage=stage, epoch=epoch + 1, val=evaluate(model, val))
        print(f"[{stage}] epoch {epoch + 1}/{epochs}  loss {stats['loss']:.4f}  "
              f"val exit accuracy {[round(a, 4) for a in stats['val']['exit_accuracy']]}  {stats['seconds']:.0f} s")
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return history


def train(cfg: TrainConfig, out: Path) -> dict:
    """Run every stage of ``cfg``, write the checkpoint under ``out``, and return its metadata."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_set, val_set = cfg.load_split("train"), cfg.load_split("val")
    print(f"data {cfg.data}: {len(train_set)} train, {len(val_set)} validation samples, "
          f"{len(train_set.class_names)} classes")
    model = build_model(cfg, len(train_set.class_names), tuple(train_set.images.shape[1:]))
    ckpt = out / "checkpoint.safetensors"
    base_meta = {"class_names": train_set.class_names, "config": json.loads((out / "config.json").read_text())}

    def save_progress(stats: dict) -> None:
        # An uncalibrated checkpoint after every epoch: an interrupted run can still be calibrated and exported.
        checkpoint.save(model, {**base_meta, "gates": None, "progress": {k: stats[k] for k in ("stage", "epoch")}},
                        ckpt)

    if cfg.channels_last:  # NHWC: faster convolutions on CPU; the batches follow in train_step
        model.to(memory_format=torch.channels_last)
    history: list[dict] = []
    if cfg.mode == "joint":
        history += _fit(model, list(model.parameters()), cfg.loss_weights, cfg.epochs, train_set, val_set, cfg, gen,
                        "joint", freeze_backbone=False, on_epoch=save_progress)
    else:
        final_only = [0.0] * (model.num_exits - 1) + [1.0]
        history += _fit(model, list(model.backbone.parameters()), final_only, cfg.epochs_backbone, train_set,
                        val_set, cfg, gen, "backbone", freeze_backbone=False, on_epoch=save_progress)
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        exit_weights = list(cfg.loss_weights[:-1]) + [0.0]
        history += _fit(model, list(model.exits.parameters()), exit_weights, cfg.epochs_exits, train_set, val_set,
                        cfg, gen, "exits", freeze_backbone=True, on_epoch=save_progress)
        for p in model.backbone.parameters():
            p.requires_grad_(True)
    model.to(memory_format=torch.contiguous_format)  # what everything after training expects
    model.eval()
    meta = {**base_meta, **fit_and_calibrate(model, val_set, cfg, train_set=train_set)}
    checkpoint.save(model, meta, ckpt)
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    return meta


def fit_and_calibrate(model: MultiExitNet, val_set: ImageSet, cfg: TrainConfig, learned: dict | None = None,
                      train_set: ImageSet | None = None) -> dict:
    """Third stage: fit the learned policies and calibrate every policy on the validation split; the checkpoint
    metadata keys ``policies``, ``policy`` (active), ``gates`` (the active policy's) and ``calibration``.
    Certified calibration ordered on the training split (``cfg.calibration_order``) needs ``train_set``."""
    costs, full = cost_table(model)
    order_on = None
    if cfg.calibration == "ltt" and cfg.calibration_order == "train":
        if train_set is None:
            raise ValueError("calibration ordered on the training split needs the training split")
        order_on = (collect_logits(model, train_set), train_set.labels)
    built = build_policies(collect_logits(model, val_set), val_set.labels, costs, full, alpha=cfg.alpha,
                           epochs=cfg.epochs_gates, max_batches=cfg.gate_max_batches, seed=cfg.seed,
                           target_accuracy=cfg.target_accuracy, target_drop=cfg.target_drop, budget=cfg.budget_flops,
                           method=cfg.calibration, delta=cfg.delta, bound=cfg.bound, learned=learned,
                           use_agreement=cfg.gate_agreement, order_on=order_on)
    active = "mlp" if cfg.policy == "both" else cfg.policy
    shown = ("confidence", "mlp") if cfg.policy == "both" else tuple(built["calibration"])
    where = f", ordered on {len(train_set)} training samples" if order_on is not None else ""
    print(f"[policies] calibrated on {built['calibration'][active]['val_samples']} held-out validation samples "
          f"({cfg.calibration}{where})")
    for name in shown:
        c = built["calibration"][name]
        print(f"[policies] {name:>10}: validation accuracy {c['val_accuracy']:.4f} at "
              f"{c['val_flops_fraction']:.1%} FLOPs, exits {c['val_exit_counts']}"
              + ("   <- active" if name == active else ""))
    return {"policies": built["policies"], "policy": active, "gates": built["policies"][active],
            "calibration": built["calibration"]}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--config", type=Path, default=None, help="TOML file with TrainConfig keys")
    add_config_args(p, TrainConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = resolve_config(TrainConfig, args.config, args)
    train(cfg, args.out)
    print(f"checkpoint written to {args.out / 'checkpoint.safetensors'}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
