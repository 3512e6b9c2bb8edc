"""Exit heads refitted on a frozen backbone from cached features.

``python -m training.heads --checkpoint IN --out OUT [--epochs 12] [--views 2] [--exit-conv-channels C]
[--exit-conv-layers L] ...``

One forward pass of the backbone over the training split (and ``views - 1`` randomly cropped and flipped copies)
stores what every exit head reads, in float16, with the final exit's logits as the distillation teacher. The heads
are then trained from scratch on those stored features: an epoch over them runs no backbone (on the CIFAR-10
reference, 10 s against 66-72 s for a training epoch). The backbone, its BatchNorm
statistics and the final exit stay exactly as they were. Then the exit policies are fitted and calibrated on the
validation split as at the end of ``training.train``, and the result is written as a new checkpoint.

Memory: ``views`` x training samples x the exit points' feature sizes x 2 bytes; the CIFAR-10 reference model with
two views holds about 6.6 GB (printed before caching starts).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from common.cli import positive_int, run
from common.errors import ConfigError
from common.model import ExitHeadSpec, MultiExitNet
from common.data.datasets import ImageSet
from training import checkpoint
from training.config import TrainConfig
from training.engine import augment_crop_flip, evaluate, weighted_exit_loss


@dataclass(frozen=True)
class CachedFeatures:
    """Per exit point, the features its head reads (float16, ``views * N`` samples); the final exit's logits; the
    labels (repeated once per view)."""

    features: list[Tensor]
    teacher: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


def feature_bytes(model: MultiExitNet, samples: int) -> int:
    """Bytes ``cache_features`` stores for ``samples`` images (every view counted)."""
    shapes = model.backbone.feature_shapes(model.spec.input_shape)
    per_sample = sum(int(torch.Size(shapes[p - 1]).numel()) for p in model.spec.exit_points)
    return samples * (2 * per_sample + 4 * model.spec.num_classes)


@torch.no_grad()
def cache_features(model: MultiExitNet, data: ImageSet, views: int, generator: torch.Generator, augment: bool,
                   batch_size: int = 500) -> CachedFeatures:
    """Run the frozen backbone over ``data`` ``views`` times (the first as is, the others cropped and flipped when
    ``augment``) and keep what the exit heads read."""
    model.eval()
    chunks: list[list[Tensor]] = [[] for _ in model.spec.exit_points]
    teacher: list[Tensor] = []
    for view in range(views):
        for i in range(0, len(data), batch_size):
            images = data.images[i:i + batch_size]
            if view and augment:
                images = augment_crop_flip(images, generator)
            features, final = model.exit_features(images)
            for store, x in zip(chunks, features):
                store.append(x.half())
            teacher.append(final)
    return CachedFeatures([torch.cat(c) for c in chunks], torch.cat(teacher), data.labels.repeat(views))


def fit_heads(model: MultiExitNet, cached: CachedFeatures, *, epochs: int, lr: float, distill: float,
              batch_size: int, generator: torch.Generator, momentum: float = 0.9, weight_decay: float = 5e-4,
              log=print) -> list[dict]:
    """Train ``model``'s early exit heads on ``cached`` (SGD, one-cycle schedule), each on its own loss (cross-entropy,
    or with ``distill`` = T > 0 half of it replaced by distillation from the final exit); the backbone is untouched.
    Returns one history entry per epoch."""
    heads = model.exits
    steps_per_epoch = len(cached) // batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"refitting heads needs at least one batch of {batch_size} cached samples, "
                          f"got {len(cached)}")
    opt = torch.optim.SGD(heads.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay,
                          foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    weights = [1.0] * len(heads) + [0.0]  # the teacher's own term: none (it is not trained)
    history = []
    for epoch in range(epochs):
        heads.train()
        start, total = time.perf_counter(), 0.0
        order = torch.randperm(len(cached), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            outputs = model.early_logits([f[idx].float() for f in cached.features]) + [cached.teacher[idx]]
            loss = weighted_exit_loss(outputs, cached.labels[idx], weights, distill)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        entry = {"stage": "heads", "epoch": epoch + 1, "loss": total / steps_per_epoch,
                 "seconds": time.perf_counter() - start}
        log(f"[heads] epoch {epoch + 1}/{epochs}  loss {entry['loss']:.4f}  {entry['seconds']:.0f} s")
        history.append(entry)
    heads.eval()
    return history


def with_new_heads(model: MultiExitNet, exit_head: ExitHeadSpec | None = None,
                   cascade: bool | None = None) -> MultiExitNet:
    """A copy of ``model`` with freshly initialised exit heads (of ``exit_head`` and ``cascade``, else the same
    kind) and the same backbone, final classifier and bottleneck weights."""
    spec = replace(model.spec, exit_head=exit_head or model.spec.exit_head,
                   cascade=model.spec.cascade if cascade is None else cascade)
    fresh = MultiExitNet(spec)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("exits.")}
    missing, unexpected = fresh.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith("exits.") for k in missing), (missing, unexpected)
    return fresh.eval()


def refit_heads(model: MultiExitNet, train_set: ImageSet, cfg: TrainConfig, *, epochs: int, views: int,
                exit_head: ExitHeadSpec | None = None, log=print) -> tuple[MultiExitNet, list[dict]]:
    """``model`` with new heads fitted on its frozen backbone from cached features of ``train_set`` (``cfg`` gives the
    learning rate, distillation temperature, batch size, augmentation and seed); returns it and its history."""
    if views < 1 or epochs < 1:
        raise ConfigError(f"refitting heads needs views >= 1 and epochs >= 1, got {views} and {epochs}")
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    torch.manual_seed(cfg.seed + 2)
    fresh = with_new_heads(model, exit_head)
    cached, seconds = cached_views(fresh, train_set, cfg, views, gen, log)
    history = fit_heads(fresh, cached, epochs=epochs, lr=cfg.lr, distill=cfg.distill, batch_size=cfg.batch_size,
                        generator=gen, momentum=cfg.momentum, weight_decay=cfg.weight_decay, log=log)
    history[0]["cache_seconds"] = seconds
    return fresh, history


def cached_views(model: MultiExitNet, train_set: ImageSet, cfg: TrainConfig, views: int, generator: torch.Generator,
                 log=print) -> tuple[CachedFeatures, float]:
    """``cache_features`` of ``views`` views when ``cfg`` augments its data (else of the images as they are), with
    its size announced first; returns the cache and the seconds it took."""
    views = views if cfg.augments() else 1
    size = feature_bytes(model, views * len(train_set))
    log(f"[heads] caching the exit points' features of {views} view(s) of {len(train_set)} training samples "
        f"({size / 2**30:.2f} GiB)")
    start = time.perf_counter()
    cached = cache_features(model, train_set, views, generator, cfg.augments())
    seconds = time.perf_counter() - start
    log(f"[heads] cached in {seconds:.0f} s")
    return cached, seconds


# 12 rather than 6: under priced thresholds the ablation (docs/benchmarks.md) certified 2.3-2.9 points fewer FLOPs with
# twice the epochs, for about a minute more on the CIFAR-10 reference.
EPOCHS = 12


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.heads", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.safetensors written by training.train")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (may be the same file)")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS,
                   help=f"epochs over the cached features (default {EPOCHS})")
    p.add_argument("--views", type=positive_int, default=2,
                   help="copies of the training split cached: the images as they are, then cropped and flipped ones")
    p.add_argument("--exit-conv-channels", type=int, default=None,
                   help="new heads' conv channels (default: the checkpoint's; 0 = pool + linear)")
    p.add_argument("--exit-conv-stride", type=positive_int, default=None,
                   help="new heads' conv stride (default: the checkpoint's)")
    p.add_argument("--exit-conv-layers", type=positive_int, default=None,
                   help="new heads' conv layers, the first strided (default: the checkpoint's)")
    p.add_argument("--distill", type=float, default=None,
                   help="distillation temperature (default: the checkpoint's training config; 0 = none)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the training config's)")
    p.add_argument("--data", default=None, help="data spec (default: the one the model was trained on)")
    return p


def main(argv: list[str] | None = None) -> int:
    from training.train import fit_and_calibrate

    args = get_args_parser().parse_args(argv)
    model, meta = checkpoint.load(args.checkpoint)
    cfg = TrainConfig.from_checkpoint(meta["config"], "refit heads", distill=args.distill, lr=args.lr, data=args.data)
    head = model.spec.exit_head
    if args.exit_conv_channels is not None and args.exit_conv_channels < 0:
        raise ConfigError(f"--exit-conv-channels must be >= 0, got {args.exit_conv_channels}")
    head = ExitHeadSpec(head.conv_channels if args.exit_conv_channels is None else args.exit_conv_channels,
                        head.conv_stride if args.exit_conv_stride is None else args.exit_conv_stride,
                        head.conv_layers if args.exit_conv_layers is None else args.exit_conv_layers)
    train_set, val = cfg.load_split("train"), cfg.load_split("val")
    fresh, history = refit_heads(model, train_set, cfg, epochs=args.epochs, views=args.views, exit_head=head)
    accuracy = evaluate(fresh, val)["exit_accuracy"]
    print(f"[heads] validation exit accuracy {[round(a, 4) for a in accuracy]}")
    # The config stays a TrainConfig (training.calibrate and a second refit rebuild one from it); how the heads were
    # refitted is recorded beside it.
    meta["config"] = {**meta["config"], "exit_conv_channels": head.conv_channels, "exit_conv_stride": head.conv_stride,
                      "exit_conv_layers": head.conv_layers}
    meta["heads"] = {"epochs": args.epochs, "views": args.views, "distill": cfg.distill, "lr": cfg.lr}
    meta.update(fit_and_calibrate(fresh, val, cfg, train_set=train_set))
    checkpoint.save(fresh, meta, args.out)
    (args.out.parent / "heads-history.json").write_text(json.dumps(history, indent=2) + "\n")
    print(f"checkpoint with refitted heads written to {args.out}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
